"""The README and the pages under docs/ stay true to the code.

- The README stays short (at most 300 lines) and its quick start's test command is the one CI runs.
- Every relative link and image in README.md and docs/*.md points to a file that exists, and every
  ``#anchor`` to a heading of the page it names.
- Every ``python`` block of a docs page runs as written (the README's run in tests/test_readme.py).
- Every repository path named in a page exists; every ``python -m mugcp...`` command exists and takes
  each ``--flag`` written after it; every ``--flag`` named in prose belongs to some command (or to the
  outside tools listed here); every config key named (``data.root``, ``method.n_ctx``...) is one the
  config accepts; every ``mugcp.x.y`` named in prose imports.
- The configuration table lists every key of ``DEFAULTS`` with its default; the README's methods
  table lists every registered method with its config file; dependencies and the layout are complete.
- docs/changes.md: every new import path imports and no old one does.
"""

from __future__ import annotations

import ast
import importlib
import io
import re
import runpy
import sys
from contextlib import redirect_stdout
from functools import cache
from pathlib import Path

import pytest

from mugcp.config import DEFAULTS, yaml_load
from mugcp.config_schema import flatten
from mugcp.methods import get_method, list_methods, list_variants

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)

# Paths of other repositories that the released-recipes table names (PromptSRC's docs/TRAIN.md).
EXTERNAL_PATHS = {"docs/TRAIN.md"}
# Flags of the outside tools the pages show beside ours (torchrun, sbatch, srun, pip, pytest, scontrol).
EXTERNAL_FLAGS = {
    "--nproc-per-node",
    "--nnodes",
    "--rdzv-id",
    "--rdzv-backend",
    "--rdzv-endpoint",  # torchrun
    "--array",
    "--gpus",
    "--time",
    "--output",
    "--wrap",
    "--dependency",
    "--signal",
    "--requeue",  # sbatch
    "--nodes",
    "--ntasks-per-node",
    "--gpus-per-node",
    "--cpus-per-task",
    "--kill-on-bad-exit",  # sbatch / srun
    "--durations",
    "--benchmark-only",
    "--benchmark-json",  # pytest
}
# Keys the pages show on purpose as wrong (an error message for a mistyped key).
WRONG_ON_PURPOSE = {"optim.max_step"}


def rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def without_code(text: str) -> str:
    """The page without its fenced blocks (their lines kept blank, so line numbers still match)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def inline_code(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", without_code(text))


def fenced(text: str, language: str | None = None) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if language is None or lang == language]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in without_code(page.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            found.add(base if count == 0 else f"{base}-{count}")
            seen[base] = count + 1
    return found


def links(page: Path) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", without_code(page.read_text(encoding="utf-8")))
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_readme_is_at_most_300_lines():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 300


def test_readme_quick_start_runs_what_ci_runs():
    quick = README.read_text(encoding="utf-8").split("## Quick start", 1)[1].split("\n## ", 1)[0]
    lines = [line.split("#", 1)[0].strip() for line in fenced(quick, "bash")[0].strip().splitlines()]
    assert lines == [
        "bash .ci/install && .venv/bin/python -m mugcp.train",
        "bash .ci/install && .venv/bin/python -m pytest -q",
    ]
    ci = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert " && ".join(ci) == lines[1]


def test_docs_pages_exist_and_the_readme_links_each():
    targets = {(README.parent / link.split("#")[0]).resolve() for link in links(README)}
    unlinked = [rel(page) for page in DOCS if page.resolve() not in targets]
    assert DOCS and unlinked == []


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_point_to_files_and_anchors(page):
    broken = []
    for link in links(page):
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no file {target}")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link}: no heading '#{anchor}' in {rel(target)}")
    assert broken == []


def docs_python_blocks() -> list[tuple[str, int, str]]:
    return [
        (rel(page), index, block)
        for page in DOCS
        for index, block in enumerate(fenced(page.read_text(encoding="utf-8"), "python"))
    ]


@pytest.mark.parametrize(
    "page, index, block", docs_python_blocks(), ids=[f"{p}-{i}" for p, i, _ in docs_python_blocks()]
)
def test_docs_python_blocks_run_as_written(page, index, block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(block, f"{page} python block {index}", "exec"), {})


PATH = re.compile(
    r"(?<![\w/.$<-])((?:mugcp|configs|tests|benchmarks|docs|\.ci)/[\w./*{},-]*|setup\.py|constraints\.txt|pytest\.ini)"
)


def expand_braces(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    return [
        out
        for choice in match.group(1).split(",")
        for out in expand_braces(pattern[: match.start()] + choice + pattern[match.end() :])
    ]


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_named_repository_paths_exist(page):
    missing = []
    for path in PATH.findall(page.read_text(encoding="utf-8")):
        path = path.rstrip(".,")
        if path in EXTERNAL_PATHS or re.search(r"\b[A-Z]{2,}\b", path):  # another repository's, or a placeholder (NAME)
            continue
        for one in expand_braces(path):
            if not (list(ROOT.glob(one)) if "*" in one else (ROOT / one).exists()):
                missing.append(one)
    assert missing == []


COMMAND = re.compile(r"-m (mugcp(?:\.\w+)+)((?:[^\n]|\\\n)*)")


def command_lines(text: str) -> list[tuple[str, str]]:
    """(module, the rest of its line with continuations) for each ``-m mugcp...`` in the text."""
    return [(module, rest.split(" #", 1)[0]) for module, rest in COMMAND.findall(text.replace("\\\n", " "))]


@cache
def help_text(module: str, sub: tuple = ()) -> str:
    """What ``python -m MODULE [SUB] --help`` prints, run in this process."""
    argv, printed = sys.argv, io.StringIO()
    sys.argv = [f"python -m {module}", *sub, "--help"]
    try:
        with redirect_stdout(printed), pytest.raises(SystemExit) as stop:
            runpy.run_module(module, run_name="__main__", alter_sys=False)
        assert stop.value.code in (0, None)
    finally:
        sys.argv = argv
    return printed.getvalue()


def subcommand(module: str, rest: str) -> tuple:
    return ("check",) if module == "mugcp.data" and rest.split()[:1] == ["check"] else ()


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_commands_take_the_flags_written_after_them(page):
    wrong = []
    for module, rest in command_lines(page.read_text(encoding="utf-8")):
        flags = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest))
        known = help_text(module, subcommand(module, rest))
        wrong += [f"{module} {flag}" for flag in sorted(flags) if not re.search(re.escape(flag) + r"(?![\w-])", known)]
    assert wrong == []


COMMANDS = [
    "mugcp.train",
    "mugcp.evaluate",
    "mugcp.predict",
    "mugcp.inspect",
    "mugcp.sweep",
    "mugcp.extract",
    "mugcp.export",
    "mugcp.report",
    "mugcp.convert",
]


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_flags_named_in_prose_belong_to_a_command(page):
    everything = "".join(help_text(module) for module in COMMANDS) + help_text("mugcp.data", ("check",))
    flags = {
        flag
        for span in inline_code(page.read_text(encoding="utf-8"))
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", span)
    }
    unknown = [
        flag for flag in sorted(flags - EXTERNAL_FLAGS) if not re.search(re.escape(flag) + r"(?![\w-])", everything)
    ]
    assert unknown == []


SECTIONS = "|".join(DEFAULTS)
# A section, a dot and a key; not a file name (``train.py``, ``model.pth.tar``) nor a call (``model.predict(``).
CONFIG_KEY = re.compile(rf"(?<![\w./$-])((?:{SECTIONS})\.(?!(?:py|pth?|yaml|json|txt|csv|md|png)\b)[a-z_]+)(?![\w(.])")


def method_options() -> set[str]:
    return {"name"} | {key for name in list_methods() for key in flatten(get_method(name).defaults)}


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_config_keys_named_exist(page):
    text = page.read_text(encoding="utf-8")
    places = inline_code(text) + [body for lang, body in FENCE.findall(text) if lang != "python"]
    keys = set(flatten(DEFAULTS)) | {f"method.{option}" for option in method_options()}
    named = {key for place in places for key in CONFIG_KEY.findall(place)}
    assert sorted(named - keys - WRONG_ON_PURPOSE) == []


def resolves(dotted: str) -> bool:
    """Whether ``dotted`` names a module of this checkout, or an attribute of one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            target = importlib.import_module(name)
        except ModuleNotFoundError as missing:
            if missing.name is not None and not name.startswith(missing.name):
                raise  # the module exists but something it imports does not
            continue
        file = str(getattr(target, "__file__", None) or "")
        if not file.startswith(str(ROOT)) or "site-packages" in file:  # e.g. a venv inside the checkout
            return False  # another distribution's module of that name (Hugging Face's ``kernels``)
        try:
            for attribute in parts[cut:]:
                target = getattr(target, attribute)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("page", [page for page in PAGES if page.name != "changes.md"], ids=rel)
