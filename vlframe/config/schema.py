"""JSON Schema of a config file, covering every registered component (for editor completion).

pydantic renders each component slot as a marker (``{"x-vlframe-kind": "pooler"}``); here every
marker becomes an ``anyOf`` over the registered components of that kind, each of which pins its
``type`` to its registered name.

The schema describes one *file*, which may be a partial file that ``extends`` another: no field
is required, and ``null`` is accepted wherever a component goes (it removes an inherited one).
Required fields are checked by ``vlframe config validate``, on the composed config.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from registry import Catalog, Kind
from registry.config import SCHEMA_KIND_KEY
from vlframe.config.root import VlframeConfig


def _model_schema(model: type[BaseModel], defs: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/$defs/{model}")
    for name, sub in schema.pop("$defs", {}).items():
        defs.setdefault(name, sub)
    return schema


def config_schema(catalog: Catalog, root: type[BaseModel] = VlframeConfig) -> dict[str, Any]:
    """The JSON Schema of ``root`` with every slot expanded to the components in ``catalog``."""
    defs: dict[str, Any] = {}
    schema = _model_schema(root, defs)
    for entry in catalog.entries():
        key = f"{entry.kind.value}.{entry.spec.name}"
        sub = _model_schema(entry.spec.config, defs)
        sub["title"] = f"{entry.kind.label} '{entry.spec.name}'"
        sub["description"] = f"{entry.spec.summary} [{entry.source}]"
        sub["properties"]["type"] = {"const": entry.spec.name, "description": "Registered component name."}
        defs[key] = sub

    def expand(node: Any) -> Any:
        if isinstance(node, dict):
            if SCHEMA_KIND_KEY in node:
                kind = Kind(node[SCHEMA_KIND_KEY])
                refs = [{"$ref": f"#/$defs/{kind.value}.{name}"} for name in catalog.names(kind)]
                refs.append({"type": "null"})
                return {"anyOf": refs, "description": f"{kind.article.capitalize()}, chosen by its 'type'."}
            # "required" lists go: a file that extends another may leave any field out.
            return {k: expand(v) for k, v in node.items() if not (k == "required" and isinstance(v, list))}
        if isinstance(node, list):
            return [expand(v) for v in node]
        return node

    schema = expand(schema)
    schema["properties"]["extends"] = {
        "description": "File(s) this one inherits from, relative to this file.",
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
    }
    schema["$defs"] = expand(defs)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
