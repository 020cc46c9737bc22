"""The extension's CMake files list every file the installed extension needs, and only existing files.

Slicer installs exactly what `SCRIPTS` / `RESOURCES` list: a Python file missing from the list works
from the source tree and breaks in the packaged extension. When a test here fails, its message gives
the lines to paste into the CMakeLists.txt it names.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULES = ["MedDINOv3Segment", "MedDINOv3Train"]
IGNORED_PARTS = {"__pycache__", ".pytest_cache"}


def cmake_lists(path: Path) -> dict[str, list[str]]:
    """`set(NAME item item ...)` blocks of a CMake file, with `${VAR}` of earlier single-value sets expanded."""
    text = re.sub(r"#[^\n]*", "", path.read_text(encoding="utf-8"))
    variables: dict[str, list[str]] = {}
    for match in re.finditer(r"\bset\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)([^)]*)\)", text, flags=re.IGNORECASE):
        name, body = match.group(1), match.group(2)
        items = [item.strip('"') for item in body.split()]
        expanded = []
        for item in items:
            for var, values in variables.items():
                if len(values) == 1:
                    item = item.replace("${" + var + "}", values[0])
            expanded.append(item)
        variables[name] = expanded
    return variables


def files_under(folder: Path, suffix: str | None = None, exclude_dirs: tuple[str, ...] = ()) -> set[str]:
    """Paths (posix, relative to `folder`) of the files under `folder`."""
    found = set()
    if not folder.is_dir():
        return found
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if not path.is_file() or IGNORED_PARTS & set(relative.parts) or path.suffix == ".pyc":
            continue
        if relative.parts[0] in exclude_dirs:
            continue
        if suffix is None or path.name.endswith(suffix):
            found.add(relative.as_posix())
    return found


def check_listing(cmake_file: Path, variable: str, listed: list[str], expected: set[str], base: Path, template: str = "{}") -> list[str]:
    """Problems: files on disk not listed (with the lines to add), listed files that do not exist."""
    problems = []
    missing = sorted(expected - set(listed))
    if missing:
        lines = "\n".join("  " + template.format(path) for path in missing)
        problems.append(f"Add to {variable} in {cmake_file.relative_to(REPO)}:\n{lines}")
    absent = sorted(path for path in listed if not (base / path).is_file())
    if absent:
        lines = "\n".join("  " + template.format(path) for path in absent)
        problems.append(f"Listed in {variable} of {cmake_file.relative_to(REPO)} but not on disk (create or remove):\n{lines}")
    duplicates = sorted({path for path in listed if listed.count(path) > 1})
    if duplicates:
        problems.append(f"Listed twice in {variable} of {cmake_file.relative_to(REPO)}: {duplicates}")
    return problems


class _Template:
    """Formats a path the way the module CMakeLists writes it (`${MODULE_NAME}` for the module name)."""

    def __init__(self, module: str):
        self.module = module

    def format(self, path: str) -> str:
        return path.replace(self.module, "${MODULE_NAME}")


@pytest.mark.parametrize("module", MODULES)
def test_module_scripts_are_listed(module):
    cmake_file = REPO / module / "CMakeLists.txt"
    variables = cmake_lists(cmake_file)
    assert variables.get("MODULE_NAME") == [module]
    expected = files_under(REPO / module, ".py", exclude_dirs=("Testing", "Resources"))
    problems = check_listing(
        cmake_file, "MODULE_PYTHON_SCRIPTS", variables["MODULE_PYTHON_SCRIPTS"], expected, REPO / module, _Template(module)
    )
    assert not problems, "\n\n".join(problems)


@pytest.mark.parametrize("module", MODULES)
def test_module_resources_are_listed(module):
    cmake_file = REPO / module / "CMakeLists.txt"
    variables = cmake_lists(cmake_file)
    expected = {"Resources/" + path for path in files_under(REPO / module / "Resources")}
    problems = check_listing(
        cmake_file, "MODULE_PYTHON_RESOURCES", variables["MODULE_PYTHON_RESOURCES"], expected, REPO / module, _Template(module)
    )
    assert not problems, "\n\n".join(problems)


def test_core_package_is_listed():
    cmake_file = REPO / "CMakeLists.txt"
    variables = cmake_lists(cmake_file)
    scripts = {"meddinov3/" + path for path in files_under(REPO / "meddinov3", ".py")}
    problems = check_listing(
        cmake_file, "MEDDINOV3_CORE_PYTHON_SCRIPTS", variables["MEDDINOV3_CORE_PYTHON_SCRIPTS"], scripts, REPO, "{}"
    )
    # Package data (non-Python files inside meddinov3/) and the shared Resources/ the core reads at run time
    # (model manifest, terminology...; not the icons, screenshots or READMEs) ship as resources.
    resources = {"meddinov3/" + path for path in files_under(REPO / "meddinov3") if not path.endswith(".py")}
    resources |= {
        "Resources/" + path
        for path in files_under(REPO / "Resources", exclude_dirs=("Icons", "Screenshots"))
        if not path.endswith(".md")
    }
    problems += check_listing(
        cmake_file, "MEDDINOV3_CORE_PYTHON_RESOURCES", variables["MEDDINOV3_CORE_PYTHON_RESOURCES"], resources, REPO, "{}"
    )
    assert not problems, "\n\n".join(problems)


def test_top_level_cmake_follows_the_extension_template():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    variables = cmake_lists(REPO / "CMakeLists.txt")
    assert re.search(r"^project\(MedDINOv3\)", text, flags=re.MULTILINE)
    for name in [
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
        "EXTENSION_DEPENDS",
    ]:
        assert variables.get(name), f"{name} is not set"
    assert variables["EXTENSION_CATEGORY"] == ["Segmentation"]
    assert variables["EXTENSION_DEPENDS"] == ["PyTorch"]
    order = [
        "find_package(Slicer REQUIRED)",
        "include(${Slicer_USE_FILE})",
        *[f"add_subdirectory({module})" for module in MODULES],
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
        "include(${Slicer_EXTENSION_CPACK})",
    ]
    positions = [text.find(statement) for statement in order]
    assert all(p >= 0 for p in positions), [s for s, p in zip(order, positions) if p < 0]
    assert positions == sorted(positions), "statements out of the template's order"
    raw = "https://raw.githubusercontent.com/MedDINOv3/SlicerMedDINOv3/main/"
    for name in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):  # the catalogue links files of this repository
        for url in variables[name]:
            assert url.startswith(raw) and (REPO / url[len(raw):]).is_file(), f"{name}: {url} is not in the repository"


@pytest.mark.parametrize("module", MODULES)
def test_module_cmake_builds_a_scripted_module_with_tests(module):
    text = re.sub(r"#[^\n]*", "", (REPO / module / "CMakeLists.txt").read_text(encoding="utf-8"))
    call = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, flags=re.DOTALL)
    assert call, "slicerMacroBuildScriptedModule missing"
    arguments = call.group(1).split()
    for expected in ["NAME", "${MODULE_NAME}", "SCRIPTS", "${MODULE_PYTHON_SCRIPTS}", "RESOURCES", "${MODULE_PYTHON_RESOURCES}", "WITH_GENERIC_TESTS"]:
        assert expected in arguments
    testing = re.search(r"if\(BUILD_TESTING\)(.*?)endif\(\)", text, flags=re.DOTALL)
    assert testing and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in testing.group(1)
    variables = cmake_lists(REPO / module / "CMakeLists.txt")
    assert f"{module}.py" in variables["MODULE_PYTHON_SCRIPTS"]
    assert f"Resources/Icons/{module}.png" in variables["MODULE_PYTHON_RESOURCES"]
    assert f"Resources/UI/{module}.ui" in variables["MODULE_PYTHON_RESOURCES"]


def test_cmake_parser_expands_module_name(tmp_path):
    cmake_file = tmp_path / "CMakeLists.txt"
    cmake_file.write_text("set(MODULE_NAME Foo)\nset(MODULE_PYTHON_SCRIPTS\n  ${MODULE_NAME}.py # main\n  ${MODULE_NAME}Lib/a.py\n  )\n")
    assert cmake_lists(cmake_file)["MODULE_PYTHON_SCRIPTS"] == ["Foo.py", "FooLib/a.py"]
    assert _Template("Foo").format("FooLib/a.py") == "${MODULE_NAME}Lib/a.py"


def test_checkout_modules_find_the_core_package(tmp_path):
    """Slicer run from a checkout puts only the module folders on sys.path ("Additional module paths"): the modules'
    helpers must still reach `meddinov3` and hand it to their child processes. Python runs with -S and the
    site-packages folder added without its .pth files, so the editable install of this test environment is not seen."""
    import subprocess
    import sys
    import sysconfig

    code = f"""