def test_python_names_in_prose_import(page):
    names = {
        match
        for span in inline_code(page.read_text(encoding="utf-8"))
        for match in re.findall(r"^(mugcp(?:\.\w+)+)", span)
    }
    assert sorted(name for name in names if not resolves(name)) == []


def table_rows(text: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|") and not re.match(r"\|[-|: ]+\|$", line.strip())
    ]


def test_configuration_table_lists_every_key_with_its_default():
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    table = page.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    listed = {}
    for cells in table_rows(table)[1:]:
        keys = re.findall(r"`([a-z_]+\.[a-z_]+)`", cells[0])
        values = yaml_load("[" + cells[1].replace("`", "") + "]")
        if cells[0].endswith("+ options"):  # method.name and the method's own options
            values = values[:1]
        assert len(values) == len(keys), cells
        listed.update(zip(keys, values))
    assert listed == flatten(DEFAULTS)


def test_readme_methods_table_lists_every_method_and_its_config():
    section = README.read_text(encoding="utf-8").split("\n## Methods", 1)[1].split("\n## ", 1)[0]
    rows = {cells[0].strip("`"): cells[3].strip("`") for cells in table_rows(section)[1:]}
    variants = [row for row in rows if "+" in row]  # one row names the variants: `coop+dept`, `cocoop+dept`, ...
    assert sorted(name.strip("` ") for name in variants[0].split(",")) == list_variants()
    del rows[variants[0]]
    assert sorted(rows) == list_methods()
    assert {name: get_method(name).config for name in rows} == rows


def requirement_names() -> set[str]:
    """Every package setup.py requires, extras included, read from its syntax tree (nothing is run)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    lists = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List)
    }
    call = next(
        node.value for node in tree.body if isinstance(node, ast.Expr) and getattr(node.value.func, "id", "") == "setup"
    )
    requirements = []
    for keyword in call.keywords:
        if keyword.arg in ("install_requires", "extras_require"):
            for node in ast.walk(keyword.value):
                if isinstance(node, ast.Name):  # a module-level list: EXPORT, or *EXPORT inside a list
                    requirements += lists[node.id]
                elif isinstance(node, ast.List):
                    requirements += [item.value for item in node.elts if isinstance(item, ast.Constant)]
    return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower().replace("_", "-") for r in requirements}


def test_every_dependency_says_why():
    page = (ROOT / "docs" / "installation.md").read_text(encoding="utf-8")
    table = page.split("## Why each dependency", 1)[1].split("\n## ", 1)[0]
    named = {
        re.sub(r"\s*\(.*", "", name).strip().lower().replace("_", "-")
        for cells in table_rows(table)[1:]
        for name in cells[0].split(", ")
    }
    assert requirement_names() - named == set()


def test_layout_names_every_package_folder():
    block = (ROOT / "docs" / "development.md").read_text(encoding="utf-8").split("## Layout", 1)[1]
    folders = sorted(p.name for p in (ROOT / "mugcp").iterdir() if p.is_dir() and not p.name.startswith("__"))
    readme_layout = README.read_text(encoding="utf-8").split("\n## Layout", 1)[1]
    assert [f for f in folders if f"mugcp/{f}/" not in block] == []
    assert [f for f in folders if f"`{f}/`" not in readme_layout and f"mugcp/{f}/" not in readme_layout] == []


def changes_rows() -> list[tuple[str, str]]:
    section = (
        (ROOT / "docs" / "changes.md")
        .read_text(encoding="utf-8")
        .split("## Moved import paths", 1)[1]
        .split("\n## ", 1)[0]
    )
    pairs = []
    for cells in table_rows(section):
        olds, news = re.findall(r"`([\w.]+)`", cells[0]), re.findall(r"`([\w.]+)`", cells[1])
        if cells[0] != "old":
            assert len(olds) == len(news) > 0, cells
            pairs += list(zip(olds, news))
    return pairs


def test_changes_new_import_paths_import_and_old_ones_do_not():
    pairs = changes_rows()
    assert len(pairs) > 30
    assert [new for _, new in pairs if not resolves(new)] == []
    assert [old for old, _ in pairs if resolves(old)] == []
