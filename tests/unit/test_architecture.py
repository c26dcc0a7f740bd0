"""The package's shape, as the design fixes it: roles never import each other, shared memory
imports nothing else of the package, no import circles, small modules, a top level that
shows the architecture. Read from the source with `ast`, so a violation fails here."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pipeline"
ROLES = ("frontend", "gpu_worker", "compositor")
MAX_LINES = 400
MAX_TOP_LEVEL_MODULES = 8


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {_module(p): p for p in PACKAGE.rglob("*.py")
            if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))}


def _imports(path: Path) -> set[str]:
    """Modules of the package `path` imports at run time (TYPE_CHECKING blocks aside)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in found if name == "pipeline" or name.startswith("pipeline.")}


SOURCES = _sources()
IMPORTS = {name: {i for i in _imports(path) if i in SOURCES} for name, path in SOURCES.items()}


def _role(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROLES else None


def test_roles_never_import_each_other() -> None:
    """No module of a role imports a module of another role."""
    crossings = sorted((m, i) for m, imports in IMPORTS.items() for i in imports
                       if _role(m) and _role(i) and _role(m) != _role(i))
    assert crossings == []


def test_the_server_never_imports_its_client_library() -> None:
    """What client and server share lives in pipeline.protocol (and synctalk, messages):
    no role imports pipeline.client."""
    users = sorted(m for m, imports in IMPORTS.items() if _role(m) and "pipeline.client" in imports)
    assert users == []


def test_shared_memory_imports_nothing_else_of_the_package() -> None:
    """pipeline.shm is self-contained: any role and tool may use it."""
    outside = sorted((m, i) for m, imports in IMPORTS.items() if m.startswith("pipeline.shm")
                     for i in imports if not i.startswith("pipeline.shm"))
    assert outside == []


def test_no_import_circles() -> None:
    """The run-time import graph of the package has no cycle."""
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(IMPORTS[node]):
            if nxt == node or (nxt.startswith(node + ".") and node in IMPORTS.get(nxt, ())):
                continue
            if state.get(nxt) == 1:
                cycle.extend([*path[path.index(nxt):], nxt] if nxt in path else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, [*path, nxt]):
                return True
        state[node] = 2
        return False

    for module in sorted(IMPORTS):
        if state.get(module) is None and visit(module, [module]):
            break
    assert cycle == []


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_no_module_over_400_lines(module: str) -> None:
    """Every source module (generated stubs aside) fits in 400 lines."""
    assert len(SOURCES[module].read_text().splitlines()) <= MAX_LINES


def test_the_top_level_shows_the_architecture() -> None:
    """At most 8 modules directly in pipeline/; the rest in folders named for what they are."""
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
