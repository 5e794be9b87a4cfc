"""Hook specifications: the contract between vlframe and its plugins.

A plugin is any module or object with functions marked ``@hookimpl`` whose names match the hooks
below. Each hook takes no arguments and returns a list of :class:`~registry.specs.ComponentSpec`;
the registry calls every implementation once, when it first builds its component catalog, and
attributes each returned spec to the plugin that implemented the hook.

Factories are called as ``spec.factory(config, **kwargs)`` with the keyword arguments listed on
each hook, and must return an object following the kind's protocol in
:mod:`registry.protocols` (the catalog checks it and names a missing member). Masks passed to
components are boolean with ``True`` marking a real (attendable) token. Each kind's config must
subclass the base in ``registry.config.KIND_CONFIG_BASE`` (``ComponentConfig``, or
``ObjectiveConfig``, ``ModelConfig``, ``TokenizerConfig``, ``TaskConfig``).
"""

from __future__ import annotations

import pluggy

from registry.specs import ComponentSpec

PROJECT = "vlframe"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def vlframe_image_encoders() -> list[ComponentSpec]:
    """Return the image encoders this plugin provides.

    Factory: ``factory(config)``. Returns a :class:`registry.protocols.ImageEncoder`.
    """


@hookspec
def vlframe_text_decoders() -> list[ComponentSpec]:
    """Return the unimodal text decoders (text encoders) this plugin provides.

    Factory: ``factory(config, vocab_size=int, context_length=int, with_embedding=bool)``.
    Returns a :class:`registry.protocols.TextDecoder`.
    """


@hookspec
def vlframe_poolers() -> list[ComponentSpec]:
    """Return the token poolers this plugin provides.

    Factory: ``factory(config, in_dim=int, out_dim=int, num_prefix_tokens=int)``; ``out_dim`` is
    the size the model would like (a pooler that passes tokens through unchanged may keep
    ``in_dim`` and say so in its ``out_dim``). Returns a :class:`registry.protocols.Pooler`.
    """


@hookspec
def vlframe_multimodal_decoders() -> list[ComponentSpec]:
    """Return the multimodal (image-conditioned) text decoders this plugin provides.

    Factory: ``factory(config, in_dim=int, context_dim=int)``. Returns a
    :class:`registry.protocols.MultimodalDecoder`.
    """


@hookspec
def vlframe_objectives() -> list[ComponentSpec]:
    """Return the training objectives (losses) this plugin provides.

    Configs subclass :class:`~registry.config.ObjectiveConfig` (a ``weight``, and the class
    variable ``requires`` naming the model outputs read, from :data:`registry.protocols.OUTPUTS`).
    Factory: ``factory(config)``. Returns a :class:`registry.protocols.Objective`.
    """


@hookspec
def vlframe_heads() -> list[ComponentSpec]:
    """Return the task heads (projections, language-model heads) this plugin provides.

    Factory: ``factory(config, in_dim=int, out_dim=int, tie_to=nn.Embedding | None)``; ``tie_to``
    is offered to heads that can share the token embedding's weight. Returns a
    :class:`registry.protocols.Head`.
    """


@hookspec
def vlframe_models() -> list[ComponentSpec]:
    """Return the model builders this plugin provides (e.g. ``coca``).

    Configs subclass :class:`~registry.config.ModelConfig` (vocabulary, context length, padding
    id, objectives, and what the model produces and can do). Factory: ``factory(config,
    catalog=Catalog)``, building its parts through ``catalog.build(...)``. Returns a
    :class:`registry.protocols.Model`, plus each capability protocol it declares;
    ``vlframe.sdk.ModelBase`` provides the engine-facing members.
    """


@hookspec
def vlframe_tokenizers() -> list[ComponentSpec]:
    """Return the tokenizers this plugin provides.

    Configs subclass :class:`~registry.config.TokenizerConfig`: its ``path`` names the
    tokenizer's file. Factory: ``factory(config, vocab_size=int)`` (the model's vocabulary, an
    upper bound); it loads the trained tokenizer ``path`` names. Returns a
    :class:`registry.protocols.Tokenizer`.
    """


@hookspec
def vlframe_datasets() -> list[ComponentSpec]:
    """Return the image-text datasets this plugin provides.

    Factory: ``factory(config, split="train" | "val")``. Returns a
    :class:`registry.protocols.MapDataset`, or a :class:`registry.protocols.StreamingDataset`
    (``streaming = True``; training only). A
    config subclassing :class:`~registry.config.DatasetConfig` may say which paths it reads
    (``from_path``), so that ``--data PATH`` finds it.
    """


@hookspec
def vlframe_importers() -> list[ComponentSpec]:
    """Return the checkpoint importers this plugin provides: other frameworks' weights into vlframe.

    Factory: ``factory(config)``. Returns a :class:`registry.protocols.Importer`.
    """


@hookspec
def vlframe_tasks() -> list[ComponentSpec]:
    """Return the evaluation tasks this plugin provides (``vlframe eval --task NAME``, sweeps).

    Configs subclass :class:`~registry.config.TaskConfig` (``requires``: the model capabilities
    needed; ``periodic``: run during training's validation). Factory: ``factory(config)``.
    Returns a :class:`registry.protocols.Task`.
    """
