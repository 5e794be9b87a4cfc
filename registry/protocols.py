"""What each kind's factory must return: the typed contract between vlframe and its plugins.

Every kind of component has a runtime-checkable :class:`typing.Protocol` here. The catalog checks
each built object against its kind's protocol (:func:`missing_members`), and the hook docstrings
in :mod:`registry.hookspecs` point here instead of restating it. The engine uses nothing of a
component beyond these members; a plugin may offer more for its own use.

Members marked *optional* in a docstring are read with a default when absent, so components
written before this contract keep working; everything a protocol declares is required.

Models declare **capabilities** (:class:`Capability`): what they can do beyond training. A model
without a capability simply lacks its members, and a task that needs one says so. Each
capability has its own protocol (:data:`CAPABILITY_PROTOCOLS`), checked on the models that
declare it.

Tensors and modules are written as strings (``"Tensor"``, ``"nn.Module"``): this package imports
neither torch nor vlframe, so the contract can be read, and checked, without them.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from registry.kinds import Kind

# -- model outputs ---------------------------------------------------------------------------

class Output:
    """The names under which a model hands its outputs to objectives (``ObjectiveConfig.requires``).

    A builder may produce more; these are the ones the built-in objectives and the conformance
    kit know (:data:`OUTPUTS` describes each)."""

    TEXT = "text"
    TEXT_MASK = "text_mask"
    IMAGE_EMBEDS = "image_embeds"
    TEXT_EMBEDS = "text_embeds"
    CAPTION_STATES = "caption_states"
    LM_HEAD = "lm_head"
    LOGITS = "logits"


#: What each output holds. Shapes: B batch, L text length, E embedding size, D decoder width, V vocabulary.
OUTPUTS: Mapping[str, str] = {
    Output.TEXT: "token ids (B, L), long",
    Output.TEXT_MASK: "(B, L) bool, True at real tokens",
    Output.IMAGE_EMBEDS: "L2-normalised contrastive image embeddings (B, E)",
    Output.TEXT_EMBEDS: "L2-normalised contrastive text embeddings (B, E)",
    Output.CAPTION_STATES: "the captioning decoder's output states (B, L, D)",
    Output.LM_HEAD: "the module mapping caption_states to next-token logits (B, L, V)",
    Output.LOGITS: "next-token logits (B, L, V), produced only when an objective asks for them",
}


class Capability:
    """Well-known model capabilities (strings: a plugin may declare and require others)."""

    #: ``encode_image`` / ``encode_text`` into one embedding space: retrieval, zero-shot.
    CONTRASTIVE = "contrastive"
    #: ``caption_context`` / ``caption_logits``: generation of captions.
    CAPTIONING = "captioning"
    #: ``image_tokens`` / ``image_tower``: the image encoder's token features, for probes.
    IMAGE_TOKENS = "image_tokens"
    #: ``multimodal_states``: image-conditioned text states, for understanding heads.
    MULTIMODAL_STATES = "multimodal_states"


# -- leaf components -----------------------------------------------------------------------


@runtime_checkable
class ImageEncoder(Protocol):
    """Images ``(B, 3, image_size, image_size)`` -> tokens ``(B, N, width)``.

    ``num_prefix_tokens``: class/register tokens at the front of the sequence (0 if none).
    Optional: ``blocks`` (its repeated layers, an ``nn.ModuleList``; models report them for
    per-block checkpointing and sharding) and ``no_weight_decay() -> set[str]`` (names of its
    own parameters that weight decay must not shrink, such as position embeddings).
    """

    width: int
    num_prefix_tokens: int
    image_size: int

    def __call__(self, images: Any) -> Any: ...


@runtime_checkable
class TextDecoder(Protocol):
    """A unimodal (text-only) decoder: ``(tokens (B, L), mask (B, L) | None) -> (states (B, L, width),
    embedding (B, width) | None)``.

    ``embedding`` is the contrastive text feature, produced only when the factory was given
    ``with_embedding=True``. Keywords: ``embed=False`` skips it; ``cache`` (a
    ``vlframe.sdk.KVCache``) decodes incrementally: ``tokens`` are then the positions after
    ``cache.offset`` and ``mask`` may be None. ``token_embedding`` (an ``nn.Embedding``) is
    offered to heads that tie to it. Optional: ``blocks``, ``no_weight_decay()``.
    """

    width: int
    token_embedding: Any

    def __call__(self, tokens: Any, mask: Any, *, embed: bool = True, cache: Any = None) -> tuple[Any, Any]: ...


@runtime_checkable
class Pooler(Protocol):
    """Tokens ``(B, N, in_dim)`` (and an optional key mask ``(B, N)``) -> ``(B, M, out_dim)``.

    Optional: ``num_prefix_tokens_out`` (the output still starts with that many class tokens;
    default 0), ``summary_tokens`` (the first outputs summarise the image and are not decoder
    context; default 0), ``no_weight_decay()``.
    """

    out_dim: int

    def __call__(self, tokens: Any, mask: Any = None) -> Any: ...


@runtime_checkable
class MultimodalDecoder(Protocol):
    """``(states (B, L, in_dim), mask (B, L) | None, context (B, M, context_dim)) -> (B, L, width)``.

    Keyword ``cache`` as for text decoders; after the first cached call ``context`` may be None.
    Optional: ``blocks``, ``no_weight_decay()``.
    """

    width: int

    def __call__(self, states: Any, mask: Any, context: Any, *, cache: Any = None) -> Any: ...


@runtime_checkable
class Objective(Protocol):
    """An ``nn.Module``: ``(outputs: dict) -> scalar loss``, unweighted, reading the outputs its
    config ``requires`` (:data:`OUTPUTS`); its parameters (a learned temperature) train with the model.

    Optional: ``metrics() -> dict[str, float]``, values to log during training (a temperature,
    a bias): the trainer logs them as ``train/<objective name>/<metric>``.
    """

    def __call__(self, outputs: Mapping[str, Any]) -> Any: ...


@runtime_checkable
class Head(Protocol):
    """``(..., in_dim) -> (..., out_dim)``: a projection or a language-model head."""

    def __call__(self, x: Any) -> Any: ...


# -- models ----------------------------------------------------------------------------------


@runtime_checkable
class ModelOutputLike(Protocol):
    """What a model's forward returns (``vlframe.sdk.ModelOutput`` is one): the weighted total
    ``loss`` and the unweighted ``losses`` by objective name."""

    loss: Any
    losses: Mapping[str, Any]


@runtime_checkable
class Model(Protocol):
    """A trainable vision-language model, as built by a model builder.

    The engine uses exactly these members, and a capability's members on models that declare it:

    - ``image_size`` (pixels, square), ``context_length`` (longest text, BOS and EOS included),
      ``pad_id`` (the padding id of texts given without a mask);
    - ``capabilities``: a frozenset of :class:`Capability` strings;
    - ``__call__(images, text, text_mask=None)`` -> a :class:`ModelOutputLike`;
    - ``objectives``: the objective modules by name (an ``nn.ModuleDict``); each one's optional
      ``metrics()`` is logged while training;
    - ``no_weight_decay() -> set[str]``: parameter names weight decay must not shrink;
    - ``blocks() -> list[nn.Module]``: the repeated blocks, each a unit for activation
      checkpointing, ``torch.compile`` and FSDP sharding.

    Under ``train.parallel: fsdp`` the model is built on the meta device and initialised by
    every module's ``reset_parameters()`` (children first, then parents, as construction runs):
    a part with parameters of its own initialises them there (``torch.nn`` layers already do).

    Optional: ``summary_groups() -> dict[str, list[str]]``, sums of top-level parts that
    ``vlframe model summary`` reports (e.g. ``{"decoder": ["text_decoder", "lm_head"]}``).
    ``vlframe.sdk.ModelBase`` implements all of this from a builder's config.
    """

    image_size: int
    context_length: int
    pad_id: int
    capabilities: frozenset[str]
    objectives: Any

    def __call__(self, images: Any, text: Any, text_mask: Any = None) -> Any: ...

    def no_weight_decay(self) -> set[str]: ...

    def blocks(self) -> list[Any]: ...


@runtime_checkable
class ContrastiveModel(Protocol):
    """Capability ``contrastive``: images and texts into one space of ``embed_dim``.

    ``encode_image(images (B, 3, S, S), normalize=True) -> (B, embed_dim)`` and
    ``encode_text(text (B, L), text_mask=None, normalize=True) -> (B, embed_dim)``.
    """

    embed_dim: int

    def encode_image(self, images: Any, normalize: bool = True) -> Any: ...

    def encode_text(self, text: Any, text_mask: Any = None, normalize: bool = True) -> Any: ...


@runtime_checkable
class CaptioningModel(Protocol):
    """Capability ``captioning``: what generation needs.

    ``caption_context(images)`` is the image side, computed once per image (any tensor whose
    first dimension is the batch: generation repeats it per beam); ``caption_logits(tokens (B, L),
    context, cache=None) -> (B, L, vocabulary)`` gives next-token logits after each token. With
    a ``vlframe.sdk.KVCache`` the tokens are the positions after those already decoded, and the
    model advances ``cache.offset`` past them.
    """

    def caption_context(self, images: Any) -> Any: ...

    def caption_logits(self, tokens: Any, context: Any, cache: Any = None) -> Any: ...


@runtime_checkable
class ImageTokensModel(Protocol):
    """Capability ``image_tokens``: ``image_tokens(images) -> (B, N, image_token_dim)``, the frozen
    features of probes, and ``image_tower()``, the module computing them (a fine-tuning probe
    trains a copy of it)."""

    image_token_dim: int

    def image_tokens(self, images: Any) -> Any: ...

    def image_tower(self) -> Any: ...


@runtime_checkable
class MultimodalStatesModel(Protocol):
    """Capability ``multimodal_states``: ``multimodal_states(images, text, text_mask=None) ->
    (states (B, L, D), mask (B, L))``, image-conditioned text states for understanding heads."""

    def multimodal_states(self, images: Any, text: Any, text_mask: Any = None) -> tuple[Any, Any]: ...


#: The protocol a model declaring each well-known capability must also follow.
CAPABILITY_PROTOCOLS: Mapping[str, type] = {
    Capability.CONTRASTIVE: ContrastiveModel,
    Capability.CAPTIONING: CaptioningModel,
    Capability.IMAGE_TOKENS: ImageTokensModel,
    Capability.MULTIMODAL_STATES: MultimodalStatesModel,
}


# -- tokenizers, data, importers, tasks -----------------------------------------------------


@runtime_checkable
class Tokenizer(Protocol):
    """Texts <-> token ids.

    ``encode(texts, context_length) -> (ids (B, L) long, mask (B, L) bool)`` starts each text
    with ``bos_id``, ends it with ``eos_id`` and pads with ``pad_id`` (all below ``vocab_size``);
    ``decode(ids) -> str`` stops at EOS and drops special tokens. ``trained`` is false until
    ``train(texts, directory) -> Path`` has fitted it (and saved it there); ``save(directory)
    -> Path`` writes ``directory/tokenizer.model``, which the factory reads back when its config
    names the file. Optional: ``cls_id``, ``unk_id`` (special ids generation never emits).
    """

    pad_id: int
    bos_id: int
    eos_id: int
    vocab_size: int
    trained: bool

    def encode(self, texts: Sequence[str], context_length: int) -> tuple[Any, Any]: ...

    def decode(self, ids: Any) -> str: ...

    def train(self, texts: Iterable[str], directory: Path) -> Path: ...

    def save(self, directory: Path) -> Path: ...


@runtime_checkable
class Dataset(Protocol):
    """Image-text samples, map-style (:class:`MapDataset`: what the trainer and the tasks read).

    ``captions()`` yields every caption of the split without decoding an image (to train a
    tokenizer); ``describe()`` is one line saying what was loaded.
    """

    def captions(self) -> Iterable[str]: ...

    def describe(self) -> str: ...


@runtime_checkable
class MapDataset(Dataset, Protocol):
    """``__len__`` and ``__getitem__(i) -> vlframe.sdk.Sample``, raising ``vlframe.sdk.SampleError``
    for a missing or corrupt image or empty captions (the loader skips and counts it). Optional:
    ``skipped``, the ``SampleError`` list of entries set aside while building, and ``classes``,
    class names of a labelled set (``Sample.meta["label"]`` indexes them)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


