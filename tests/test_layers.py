"""Layers, enforced: core <- runtimes <- exporters / fidelity / batch <- CLI (issue 13, item 5).

Imports are read from the source (module level and inside functions alike: a lazy import
is still a dependency), so a violation fails here before it ships.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The package-format core: what a deployment host needs to read and check a package.
CORE = {"packager.errors", "packager.signature", "packager.manifest", "packager.package",
        "packager.digests", "packager.versions", "packager.registry", "packager.archive", "packager.safe_pickle",
        "packager.signing", "packager.atomic", "packager.options"}


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for d in ("packager", "runtimes") for p in (ROOT / d).rglob("*.py")}


def _resolve(module: str | None, level: int, importer: str, is_package: bool) -> str | None:
    if not level:
        return module
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


@lru_cache(maxsize=None)
def imports(name: str, top_level_only: bool = False) -> frozenset[str]:
    """Project modules ``name`` imports (``from a import b`` counts a.b when b is a module)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    if top_level_only:
        nodes = [n for n in tree.body if not (isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))]
        nodes = [n for node in nodes for n in ast.walk(node)
                 if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        # ast.walk above still descends into function bodies via their parents; filter those out.
        inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}
        nodes = [n for n in nodes if id(n) not in inside]
    else:
        nodes = list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(node.module, node.level, name, path.name == "__init__.py")
            if module:
                found.add(module)
                found |= {f"{module}.{a.name}" for a in node.names}
    return frozenset(m for m in found if m in MODULES and m != name)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n in CORE))
def test_the_core_imports_only_the_core(name: str) -> None:
    assert not imports(name) - CORE, f"{name} imports tooling: {sorted(imports(name) - CORE)}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.split(".")[0] == "runtimes"))
def test_runtimes_import_only_the_core_and_runtimes(name: str) -> None:
    outside = {m for m in imports(name) if m not in CORE and m.split(".")[0] != "runtimes"}
    assert not outside, f"{name} imports {sorted(outside)}"


def test_the_facade_imports_nothing_until_asked() -> None:
    """``import packager`` (and ``packager --help``) costs no import: the API is resolved lazily."""
    assert not imports("packager", top_level_only=True)


def test_only_the_entry_point_imports_the_cli() -> None:
    users = sorted(n for n in MODULES if "packager.cli" in imports(n) and n != "packager.__main__")
    assert not users


def test_no_import_cycles_at_module_level() -> None:
    graph = {n: imports(n, top_level_only=True) for n in MODULES}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles


def test_no_import_cycles_in_the_core_even_inside_functions() -> None:
    """The core's readers (archive, signing) never import the package that opens them; the
    writers that need both (pack, unpack, sign) live above, in packager/packing.py."""
    graph = {n: imports(n) & CORE for n in CORE}
    cycles = [[a, b] for a in sorted(graph) for b in sorted(graph[a]) if _reaches(graph, b, a)]
    assert not cycles


def _reaches(graph: dict[str, frozenset[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return False


@pytest.mark.parametrize("helper", ["find_state", "first_line"])
def test_shared_helpers_are_defined_once(helper: str) -> None:
    """Clones drift (the torch and Paddle checkpoint readers did): one definition each."""
    where = [n for n, p in MODULES.items() for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
             if isinstance(node, ast.FunctionDef) and node.name in (helper, f"_{helper}")]
    assert len(where) == 1, where


RENDERERS = sorted(n for n in MODULES if n.startswith("packager.fidelity.report_"))


@pytest.mark.parametrize("name", RENDERERS)
def test_renderers_read_the_report_models_not_the_orchestrator(name: str) -> None:
    """The text, JUnit and HTML writers import packager.fidelity.report (type hints included),
    never packager.verifying, which runs the artifacts."""
    assert "packager.verifying" not in imports(name)
    assert "packager.fidelity.report" in imports(name)


def test_there_are_renderers_to_check() -> None:
    assert set(RENDERERS) >= {"packager.fidelity.report_text", "packager.fidelity.report_junit",
                              "packager.fidelity.report_html"}