import importlib.util, sys
sys.path[:0] = [{str(REPO / 'MedDINOv3Segment')!r}, {str(REPO / 'MedDINOv3Train')!r}]
sys.path.append({sysconfig.get_paths()['purelib']!r})
assert importlib.util.find_spec('meddinov3') is None, 'the core package is visible without the modules'
import MedDINOv3TrainLib.logic  # loads without the core package (Train may load before Segment)
from MedDINOv3SegmentLib.worker import child_environment
import meddinov3.files
print(meddinov3.files.__file__)
print(child_environment()['PYTHONPATH'])
"""
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    module_file, pythonpath = out.stdout.split("\n")[:2]
    assert Path(module_file).resolve() == REPO / "meddinov3" / "files.py"
    assert str(REPO) in pythonpath.split(":")


def test_code_slicer_runs_keeps_to_python_39():
    """Slicer 5.8 embeds Python 3.9, and runs both the modules and the core package (the modules' child processes
    are `PythonSlicer -m meddinov3.cli`): no 3.10 syntax, and `X | Y` annotations only where
    `from __future__ import annotations` keeps them unevaluated. The parameter node classes are excepted from that
    too: parameterNodeWrapper evaluates their annotations with get_type_hints."""
    import ast

    problems = []
    paths = sorted((REPO / "meddinov3").rglob("*.py")) + [p for m in MODULES for p in sorted((REPO / m).rglob("*.py"))]
    for path in paths:
        name = path.relative_to(REPO)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(name), feature_version=(3, 9))
        except SyntaxError as e:
            problems.append(f"{name}:{e.lineno}: {e.msg}")
            continue
        postponed = any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
                        and any(a.name == "annotations" for a in n.names) for n in tree.body)
        wrapped = {id(n) for c in ast.walk(tree) if isinstance(c, ast.ClassDef)
                   and any("parameterNodeWrapper" in ast.unparse(d) for d in c.decorator_list) for n in ast.walk(c)}
        for node in ast.walk(tree):
            annotations = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                annotations = [node.returns] + [a.annotation for a in ast.walk(node.args) if isinstance(a, ast.arg)]
            elif isinstance(node, ast.AnnAssign):
                annotations = [node.annotation]
            for annotation in filter(None, annotations):
                union = any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(annotation))
                if union and (not postponed or id(node) in wrapped):
                    problems.append(f"{name}:{annotation.lineno}: '{ast.unparse(annotation)}' is evaluated on "
                                    f"Python 3.9: use Optional/Union")
    assert paths and not problems, "\n".join(problems)
