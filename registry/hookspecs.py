"""Hook specifications: the contract between vlframe and its plugins.

A plugin is any module or object with functions marked ``@hookimpl`` whose names match the hooks
below. Each hook takes no arguments and returns a list of :class:`~registry.specs.ComponentSpec`;
the registry calls every implementation once, when it first builds its component catalog, and
attributes each returned spec to the plugin that implemented the hook.

Factories are called as ``spec.factory(config, **kwargs)``; the keyword arguments of each kind
are listed on its hook. Masks passed to components are boolean with ``True`` marking a real
(attendable) token.
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

    Called once per registry, when its catalog is first built. Each factory is called as
    ``factory(config)`` and returns an ``nn.Module`` that maps images ``(B, 3, H, W)`` to tokens
    ``(B, N, width)`` and has the attributes ``width`` (token size), ``num_prefix_tokens``
    (class/register tokens at the front of the sequence, 0 if none) and ``image_size`` (the
    side, in pixels, of the square images it expects).
    """


@hookspec
def vlframe_text_decoders() -> list[ComponentSpec]:
    """Return the unimodal text decoders (text encoders) this plugin provides.

    Called once per registry, when its catalog is first built. Each factory is called as
    ``factory(config, vocab_size=int, context_length=int, with_embedding=bool)`` and returns an
    ``nn.Module`` with attributes ``width`` and ``token_embedding`` (an ``nn.Embedding``, for a
    tied LM head) whose ``forward(tokens (B, L), mask (B, L))`` returns ``(states (B, L, width),
    embedding (B, width) or None)``; ``embedding`` is the contrastive text feature and is
    produced only when ``with_embedding`` is true. To caption, ``forward`` also takes the keywords
    ``embed=False`` (skip the embedding) and ``cache`` (a key/value cache, ``vlframe.nn.KVCache``,
    passed on to its attention layers; ``tokens`` are then only the new positions, starting at
    ``cache.offset``, and ``mask`` may be None).
    """


@hookspec
def vlframe_poolers() -> list[ComponentSpec]:
    """Return the token poolers this plugin provides.

    Called once per registry, when its catalog is first built. Each factory is called as
    ``factory(config, in_dim=int, out_dim=int, num_prefix_tokens=int)`` and returns an
    ``nn.Module`` mapping tokens ``(B, N, in_dim)`` to ``(B, M, module.out_dim)``.
    ``out_dim`` is the size the model would like; a pooler that passes tokens through unchanged
    may keep ``in_dim`` and say so in its ``out_dim`` attribute. A pooler whose output still
    starts with the input's prefix (class) tokens says how many in ``num_prefix_tokens_out``
    (0 if the attribute is absent).
    """


@hookspec
def vlframe_multimodal_decoders() -> list[ComponentSpec]:
    """Return the multimodal (image-conditioned) text decoders this plugin provides.

    Called once per registry, when its catalog is first built. Each factory is called as
    ``factory(config, in_dim=int, context_dim=int)`` and returns an ``nn.Module`` with attribute
    ``width`` whose ``forward(states (B, L, in_dim), mask (B, L), context (B, M, context_dim))``
    returns ``(B, L, width)``. To caption, ``forward`` also takes the keyword ``cache`` (see
    text decoders); after the first cached call ``context`` may be None.
    """


@hookspec
def vlframe_objectives() -> list[ComponentSpec]:
    """Return the training objectives (losses) this plugin provides.

    Called once per registry, when its catalog is first built. Configs subclass
    :class:`~registry.config.ObjectiveConfig` (a ``weight`` and the class variable ``requires``
    naming the model outputs read). Each factory is called as ``factory(config)`` and returns an
    ``nn.Module`` whose ``forward(outputs: dict)`` returns a scalar loss, unweighted. CoCa's
    outputs: ``text``, ``text_mask``, ``image_embeds``, ``text_embeds`` (normalised),
    ``caption_states`` (the multimodal decoder's output), ``lm_head`` (the module mapping those
    states to logits) and, when an objective asks for them, ``logits``.
    """


@hookspec
def vlframe_heads() -> list[ComponentSpec]:
    """Return the task heads (projections, language-model heads) this plugin provides.

    Called once per registry, when its catalog is first built. Each factory is called as
    ``factory(config, in_dim=int, out_dim=int, tie_to=nn.Embedding | None)`` and returns an
    ``nn.Module`` mapping ``(..., in_dim)`` to ``(..., out_dim)``; ``tie_to`` is offered to heads
    that can share the token embedding's weight.
    """


@hookspec
def vlframe_models() -> list[ComponentSpec]:
    """Return the model builders this plugin provides (e.g. ``coca``).

    Called once per registry, when its catalog is first built. A builder's config holds the
    component slots it wires. Each factory is called as ``factory(config, catalog=Catalog)`` and
    builds the parts through ``catalog.build(...)``, returning an ``nn.Module`` with
    ``encode_image``, ``encode_text`` and a ``forward`` returning the losses by objective name
    and their weighted total.
    """


@hookspec
def vlframe_tokenizers() -> list[ComponentSpec]:
    """Return the tokenizers this plugin provides.

    Called once per registry, when its catalog is first built. Each factory is called as
    ``factory(config, vocab_size=int)`` (the model's vocabulary, an upper bound) and returns a
    tokenizer with ``pad_id``, ``bos_id``, ``eos_id``, ``cls_id``, ``vocab_size``, ``trained``,
    ``encode(texts, context_length) -> (ids (B, L) long, mask (B, L) bool)``, ``decode(ids) ->
    str``, ``train(texts, directory) -> Path`` (fits it to captions and saves it) and
    ``save(directory) -> Path``; the factory loads a trained one when the config names a file.
    """


@hookspec
def vlframe_datasets() -> list[ComponentSpec]:
    """Return the image-text datasets this plugin provides.

    Called once per registry, when its catalog is first built. Each factory is called as
    ``factory(config, split="train" | "val")`` and returns either a map-style dataset
    (``__len__`` and ``__getitem__(i) -> vlframe.datasets.Sample``, raising
    ``vlframe.datasets.SampleError`` for a missing or corrupt image or empty captions) or an
    iterable one (``__iter__`` yielding ``Sample`` or ``SampleError`` values, with ``length``,
    the nominal samples per epoch, and ``set_epoch(epoch)`` and ``shard(rank, world_size)``).
    Both offer ``captions()``, every caption of the split without decoding an image (to train a
    tokenizer), and ``describe()``, one line saying what was loaded.
    """


@hookspec
def vlframe_importers() -> list[ComponentSpec]:
    """Return the checkpoint importers this plugin provides: other frameworks' weights into vlframe.

    Called once per registry, when its catalog is first built. Each factory is called as
    ``factory(config)`` and returns an importer with ``architectures`` (the names it knows),
    ``config(architecture) -> dict`` (a whole vlframe config, as YAML data, whose model and
    tokenizer reproduce that architecture; ``architecture`` may also be a file the importer reads,
    such as the source framework's own model config), ``read(path) -> dict[str, Tensor]`` (the
    source weights, from a local file only) and ``convert(weights, architecture) -> dict[str,
    Tensor]`` (the same weights under the vlframe model's parameter names). ``convert`` raises
    ``ValueError`` listing every source key it did not expect and every one it needs but did not
    find; ``config`` raises ``ValueError`` naming a setting vlframe cannot reproduce.
    """
