"""Configuration base classes and the typed *component slot*.

A slot is a field whose value is a mapping with a ``type`` key naming a registered component,
e.g. ``image_encoder: {type: vit, width: 768}``. Plugin config classes exist only after plugin
discovery, so a static union cannot list them; instead the slot's validator reads the catalog
from the validation context and hands the mapping to that component's own config class. Nested
errors keep their paths (``model.image_encoder.width``), and unknown fields are rejected
everywhere (``extra="forbid"``), so a misspelled key is an error rather than a silent default.
"""

from __future__ import annotations

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
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from registry.errors import did_you_mean
from registry.kinds import Kind

#: Key under which the validation context carries the :class:`~registry.catalog.Catalog`.
CONTEXT_KEY = "vlframe_catalog"
#: JSON-schema marker left on slots; ``schema`` replaces it by the registered alternatives.
SCHEMA_KIND_KEY = "x-vlframe-kind"


class ConfigModel(BaseModel):
    """Base of every vlframe config model: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ComponentConfig(ConfigModel):
    """Base of a component's config. ``type`` is the registered name that selected it."""

    type: str = Field(description="Registered name of the component.")


class ObjectiveConfig(ComponentConfig):
    """Base of objective configs: each objective is weighted and declares the model outputs it reads."""

    weight: float = Field(1.0, ge=0.0, allow_inf_nan=False, description="Multiplier of this loss in the total.")
    #: Model outputs this objective reads (e.g. ``image_embeds``); a model builder checks them.
    requires: ClassVar[frozenset[str]] = frozenset()


#: The config base class each kind's config must subclass.
KIND_CONFIG_BASE: dict[Kind, type[ComponentConfig]] = {kind: ComponentConfig for kind in Kind}
KIND_CONFIG_BASE[Kind.OBJECTIVE] = ObjectiveConfig


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
        if not isinstance(value, Mapping):
            raise PydanticCustomError(
                "vlframe_not_a_component",
                "expected a mapping with a 'type' key naming {kind}; registered: {names}",
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
                "vlframe_unknown_component",
                "unknown {kind} '{name}'{hint}; registered: {names}",
                {
                    "kind": kind.label,
                    "name": str(name),
                    "hint": did_you_mean(str(name), names),
                    "names": catalog.describe(kind),
                },
            )
        config_cls = catalog.get(kind, name).spec.config
        return config_cls.model_validate(dict(value), context=info.context)

    return validate


def component(kind: Kind) -> Any:
    """Type of a field holding one component of ``kind``, chosen by its ``type`` key.

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
