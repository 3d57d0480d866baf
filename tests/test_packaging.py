"""What pip installs: one top-level package, and layers whose imports only point down."""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import shutil
import subprocess
import sys
import zipfile

REPO = pathlib.Path(__file__).resolve().parent.parent

# Each layer may import its own modules and those of lower layers, never a higher
# or a sibling layer; the command line sits on top and nothing imports it.
LAYERS = {
    "imgembed": 0,  # the version string
    "imgembed.common": 0,
    "imgembed.transforms": 1,
    "imgembed.models": 2,
    "imgembed.pipelines": 3,
    "imgembed.index": 3,
    "imgembed.service": 4,
    "imgembed.cli": 5,
    "imgembed.console": 5,
    "imgembed.watch": 5,
}
# The command line's edge: the dispatcher, the console (logging, progress bars), and
# `imgembed watch`, which runs the embed job and index updates in turn.
EDGE = ("imgembed.cli", "imgembed.console", "imgembed.watch")


def test_the_wheel_installs_one_top_level_package_with_its_data(tmp_path):
    # Built from a copy of the tracked files: setuptools leaves build/ where it builds.
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in tracked.stdout.split():
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("imgembed-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if ".dist-info" not in name.split("/")[0]} == {"imgembed"}
    for package in ("pipelines", "transforms", "index", "models", "service", "common"):
        assert f"imgembed/{package}/__init__.py" in names, package
    assert {"imgembed/service/page.html", "imgembed/models/imagenet_labels.txt"} <= set(names)
    assert not [name for name in names if name.startswith(("imgembed/tests", "imgembed/fixtures"))]


def installed_modules() -> dict[str, pathlib.Path]:
    """Every module of the installed package, by dotted name, wherever pip mapped it."""
    modules = {}
    for package in [name for name in LAYERS if name not in EDGE]:
        spec = importlib.util.find_spec(package)
        for folder in spec.submodule_search_locations:
            for path in pathlib.Path(folder).glob("*.py"):
                name = package if path.stem == "__init__" else f"{package}.{path.stem}"
                modules[name] = path
    for edge in EDGE:
        modules[edge] = pathlib.Path(importlib.util.find_spec(edge).origin)
    return modules


def imports_of(path: pathlib.Path, known: set[str]) -> set[str]:
    """The package's modules a file imports, at any depth (function-level imports too:
    a circle through a lazy import is still a circle)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def layer_of(module: str) -> str:
    layer = max((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), key=len)
    return "edge" if layer in EDGE else layer


def import_graph() -> dict[str, set[str]]:
    modules = installed_modules()
    graph = {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}
    # "from imgembed.models import tflite" names the package and the module: keep the module.
    return {
        name: {t for t in targets if not any(o.startswith(t + ".") for o in targets)}
        for name, targets in graph.items()
    }


def test_no_library_module_imports_the_command_line_or_a_higher_layer():
    wrong = []
    for module, targets in import_graph().items():
        for target in targets:
            own, other = layer_of(module), layer_of(target)
            rank = LAYERS | {"edge": LAYERS["imgembed.cli"]}
            if rank[other] > rank[own] or (rank[other] == rank[own] and own != other):
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_no_import_circle():
    graph = import_graph()
    # Tarjan's strongly connected components: a circle is a component of two or more.
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not circles, circles


def test_nothing_installed_imports_tests_or_fixtures():
    for module, path in installed_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not [n for n in names if n.split(".")[0] in ("tests", "fixtures")], module
