"""The documentation stays true: every relative link in README.md, bench/README.md and docs/ resolves (the file, and the
heading an #anchor names), and the commands the pages show exist: each `python -m X` module imports, each
recipe they name is a recipe, each `luigi --module pipeline TASK` names a task of the pipeline, and each
recipe key written as `section.key` is a key of configs/recipe.py's dataclasses."""

import dataclasses
import json
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# docs/results/ holds copies of runs' own files (report.md links plots that are not copied): records, not pages.
PAGES = sorted([ROOT / "README.md", ROOT / "bench" / "README.md",
                *(p for p in (ROOT / "docs").rglob("*.md") if "results" not in p.relative_to(ROOT / "docs").parts[:-1])])

# Backticked `section.key` spans that are not recipe keys, each with why. Module paths are recognised
# without this list (a span that names an importable module of the project is a module, not a key).
NOT_KEYS = {
    "judge.unparsed_judgements": "a figure of metrics.json's judge section (the judge's counts), not a setting",
    "model.generate": "transformers' generate method of a model object, the speed benchmarks' baseline",
}
# Recipe names in commands that stand for the reader's own file, not a shipped one.
PLACEHOLDER_RECIPES = {"my_recipe.yaml": "the reader's own recipe"}

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]+`")
LINK = re.compile(r"!?\[(?:[^\]\n]|\][^(])*?\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    prose = INLINE_CODE.sub("", FENCE.sub("", page.read_text()))
    return LINK.findall(prose)


def code(page: Path) -> str:
    """Every command and name the page shows: its code blocks and its inline code spans."""
    text = page.read_text()
    return "\n".join(FENCE.findall(text) + INLINE_CODE.findall(FENCE.sub("", text)))


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading with that anchor in {shown(resolved)})")
    return broken


def test_pages_exist():
    assert len(PAGES) > 5, PAGES  # README and the docs pages: an empty glob would pass every test below


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_slug_follows_github():
    assert slug("Keeping the best round and stopping early") == "keeping-the-best-round-and-stopping-early"
    assert slug("Self-training: ReST, ReST-EM and STaR") == "self-training-rest-rest-em-and-star"
    assert slug("Speed on a 2-core CPU (`bench/README.md`)") == "speed-on-a-2-core-cpu-benchreadmemd"


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) [bad anchor](#nowhere)\n"
                    "`[not a link](x.md)`\n```\n[nor this](y.md)\n```\n")
    assert broken_links(page) == ["missing.md (no such file)", "#nowhere (no heading with that anchor in page.md)"]


def test_python_m_modules_import():
    missing = []
    for page in PAGES:
        for module in sorted(set(re.findall(r"python -m ([\w.]+)", code(page)))):
            if module not in {"pip", "pytest"} and importlib.util.find_spec(module) is None:
                missing.append(f"{page.relative_to(ROOT)}: python -m {module}")
    assert missing == []


def test_named_recipes_exist(monkeypatch):
    from common.errors import RecipeError
    from configs.recipe import resolve_recipe

    monkeypatch.chdir(ROOT)  # a recipe given as a path is a path from the repository root
    missing = []
    for page in PAGES:
        text = code(page)
        names = set(re.findall(r"--recipe[ =]([\w./-]+)", text)) | set(re.findall(r"\bconfigs/[\w.-]+\.yaml", text))
        for name in sorted(names - set(PLACEHOLDER_RECIPES)):
            try:
                resolve_recipe(name)
            except RecipeError:
                missing.append(f"{page.relative_to(ROOT)}: {name}")
    assert missing == []


def test_luigi_commands_name_pipeline_tasks():
    import luigi

    import pipeline  # noqa: F401  registers every task

    registered = set(luigi.task_register.Register.task_names())
    unknown = []
    for page in PAGES:
        for task in sorted(set(re.findall(r"luigi --module pipeline (\w+)", code(page)))):
            if task not in registered:
                unknown.append(f"{page.relative_to(ROOT)}: {task}")
    assert unknown == []


def recipe_keys() -> dict[str, set[str]]:
    from configs.recipe import Recipe

    recipe = Recipe()
    sections = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe)}
    return {name: {f.name for f in dataclasses.fields(value)} for name, value in sections.items()
            if dataclasses.is_dataclass(value)}


def is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent is no package
        return False


def named_keys(page: Path, sections: set[str]) -> set[str]:
    """The `section.key` spans of a page's prose (`training.init`, `model.quantization: 4bit`)."""
    spans = re.findall(r"`([^`\n]+)`", FENCE.sub("", page.read_text()))
    found = set()
    for span in spans:
        match = re.fullmatch(r"([a-z_]+)\.([a-z_0-9]+)(?::.*| .*)?", span)
        if match and match.group(1) in sections:
            found.add(f"{match.group(1)}.{match.group(2)}")
    return found


def test_named_recipe_keys_are_keys():
    keys = recipe_keys()
    assert "learning_rate" in keys["training"] and "backends" in keys["tracking"]
    unknown = []
    for page in PAGES:
        for name in sorted(named_keys(page, set(keys))):
            section, key = name.split(".")
            if key in keys[section] or name in NOT_KEYS or is_module(name):
                continue
            unknown.append(f"{page.relative_to(ROOT)}: {name}")
    assert unknown == []


def test_figures_match_their_committed_results():
    """The numbers every figure draws (docs/figures/figures.json) are what the committed results give now: a
    figure left behind by a change of its results fails here until `python docs/make_figures.py` remakes it."""
    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "docs" / "make_figures.py")
    make_figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_figures)
    assert make_figures.stale_figures() == []
    for name in json.loads((ROOT / "docs" / "figures" / "figures.json").read_text())["demo_runs"]:
        assert (ROOT / "docs" / "figures" / f"{name}_rounds.png").is_file()