@runtime_checkable
class StreamingDataset(Dataset, Protocol):
    """Samples read front to back (shards behind a URL, a pipe; data larger than one pass).

    ``stream(slot, slots, epoch, seed)`` yields this slot's share of one epoch, each sample once
    across the ``slots`` (rank x loader worker), ``vlframe.sdk.Sample`` or, for an unusable one,
    the ``vlframe.sdk.SampleError`` saying why (counted like a map dataset's). It may be endless
    (resampling). ``streaming = True`` marks the kind. Training reads it; evaluation tasks need
    a :class:`MapDataset`."""

    streaming: bool

    def stream(self, slot: int, slots: int, epoch: int, seed: int) -> Iterator[Any]: ...


@runtime_checkable
class Importer(Protocol):
    """Another framework's weights into vlframe.

    ``architectures``: the names it knows. ``config(architecture) -> dict``: a whole vlframe
    config as YAML data whose model and tokenizer reproduce the architecture (``architecture``
    may also be a file the importer reads). ``read(path) -> dict[str, Tensor]``: the source
    weights, from a local file only. ``convert(weights, architecture) -> dict[str, Tensor]``:
    the same weights under the vlframe model's names; it raises ``ValueError`` listing the
    unexpected and the missing keys, and ``config`` raises ``ValueError`` naming a setting
    vlframe cannot reproduce.
    """

    architectures: Sequence[str]

    def config(self, architecture: Any) -> dict[str, Any]: ...

    def read(self, path: Path) -> dict[str, Any]: ...

    def convert(self, weights: dict[str, Any], architecture: Any) -> dict[str, Any]: ...


