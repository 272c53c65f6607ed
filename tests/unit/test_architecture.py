"""The tree keeps its shape: no sample or tools in the engine, and no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "sagas"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """Modules imported by ``path``; with ``top_level_only``, those run at import time.

    Imports under ``if TYPE_CHECKING:`` and inside functions are left out of the top level.
    """
    tree = ast.parse(path.read_text())
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" \
        else _module_name(path)
    nodes: list[ast.AST] = []
    if top_level_only:
        for node in tree.body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
                continue
            nodes.append(node)
    else:
        nodes = list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        for sub in ast.walk(node) if not top_level_only else [node]:
            if isinstance(sub, ast.Import):
                found.update(a.name for a in sub.names)
            elif isinstance(sub, ast.ImportFrom):
                base = sub.module or ""
                if sub.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - sub.level + 1]
                                    + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in sub.names)
    return found


def _engine_modules() -> dict[str, Path]:
    return {
        _module_name(p): p for p in ENGINE.rglob("*.py")
        if "migrations" not in p.parts
    }


def test_the_engine_imports_nothing_of_the_sample_the_tools_or_the_tests():
    for name, path in _engine_modules().items():
        roots = {i.split(".")[0] for i in _imports(path, top_level_only=False)}
        assert not roots & {"tasks", "config", "bench", "tests", "examples"}, name


def test_the_engine_has_no_import_cycles():
    modules = _engine_modules()
    graph = {
        name: {i for i in _imports(path, top_level_only=True) if i in modules and i != name}
        for name, path in modules.items()
    }
    # A package's __init__ that re-exports (sagas) is the API, not a layer: leave it out.
    graph = {n: {d for d in deps if d != "sagas"} for n, deps in graph.items() if n != "sagas"}
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        seen[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if seen.get(dep) == 1:
                cycle = [*stack[stack.index(dep):], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in seen:
                visit(dep)
        stack.pop()
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node)


def test_the_listener_registry_imports_no_listener_and_the_store_no_relay():
    modules = _engine_modules()
    registry = _imports(modules["sagas.observe.listeners"], top_level_only=False)
    assert not registry & {"sagas.observe.metrics", "sagas.observe.tracing"}
    store = _imports(modules["sagas.store.sql"], top_level_only=False)
    assert not {i for i in store if i.startswith("sagas.runtime")}


def test_only_the_ops_subpackage_needs_the_web_extra():
    for name, path in _engine_modules().items():
        if name.startswith("sagas.ops.") and name not in ("sagas.ops.cli", "sagas.ops.audit"):
            continue
        roots = {i.split(".")[0] for i in _imports(path, top_level_only=True)}
        assert not roots & {"fastapi", "starlette", "uvicorn", "flower"}, name
