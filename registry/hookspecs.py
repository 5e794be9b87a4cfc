"""Hook specifications: the contract between vlframe and its plugins.

A plugin is any module or object with functions marked ``@hookimpl`` whose names match the hooks
below, one per kind of component. Each hook takes no arguments and returns a list of
:class:`~registry.specs.ComponentSpec`; the registry calls every implementation once, when it first
builds its component catalog, and attributes each returned spec to the plugin that implemented it.

Factories are called as ``spec.factory(config, **kwargs)`` with the keyword arguments each hook's
documentation lists, and must return an object following the kind's protocol in
:mod:`registry.protocols` (the catalog checks it and names a missing member). Masks passed to
components are boolean with ``True`` marking a real (attendable) token. Each kind's config must
subclass its base in :mod:`registry.config` (``KIND_CONFIG_BASE``).

The hooks are written from the kinds' records (:class:`registry.kinds.KindRecord`), so this module
and the kinds cannot disagree; ``help(registry.hookspecs.vlframe_poolers)`` shows one hook's text:

=================================  =====================================================
hook                               kind
=================================  =====================================================
``vlframe_image_encoders``         image encoder (:class:`~registry.protocols.ImageEncoder`)
``vlframe_text_decoders``          text decoder (:class:`~registry.protocols.TextDecoder`)
``vlframe_poolers``                pooler (:class:`~registry.protocols.Pooler`)
``vlframe_multimodal_decoders``    multimodal decoder (:class:`~registry.protocols.MultimodalDecoder`)
``vlframe_objectives``             objective (:class:`~registry.protocols.Objective`)
``vlframe_heads``                  head (:class:`~registry.protocols.Head`)
``vlframe_models``                 model builder (:class:`~registry.protocols.Model`)
``vlframe_tokenizers``             tokenizer (:class:`~registry.protocols.Tokenizer`)
``vlframe_datasets``               dataset (:class:`~registry.protocols.MapDataset`)
``vlframe_importers``              importer (:class:`~registry.protocols.Importer`)
``vlframe_tasks``                  evaluation task (:class:`~registry.protocols.Task`)
``vlframe_parallel_strategies``    parallel strategy (:class:`~registry.protocols.ParallelStrategy`)
``vlframe_tracking_sinks``         tracking sink (:class:`~registry.protocols.TrackingSink`)
=================================  =====================================================
"""

from __future__ import annotations

import pluggy

from registry.kinds import Kind, KindRecord
from registry.specs import ComponentSpec

PROJECT = "vlframe"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


def _hook(record: KindRecord):
    def spec() -> list[ComponentSpec]: ...

    spec.__name__ = spec.__qualname__ = record.hook
    spec.__module__ = __name__
    note = f"\n\n    {record.note}" if record.note else ""
    spec.__doc__ = (f"Return the {record.provides} this plugin provides.\n\n"
                    f"    Factory: ``{record.factory}``. Returns a :class:`registry.protocols.{record.protocol}`; "
                    f"configs subclass :class:`registry.config.{record.config_base}`.{note}\n    ")
    return hookspec(spec)


for _kind in Kind:
    globals()[_kind.hook] = _hook(_kind.record)
del _kind

__all__ = ["PROJECT", "hookimpl", "hookspec", *(kind.hook for kind in Kind)]
