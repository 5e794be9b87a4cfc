"""The architecture's rules, checked on the source: the engine names no plugin and reads no CoCa
attribute; evaluation and inference never import training; built-in plugins import only the
contract and the SDK, as a third-party package would."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import ROOT

ENGINE = ROOT / "vlframe"
BUILTINS = ROOT / "vlframe_builtins"

#: CoCa's attribute names, as an engine module would read them (``model.caption_pooler``).
COCA_ATTRIBUTES = re.compile(r"\.(caption_pooler|contrastive_pooler|multimodal_decoder|text_projection|"
                             r"image_projection|image_encoder|text_decoder|lm_head)\b|DECODER_PARTS")
#: Registered names that are also ordinary words the engine uses for its own things: the `vlframe
#: caption` command and a batch's "caption" field, the learning-rate schedule "linear", "none" in messages.
ORDINARY_WORDS = {"caption", "linear", "none", "mean", "cls"}


def _engine_files() -> list[Path]:
    return sorted(p for p in ENGINE.rglob("*.py"))


def _code(path: Path) -> str:
    """The module's code without comments and docstrings (they may mention anything)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def test_the_engine_reads_no_coca_attribute() -> None:
    found = [(p.relative_to(ROOT), m.group(0)) for p in _engine_files() for m in COCA_ATTRIBUTES.finditer(_code(p))]
    assert found == []


def test_the_engine_names_no_plugin(registry) -> None:
    names = {e.spec.name for e in registry.catalog.entries()} - ORDINARY_WORDS
    assert {"sentencepiece", "synthetic", "imagefolder", "manifest", "coco", "attentional", "mlp", "vit",
            "causal_text", "retrieval", "zeroshot"} <= names
    found = []
    for path in _engine_files():  # a string that is a plugin's name: {"type": "synthetic"}, "sentencepiece"
        strings = {node.value for node in ast.walk(ast.parse(_code(path))) if isinstance(node, ast.Constant)
                   and isinstance(node.value, str)}
        found += [(str(path.relative_to(ROOT)), s) for s in sorted(strings & names)]
    assert found == []


def _imports(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def test_evaluation_and_inference_never_import_training() -> None:
    found = [(str(p.relative_to(ROOT)), m) for folder in ("evaluation", "inference")
             for p in (ENGINE / folder).rglob("*.py") for m in _imports(p) if m.startswith("vlframe.training")]
    assert found == []


def test_the_engine_never_imports_a_built_in_plugin() -> None:
    found = [(str(p.relative_to(ROOT)), m) for p in _engine_files() for m in _imports(p)
             if m.startswith("vlframe_builtins")]
    assert found == []


def test_built_in_plugins_import_only_the_contract_and_the_sdk() -> None:
    found = []
    for path in sorted(BUILTINS.rglob("*.py")):
        for module in _imports(path):
            if module.startswith("vlframe") and not module.startswith(("vlframe.sdk", "vlframe_builtins")):
                found.append((str(path.relative_to(ROOT)), module))
    assert found == []


def test_the_registry_depends_only_on_pluggy_and_pydantic() -> None:
    allowed = {"pluggy", "pydantic", "pydantic_core", "registry"}
    found = []
    for path in sorted((ROOT / "registry").rglob("*.py")):
        for module in _imports(path):
            top = module.split(".")[0]
            if top not in allowed and top not in __import__("sys").stdlib_module_names:
                found.append((str(path.relative_to(ROOT)), module))
    assert found == []


def _import_graph(package: Path, root: Path = ROOT) -> dict[str, set[str]]:
    """Every module of ``package`` and the modules of the same package it imports: at the top and
    inside functions alike (an import deferred for speed is still a dependency)."""

    def name_of(path: Path) -> str:
        parts = list(path.relative_to(root).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    files = {name_of(p): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for name in names:
                while name and name not in files:  # the module itself, or the one its name lives in
                    name = name.rpartition(".")[0]
                if name and name not in (module, package.name):
                    graph[module].add(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize("package", ["vlframe", "registry", "vlframe_builtins"])
def test_no_import_cycles(package: str) -> None:
    graph = _import_graph(ROOT / package)
    assert len(graph) > 5
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import f\n")
    (package / "b.py").write_text("def f():\n    from pkg import a\n    return a\n")
    (package / "c.py").write_text("from . import a\n")
    assert _cycles(_import_graph(package, root=tmp_path)) == [["pkg.a", "pkg.b"]]
