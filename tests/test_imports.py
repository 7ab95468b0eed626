"""The import structure: layers that import only downwards, no cycles, and every module importable first.

Layers, lowest first: common/ (errors, progress bars, signals, full disks, atomic writes: they import
nothing else of the project), configs/, data/, models/, tasks/ (the Luigi tasks), pipeline/ (the entry
module `luigi --module pipeline`, which only imports the task modules). A module may import its own
layer and the ones below it, never one above: so reading a run (data.runs) or a recipe never loads
Luigi or registers a task.
"""

import ast
import concurrent.futures
import json
import subprocess
import sys

from conftest import REPO

LAYERS = ["common", "configs", "data", "models", "tasks", "pipeline"]
WITHOUT_LUIGI = ("common", "configs", "data", "models")


def project_modules() -> list[str]:
    names = []
    for layer in LAYERS:
        for path in sorted((REPO / layer).glob("*.py")):
            names.append(layer if path.stem == "__init__" else f"{layer}.{path.stem}")
    return names


def imports_of(module: str) -> list[tuple[str, int]]:
    """(project module or package imported, line) for every import in `module`'s file, inside functions too."""
    parts = module.split(".")
    path = REPO / parts[0] / ("__init__.py" if len(parts) == 1 else f"{parts[1]}.py")
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from data import runs` imports the module data.runs; `from data.runs import Run` the module data.runs.
            found += [(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module, node.lineno)
                      for alias in node.names]
    return [(name, line) for name, line in found if name.split(".")[0] in LAYERS]


MODULES = set(project_modules())


def test_every_layer_imports_only_itself_and_the_layers_below():
    upward = []
    for module in sorted(MODULES):
        for imported, line in imports_of(module):
            if LAYERS.index(imported.split(".")[0]) > LAYERS.index(module.split(".")[0]):
                upward.append(f"{module}:{line} imports {imported}")
            if module.startswith("common") and not imported.startswith("common"):
                upward.append(f"{module}:{line} imports {imported}: common/ imports nothing else of the project")
    assert upward == []


def test_no_import_cycles_even_through_imports_inside_functions():
    graph = {module: {name for name, _ in imports_of(module) if name in MODULES and name != module} for module in MODULES}
    cycles, done, path = [], set(), []

    def visit(module):
        if module in path:
            cycles.append(" -> ".join(path[path.index(module):] + [module]))
            return
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert cycles == []


PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def import_alone(module: str) -> tuple[str, subprocess.CompletedProcess]:
    return module, subprocess.run([sys.executable, "-c", PROBE, module], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_every_module_imports_first_in_a_fresh_interpreter_and_the_lower_layers_never_load_luigi():
    # One interpreter per module: a cycle shows only when a module of it is the first one imported.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(import_alone, sorted(MODULES)))
    failed = {m: r.stderr.strip().splitlines()[-1] for m, r in results.items() if r.returncode != 0}
    assert failed == {}
    for module, result in results.items():
        loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
        layer = module.split(".")[0]
        above = {name for name in LAYERS[LAYERS.index(layer) + 1 :] if name in loaded}
        assert above == set(), f"importing {module} loaded {sorted(above)}"
        if layer in WITHOUT_LUIGI:
            assert "luigi" not in loaded, f"importing {module} loaded luigi"

