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
    """Every module and package of the layers, subpackages included (models/load/loading.py: models.load.loading)."""
    names = []
    for layer in LAYERS:
        for path in sorted((REPO / layer).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def module_path(module: str):
    path = REPO.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imports_of(module: str) -> list[tuple[str, int]]:
    """(project module or package imported, line) for every import in `module`'s file, inside functions too."""
    path = module_path(module)
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



# models/ by stage (models/__init__.py says why): the stages each stage may import besides itself and the shared
# modules beside them, which import no stage. Judging never trains, training never generates or judges.
MODEL_STAGES = {
    "load": set(),
    "generate": {"load"},
    "judge": {"load", "generate"},
    "evaluate": {"load", "generate", "judge"},
    "train": {"load"},
}
SHARED_MODEL_MODULES = {"models", "models.logps", "models.padding", "models.packing"}
# Short commands kept at the top of models/, each running one stage's module (`python -m models.fetch NAME`).
MODEL_COMMANDS = {"models.fetch": "load"}


def stage_of(module: str) -> str | None:
    if module in MODEL_COMMANDS:
        return MODEL_COMMANDS[module]
    parts = module.split(".")
    return parts[1] if parts[0] == "models" and len(parts) > 1 and parts[1] in MODEL_STAGES else None


def test_every_model_module_belongs_to_a_stage_or_is_declared_shared():
    loose = sorted(m for m in MODULES if m.startswith("models") and stage_of(m) is None and m not in SHARED_MODEL_MODULES)
    assert loose == [], "a module of models/ outside the stage packages: move it into one, or add it to SHARED_MODEL_MODULES"


def test_each_model_stage_imports_only_the_stages_it_builds_on():
    crossing = []
    for module in sorted(m for m in MODULES if m.startswith("models")):
        stage = stage_of(module)
        allowed = set() if stage is None else MODEL_STAGES[stage] | {stage}
        for imported, line in imports_of(module):
            other = stage_of(imported)
            if other is not None and other not in allowed:
                crossing.append(f"{module}:{line} imports {imported} (stage {other})")
    assert crossing == []


def test_the_installed_package_list_holds_every_package():
    # setup.cfg names its packages one by one: a subpackage left out is missing from a non-editable install.
    # Read as setuptools reads it when it builds the wheel.
    from setuptools.config.setupcfg import read_configuration

    listed = set(read_configuration(REPO / "setup.cfg")["options"]["packages"])
    on_disk = {".".join(path.parent.relative_to(REPO).parts) for layer in [*LAYERS, "notebooks"]
               for path in (REPO / layer).rglob("__init__.py")}
    assert listed == on_disk
