"""The package's modules import only downwards: the schemas (``config.py``) know nothing of the
parts, the parts nothing of the tasks, and nothing below the engine imports the engine. Every import
counts, including those deferred into functions."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "interconnects"

#: a module's layer by its place in the package; a module imports only from its own layer or below
LAYERS = {"config": 0, "checks": 1, "contracts": 1, "graph": 1, "data": 1, "models": 2, "tasks": 3, "engine": 4}
TOP_LEVEL = 1  # the interconnects themselves (grid.py, knn.py, ...): beside the graph they build


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return TOP_LEVEL
    return LAYERS.get(parts[1], TOP_LEVEL)


def _runtime_nodes(tree):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (imports for annotations
    only, never executed)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", None)) == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _imports(path: Path) -> set[str]:
    """The package's own modules imported by the file at ``path`` (absolute names)."""
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "interconnects")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] != "interconnects":
                continue
            found.add(name)
            # ``from . import distributed`` names a submodule
            found.update(f"{name}.{a.name}" for a in node.names
                         if (PACKAGE.parent / (f"{name}.{a.name}".replace(".", "/") + ".py")).is_file())
    return found


def _all_modules():
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_imports_run_downwards_only():
    upward = []
    for name, path in _all_modules().items():
        if name == "interconnects":  # the package's lazy table of public names
            continue
        for target in _imports(path):
            if _layer(target) > _layer(name):
                upward.append(f"{name} imports {target}")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(upward))


def test_config_imports_nothing_of_the_package():
    assert not _imports(PACKAGE / "config.py")


def test_no_import_cycles():
    modules = _all_modules()
    graph = {name: {t for t in _imports(path) if t in modules and t != name}
             for name, path in modules.items() if name != "interconnects"}
    graph = {n: {t for t in ts if t != "interconnects" and not n.startswith(t + ".")} for n, ts in graph.items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(" → ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
