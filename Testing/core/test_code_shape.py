"""The shape the code keeps (issue 17): short functions, imports that point one way.

These read the source with `ast`, so they check the checkout as committed: a new 200-line pipeline function, a Lib that
imports its module file, or a core module that reaches into the CLI fails here with the offending names.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# package name -> folder, for the three packages whose structure the README's architecture section describes
PACKAGES = {
    "meddinov3": REPO / "meddinov3",
    "MedDINOv3SegmentLib": REPO / "MedDINOv3Segment" / "MedDINOv3SegmentLib",
    "MedDINOv3TrainLib": REPO / "MedDINOv3Train" / "MedDINOv3TrainLib",
}
MODULE_FILES = {"MedDINOv3Segment": REPO / "MedDINOv3Segment" / "MedDINOv3Segment.py",
                "MedDINOv3Train": REPO / "MedDINOv3Train" / "MedDINOv3Train.py"}
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages and the two module files."""
    modules = dict(MODULE_FILES)
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _imported_names(name: str, path: Path) -> set[str]:
    """Every absolute module name `name` imports, lazy imports inside functions included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _project_module(imported: str) -> str | None:
    """The project module an imported name belongs to (`meddinov3.files.read_json` -> `meddinov3.files`)."""
    while imported and imported not in MODULES:
        imported = imported.rpartition(".")[0]
    return imported or None


def _import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        targets = {_project_module(imported) for imported in _imported_names(name, path)}
        # a package's own parent (`meddinov3` from `meddinov3.files`) is not an edge: importing a submodule runs it
        graph[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert _cycles(_import_graph()) == []


def test_nothing_imports_the_cli():
    offenders = [f"{name} -> {target}" for name, targets in _import_graph().items() for target in targets
                 if target.startswith("meddinov3.cli") and not name.startswith("meddinov3.cli")]
    assert offenders == []


def test_libs_never_import_their_module_file():
    offenders = [f"{name} -> {target}" for name, targets in _import_graph().items() for target in targets
                 if target in MODULE_FILES and name != target]
    assert offenders == []


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_functions_fit_on_a_screen(package):
    long = []
    for path in PACKAGES[package].rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