@runtime_checkable
class Task(Protocol):
    """An evaluation of a trained model: ``run(context) -> EvalResult``.

    ``context`` is a ``vlframe.sdk.TaskContext``: the loaded model (``context.trained``), a
    folder for files (``context.out_dir``, or None) and ``context.dataset(spec, split)``, which
    builds the dataset a ``--data`` spec names (None: the run's validation split). The result is
    a ``vlframe.sdk.EvalResult`` (metrics in percent where they are rates). The capabilities a
    task needs are its config's ``requires``; the engine checks them before ``run``.
    """

    def run(self, context: Any) -> Any: ...



# -- training and tracking --------------------------------------------------------------------


@runtime_checkable
class ParallelStrategy(Protocol):
    """How training spreads the model over the ranks ``torchrun`` started, steps it, and saves it
    (``train.parallel``). The trainer and the validator use nothing else, and never ask which
    strategy they have.

    In order: ``setup()`` once, joining a process group if the strategy needs one (even for one
    process), and returning this rank's device; ``shards`` is then how many ways the parameters
    are split (1 where every rank holds the whole model: memory estimates divide by it).
    ``parallelize(build, prepare, device=, seed=, precision=)`` builds the model with
    ``build(device)`` (``"meta"`` for a strategy that materialises its shards itself, None for the
    real device; every rank seeds torch with ``train.seed`` first, so every rank builds the same
    weights), calls ``prepare(model)`` on it once (per-block ``torch.compile`` and activation
    checkpointing, before any wrapping), wraps or shards it, and returns the model whose
    parameters the optimiser steps; ``module`` is from then on what the training forward calls.
    ``seed`` is ``train.seed`` (for a strategy that initialises weights itself, as FSDP does on
    the meta device); ``precision`` is the resolved ``train.precision``, ``"fp32"`` or ``"bf16"``
    (the trainer runs the forward under bf16 autocast for the latter).

    Each step runs every micro-batch's forward and backward inside ``accumulating(last)``
    (gradients are reduced only on the last), then ``clip_grad_norm(params, max_norm)``
    finishes the gradients' reduction and returns their global norm before clipping (clipping
    to ``max_norm`` unless it is None). ``nonfinite(model)`` names the parameters that are not
    finite, the same list on every rank. ``evaluate(fn)`` runs an evaluation of the model (rank
    0 alone while the others wait, or every rank in step where the model is spread over them)
    and returns ``fn``'s result on rank 0 (None elsewhere). ``vlframe.sdk``'s ``rank()`` and
    ``world_size()`` are 0 and 1 in a process without a group.

    ``save(folder, model, optimizer)`` is called on every rank with the same new, empty folder
    (the checkpointer renames it into place once it is whole) and writes the model and
    optimiser state there; it returns entries for the checkpoint's ``state.json`` (rank 0's are
    kept). ``load(folder, model, optimizer, state)`` restores them (``optimizer`` None: the
    weights only) from a checkpoint written by any strategy, at any world size where the format
    allows it; a checkpoint that does not fit raises ``ValueError`` or ``RuntimeError``, and a
    state without optimiser entries ``KeyError``. ``saves_together``: every rank takes part in
    ``save`` (so no checkpoint can be written after one rank failed alone). ``notes``: lines
    shown when training starts. ``vlframe.sdk`` has the checkpoint formats a strategy writes.
    """

    notes: Sequence[str]
    shards: int
    saves_together: bool
    module: Any

    def setup(self) -> Any: ...

    def parallelize(self, build: Any, prepare: Any, *, device: Any, seed: int, precision: str) -> Any: ...

    def accumulating(self, last: bool) -> Any: ...

    def clip_grad_norm(self, params: Sequence[Any], max_norm: float | None) -> Any: ...

    def nonfinite(self, model: Any) -> list[str]: ...

    def evaluate(self, fn: Any) -> Any: ...

    def save(self, folder: Path, model: Any, optimizer: Any) -> dict[str, Any]: ...

    def load(self, folder: Path, model: Any, optimizer: Any, state: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class RunRecord:
    """A tracked run as a sink reads it back (sweeps find their variants, ``compare`` their metrics,
    ``vlframe caption RUN_ID`` its checkpoint): the latest value of each metric."""

    run_id: str
    name: str = ""
    status: str = ""
    start_time: int = 0
    experiment_id: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    #: The experiment's name (what ``find_runs`` takes).
    experiment: str = ""


@runtime_checkable
class TrackingSink(Protocol):
    """Where runs are tracked, behind vlframe's journal (MLflow is the built-in sink).

    Every event of a run is first appended to a journal in its folder and then handed to the
    sink in journal order, at least once: a sink must take an event it already has without
    harm (a metric identical in key, step, timestamp and value counts once, a param already set
    keeps its value, tags and the status are overwritten, an artifact replaces itself). Events
    are mappings with a ``kind``: ``param`` and ``tag`` (``key``, ``value``), ``metric``
    (``key``, ``value``, ``step``, ``timestamp`` in ms), ``artifact`` (``path``, a local file or
    folder, and ``artifact_path``), ``status`` (``status``: RUNNING, FINISHED, FAILED or KILLED;
    ``timestamp``).

    ``create_run(experiment, name, local_id, start_time)`` opens a run, or finds the one an
    earlier attempt opened with the same ``local_id``, and returns ``(run id, experiment id)``.
    Tags are the engine's (``vlframe.*``, listed in ``vlframe/runs/tags.py``) and three of MLflow's
    own that its UI reads: ``mlflow.parentRunId`` (the run a sweep's run nests under; sweeps find
    their runs by it and by ``vlframe.sweep_root``), ``mlflow.source.git.commit`` and
    ``mlflow.note.content``; another sink stores them as ordinary tags, or maps them to its own
    notions of the same.
    ``deliver(run_id, events)`` sends them in order, yielding after each request how many are
    done; it raises when the store cannot be reached (the rest stay journaled, delivery is tried
    again later), and skips an event the store refuses for good, counting it in ``refused`` with
    the reason in ``refusal``. ``run_exists(run_id)``; ``describe(run_id, experiment,
    experiment_id)``: lines telling the user where to see the run. Reading back: ``find_runs(experiment, tags)`` (runs of
    the experiment named, or of every experiment for None, carrying every tag given, newest
    first), ``get_run(run_id)`` (a
    :class:`RunRecord`; ``LookupError`` when there is none) and ``download(run_id, artifact_path,
    dest)`` (the artifact, a file or a folder, into the existing folder ``dest``; returns its local
    path).

    The factory gets the ``uri`` and the ``timeout_s`` every request must end within, so that
    an unreachable store never stalls training. The URI is kept as written (in the run folder's
    ``tracking/run.json``, for ``vlframe tracking sync``): a sink whose URIs name local files
    should take absolute paths.
    """

    uri: str
    refused: int
    refusal: str

    def create_run(self, experiment: str, name: str, local_id: str, start_time: int) -> tuple[str, str | None]: ...

    def run_exists(self, run_id: str) -> bool: ...

    def deliver(self, run_id: str, events: Sequence[Mapping[str, Any]]) -> Iterator[int]: ...

    def describe(self, run_id: str, experiment: str, experiment_id: str | None) -> list[str]: ...

    def find_runs(self, experiment: str | None, tags: Mapping[str, str]) -> list[RunRecord]: ...

    def get_run(self, run_id: str) -> RunRecord: ...

    def download(self, run_id: str, artifact_path: str, dest: Path) -> Path: ...


# -- capabilities --------------------------------------------------------------------------------


def missing_capabilities(needed: Iterable[str], have: Iterable[str]) -> list[str]:
    """The capabilities of ``needed`` that ``have`` lacks, sorted."""
    return sorted(set(needed) - set(have))


def capabilities_of(model: Any) -> frozenset[str]:
    """The capabilities a built model declares (none for an object without ``capabilities``)."""
    return frozenset(getattr(model, "capabilities", None) or ())


def require_capabilities(model: Any, needed: Iterable[str], what: str) -> None:
    """Raise :class:`registry.CapabilityError` naming what ``model`` lacks of ``needed`` for
    ``what`` (``"task 'zeroshot'"``, ``"vlframe caption"``)."""
    from registry.errors import CapabilityError

    have = capabilities_of(model)
    missing = missing_capabilities(needed, have)
    if missing:
        kind = getattr(getattr(model, "config", None), "type", type(model).__name__)
        plural = "capabilities" if len(missing) > 1 else "capability"
        raise CapabilityError(f"{what} needs the {', '.join(missing)} {plural}, and the model ({kind}) has "
                              f"{'only ' + ', '.join(sorted(have)) if have else 'none'}")


def why_not(needed: Iterable[str], have: Iterable[str]) -> str | None:
    """Why a model with capabilities ``have`` cannot do what needs ``needed`` (None: it can)."""
    missing = missing_capabilities(needed, have)
    return f"no {', '.join(missing)} capability" if missing else None


# -- kinds -------------------------------------------------------------------------------------

#: The protocol each kind's built object must follow (from the kinds' records).
KIND_PROTOCOLS: Mapping[Kind, type] = {kind: globals()[kind.record.protocol] for kind in Kind}

# -- checking --------------------------------------------------------------------------------

_DUNDERS_KEPT = frozenset({"__call__", "__len__", "__getitem__", "__iter__"})
_SKIP = frozenset({"_is_protocol", "_is_runtime_protocol"})


def protocol_members(protocol: type) -> list[str]:
    """The members a protocol declares (methods, properties, annotated attributes), sorted."""
    names: set[str] = set()
    for klass in protocol.__mro__:
        if klass in (object, Protocol) or klass.__module__ in ("typing", "typing_extensions"):
            continue
        if not getattr(klass, "_is_protocol", False):
            continue
        candidates = set(vars(klass)) | set(getattr(klass, "__annotations__", {}))
        for name in candidates:
            if name in _SKIP:
                continue
            if name.startswith("__") and name not in _DUNDERS_KEPT:
                continue
            if name.startswith("_") and not name.startswith("__"):
                continue
            names.add(name)
    return sorted(names)


def _has(obj: Any, name: str) -> bool:
    # Looked up statically first, so that a property is not run (it may raise, or be costly);
    # then through __getattr__, where nn.Module keeps its parameters and submodules.
    try:
        inspect.getattr_static(obj, name)
        return True
    except AttributeError:
        pass
    try:
        return hasattr(obj, name)
    except Exception:  # noqa: BLE001 - it exists, it just failed to compute
        return True


def missing_members(obj: Any, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks (empty when it conforms)."""
    missing = []
    for name in protocol_members(protocol):
        if name == "__call__":
            if not callable(obj):
                missing.append(name)
        elif not _has(obj, name):
            missing.append(name)
    return missing


#: Kinds whose components become submodules of a model, so must be ``torch.nn.Module`` objects.
MODULE_KINDS = frozenset(kind for kind in Kind if kind.record.module)


def _is_module(obj: Any) -> bool:
    # By name, not isinstance: this package does not import torch.
    return any(c.__name__ == "Module" and c.__module__ == "torch.nn.modules.module" for c in type(obj).__mro__)


def conformance_problems(kind: Kind, obj: Any) -> list[str]:
    """Lines saying what ``obj`` lacks to be a ``kind`` (and, for models, to have each capability
    it declares): ``"lacks out_dim (registry.protocols.Pooler)"``."""
    protocol = KIND_PROTOCOLS[kind]
    problems = []
    if kind in MODULE_KINDS and not _is_module(obj):
        problems.append(f"is a {type(obj).__name__}, not a torch.nn.Module (it becomes part of a model)")
    if kind is Kind.DATASET and getattr(obj, "streaming", False) is True:
        protocol = StreamingDataset  # the other way to be a dataset
    missing = missing_members(obj, protocol)
    if missing:
        problems.append(f"lacks {', '.join(missing)} (registry.protocols.{protocol.__name__})")
    if kind is Kind.MODEL and "capabilities" not in missing:
        declared = getattr(obj, "capabilities", None)
        if not isinstance(declared, (set, frozenset)) or not all(isinstance(c, str) for c in declared):
            problems.append(f"capabilities must be a frozenset of strings, got {declared!r}")
        else:
            for capability in sorted(declared):
                proto = CAPABILITY_PROTOCOLS.get(capability)
                if proto is None:
                    continue
                lacking = missing_members(obj, proto)
                if lacking:
                    problems.append(f"declares capability '{capability}' but lacks {', '.join(lacking)} "
                                    f"(registry.protocols.{proto.__name__})")
    return problems


__all__ = [
    "CAPABILITY_PROTOCOLS",
    "Capability",
    "CaptioningModel",
    "ContrastiveModel",
    "Dataset",
    "Head",
    "ImageEncoder",
    "ImageTokensModel",
    "Importer",
    "KIND_PROTOCOLS",
    "MODULE_KINDS",
    "MapDataset",
    "StreamingDataset",
    "Model",
    "ModelOutputLike",
    "MultimodalDecoder",
    "MultimodalStatesModel",
    "OUTPUTS",
    "Objective",
    "Output",
    "ParallelStrategy",
    "Pooler",
    "RunRecord",
    "Task",
    "TrackingSink",
    "TextDecoder",
    "Tokenizer",
    "capabilities_of",
    "conformance_problems",
    "missing_capabilities",
    "missing_members",
    "protocol_members",
    "require_capabilities",
    "why_not",
]
