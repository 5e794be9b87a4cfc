"""Configuration base classes and the typed *component slot*.

A slot is a field whose value is a mapping with a ``type`` key naming a registered component,
e.g. ``image_encoder: {type: vit, width: 768}``. Plugin config classes exist only after plugin
discovery, so a static union cannot list them; instead the slot's validator reads the catalog
from the validation context and hands the mapping to that component's own config class. Nested
errors keep their paths (``model.image_encoder.width``), and unknown fields are rejected
everywhere (``extra="forbid"``), so a misspelled key is an error rather than a silent default.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    WrapValidator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from registry.errors import DuplicateComponentError
from registry.kinds import Kind

#: Key under which the validation context carries the :class:`~registry.catalog.Catalog`.
CONTEXT_KEY = "vlframe_catalog"
#: JSON-schema marker left on slots; ``schema`` replaces it by the registered alternatives.
SCHEMA_KIND_KEY = "x-vlframe-kind"
#: ``Problem.code`` of a component slot naming a component no loaded plugin registers.
UNKNOWN_COMPONENT = "vlframe_unknown_component"


class ConfigModel(BaseModel):
    """Base of every vlframe config model: unknown fields are errors, assignments are validated,
    numbers are finite (``.inf`` and ``.nan`` are refused) and a boolean is not a number (YAML's
    ``true`` would otherwise be taken as 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            raise_problems(cls.__name__, [((name,), f"expected a number, got a boolean ({str(value).lower()})")
                                          for name, value in data.items() if isinstance(value, bool)
                                          and name in cls.model_fields and _numbers_only(cls.model_fields[name].annotation)])
        return data


class ComponentConfig(ConfigModel):
    """Base of a component's config. ``type`` is the registered name that selected it."""

    type: str = Field(description="Registered name of the component.")


class ObjectiveConfig(ComponentConfig):
    """Base of objective configs: each objective is weighted and declares the model outputs it reads."""

    weight: float = Field(1.0, ge=0.0, allow_inf_nan=False, description="Multiplier of this loss in the total.")
    #: Model outputs this objective reads (e.g. ``image_embeds``); a model builder checks them.
    requires: ClassVar[frozenset[str]] = frozenset()


def _numbers_only(annotation: Any) -> bool:
    """Whether a field's type takes numbers but not booleans (``int``, ``float | None``, ...)."""
    import types
    import typing

    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _numbers_only(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return bool(members) and all(_numbers_only(a) for a in members)
    return annotation in (int, float)


def _dispatch(kind: Kind):
    def validate(value: Any, handler: Any, info: ValidationInfo) -> ComponentConfig:
        catalog = (info.context or {}).get(CONTEXT_KEY)
        if catalog is None and isinstance(value, ComponentConfig):
            return value  # already validated (e.g. assigning one config's part to another)
        if catalog is None:
            raise PydanticCustomError(
                "vlframe_no_catalog",
                "cannot validate {kind} without a component catalog; "
                "use Registry.validate(...) or vlframe.load_config(...)",
                {"kind": kind.article},
            )
        names = catalog.names(kind)
        if isinstance(value, ComponentConfig):
            value = value.model_dump()
        if isinstance(value, str):  # a bare name is the component with its default settings
            value = {"type": value}
        if not isinstance(value, Mapping):
            raise PydanticCustomError(
                "vlframe_not_a_component",
                "expected a name or a mapping with a 'type' key naming {kind}; registered: {names}",
                {"kind": kind.article, "names": catalog.describe(kind)},
            )
        name = value.get("type")
        if name is None:
            raise PydanticCustomError(
                "vlframe_missing_type",
                "missing; choose {kind}: {names}",
                {"kind": kind.article, "names": catalog.describe(kind)},
            )
        if not isinstance(name, str) or name not in names:
            raise PydanticCustomError(
                UNKNOWN_COMPONENT, "{message}", {"message": catalog.unknown_message(kind, str(name))})
        try:
            entry = catalog.get(kind, name)
        except DuplicateComponentError as exc:
            raise PydanticCustomError("vlframe_contested_component", "{message}", {"message": str(exc)}) from None
        config_cls = entry.spec.config
        return config_cls.model_validate(dict(value), context=info.context)

    return validate


def component(kind: Kind) -> Any:
    """Type of a field holding one component of ``kind``, chosen by its ``type`` key (a bare
    name, ``pooler: attentional``, is the component with its default settings).

    ``SerializeAsAny`` keeps the plugin's own fields in ``model_dump()`` (a field annotated with
    a base class would otherwise drop the subclass's fields).
    """
    return Annotated[
        SerializeAsAny[ComponentConfig],
        WrapValidator(_dispatch(kind)),
        WithJsonSchema({SCHEMA_KIND_KEY: kind.value}),
    ]


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    return path


def _existing_dir(path: Path) -> Path:
    if not path.is_dir():
        raise ValueError(f"folder not found: {path}")
    return path


#: A path that must name an existing file (or folder) when the config is validated.
ExistingFile = Annotated[Path, AfterValidator(_existing_file)]
ExistingDir = Annotated[Path, AfterValidator(_existing_dir)]


class TokenizerConfig(ComponentConfig):
    """Base of tokenizer configs: ``path`` is the tokenizer's file, the one its ``save`` writes
    (the engine points it at a checkpoint's copy to load a trained run's tokenizer)."""

    path: ExistingFile | None = Field(
        None, description="The trained tokenizer's file; none: one to train on the training captions (or the "
        "tokenizer's own default).")


def raise_problems(title: str, problems: Sequence[tuple[tuple[str | int, ...], str]]) -> None:
    """Raise a ValidationError with one line per ``(location, message)``.

    For cross-field checks inside a ``model_validator``: pydantic prefixes the locations with the
    model's own path, so the user sees ``model.objectives.contrastive: ...``.
    """
    if not problems:
        return
    details: list[InitErrorDetails] = [
        {"type": PydanticCustomError("vlframe_check", message), "loc": loc, "input": None}
        for loc, message in problems
    ]
    raise ValidationError.from_exception_data(title, details)


#: Bounds on sizes every model shares: past them a config is a typo, not a model (a size a
#: builder takes may be bounded by its own config; vlframe.api also refuses absurd totals).
MAX_VOCAB = 1 << 24
MAX_CONTEXT = 1 << 20

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ModelConfig(ComponentConfig):
    """Base of model builders' configs: what the engine needs to know without building the model.

    A builder adds its component slots and overrides :meth:`produces`, :meth:`capabilities` and,
    where it can, :meth:`trained_parts` and :attr:`image_size`. The objectives are checked here
    once for every builder: their names, that each one's ``requires`` is among the outputs the
    model produces, and that every configured part learns from some objective (a part no loss
    reaches would sit idle in one process and stop DDP at its second step).
    """

    vocab_size: int = Field(64000, gt=0, le=MAX_VOCAB, description="Token vocabulary of the text side (an upper "
                            "bound for the tokenizer).")
    context_length: int = Field(64, gt=1, le=MAX_CONTEXT, description="Longest text, in tokens, BOS and EOS included.")
    pad_id: int = Field(0, ge=0, description="Padding token id, for inputs given without a mask (below vocab_size).")
    objectives: dict[str, component(Kind.OBJECTIVE)] = Field(
        description="Losses by name; the total is their weighted sum.")

    #: For messages: which settings produce an output objectives may require.
    producers: ClassVar[Mapping[str, str]] = {}

    @property
    def image_size(self) -> int | None:
        """The side of the square images the model takes, when the config alone says it."""
        return None

    def produces(self) -> set[str]:
        """The outputs (``registry.protocols.OUTPUTS`` names) this configuration computes."""
        return {"text", "text_mask"}

    def capabilities(self) -> frozenset[str]:
        """The capabilities (``registry.protocols.Capability``) the built model declares."""
        return frozenset()

    def trained_parts(self) -> dict[str, set[str]]:
        """Each configured part (a field name) and the outputs through which it gets a gradient."""
        return {}

    def wiring_problems(self) -> list[tuple[tuple[str, ...], str]]:
        """The builder's own cross-field checks, as ``(location, message)`` (reported with the rest)."""
        return []

    @model_validator(mode="after")
    def _check_objectives(self) -> ModelConfig:
        problems: list[tuple[tuple[str, ...], str]] = []
        if not self.objectives:
            problems.append((("objectives",), "at least one objective is needed"))
        produced = self.produces()
        required: set[str] = set()
        for name, objective in self.objectives.items():
            if not _IDENTIFIER.match(name):
                problems.append((("objectives", name), "objective names must be identifiers (letters, digits, _)"))
            needs = set(getattr(type(objective), "requires", frozenset()))
            required |= needs
            for need in sorted(needs - produced):
                hint = f" (set {self.producers[need]})" if need in self.producers else ""
                problems.append((("objectives", name), f"needs {need}, which this model does not produce{hint}"))
        if self.pad_id >= self.vocab_size:
            problems.append((("pad_id",), f"{self.pad_id} is outside the vocabulary (vocab_size {self.vocab_size})"))
        problems += self.wiring_problems()
        if self.objectives and not problems:  # only once the wiring itself is sound
            for part, outputs in self.trained_parts().items():
                if outputs and not outputs & required:
                    problems.append(((part,), f"no objective trains it (none reads {' or '.join(sorted(outputs))}); "
                                              "add an objective that does, or remove the part"))
        raise_problems(type(self).__name__, problems)
        return self


class DatasetConfig(ComponentConfig):
    """Optional base of dataset configs: a dataset may say which paths it reads.

    ``vlframe eval --data PATH`` asks every registered dataset's config class for
    :meth:`from_path`; the one that accepts the path is used (several: the user is asked to
    write a dataset block instead).
    """

    @classmethod
    def from_path(cls, path: Path) -> dict[str, Any] | None:
        """The dataset block (``{"type": ..., ...}``) reading ``path``, or None if not this dataset's."""
        return None


class TaskConfig(ComponentConfig):
    """Base of evaluation tasks' configs.

    ``requires`` names the model capabilities the task needs; ``periodic`` marks a task cheap
    enough, and needing nothing but the run's validation split, to run during training's
    validation (and in sweeps whose file lists no tasks).
    """

    requires: ClassVar[frozenset[str]] = frozenset()
    periodic: ClassVar[bool] = False
    data: str | dict[str, Any] | None = Field(
        None, description="What to evaluate on: a path or dataset name as for --data, or a dataset block; "
        "none: the run's validation split.")


class ParallelConfig(ComponentConfig):
    """Base of parallel strategies' configs (``train.parallel``).

    How a run is spread is left out of its config hash (the arithmetic is the same up to float
    rounding, so a run resumes under another strategy as itself), except the settings named in
    ``changes_results`` when they differ from their defaults: a lower-precision compute or
    reduction dtype changes what is learnt, so a sweep trains such a variant again."""

    #: The strategy of configs that name none (one plugin's strategy may say so).
    default: ClassVar[bool] = False
    #: Settings that change what training computes beyond float rounding.
    changes_results: ClassVar[frozenset[str]] = frozenset()

    def result_settings(self) -> dict[str, Any]:
        """The ``changes_results`` settings that differ from their defaults (what the hash counts)."""
        fields = type(self).model_fields
        return {name: getattr(self, name) for name in sorted(type(self).changes_results)
                if name in fields and getattr(self, name) != fields[name].default}


class TrackingSinkConfig(ComponentConfig):
    """Base of tracking sinks' configs. A sink serves the tracking URIs whose scheme (the part
    before ``:``; ``""`` for a plain path) is among its ``schemes``."""

    #: URI schemes this sink serves, e.g. ``frozenset({"http", "https", "sqlite"})``.
    schemes: ClassVar[frozenset[str]] = frozenset()
    #: The sink of runs whose config names no tracking URI (one plugin's sink may say so).
    default: ClassVar[bool] = False
    #: What this sink's run ids look like (a regular expression): ``vlframe caption ID`` tells a
    #: run id from a mistyped path by it.
    run_id: ClassVar[str] = r"[A-Za-z0-9][A-Za-z0-9_\-]{7,127}"

    @classmethod
    def default_uri(cls, output_dir: Path) -> str | None:
        """The URI of a run that configures none, whose run folders go in ``output_dir`` (asked of
        the default sink only)."""
        return None

    @classmethod
    def example_uri(cls, folder: Path) -> str | None:
        """A URI of a store in the new, empty ``folder`` that this sink can create: the
        conformance kit opens a run there and reads it back (None: the kit only builds the sink)."""
        return None


#: The config base class each kind's config must subclass (from the kinds' records).
KIND_CONFIG_BASE: dict[Kind, type[ComponentConfig]] = {kind: globals()[kind.record.config_base] for kind in Kind}
