"""The house's layering, read from every module's imports (ast): nothing imports a layer above its own,
no module imports itself back through others, and ``mugcp/kernels/`` stands alone.

Layers, bottom up: errors/utils (and ``mugcp.runs.layout``, the names of a run folder, which imports nothing) →
config → backbones and data → methods, semantics and analysis → runs → training and inference → reports →
sweeps → launch (Slurm) → commands. Every import counts, also one inside a function: a lazy import
of a higher layer is still a dependency running back up.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [
    ("errors/utils", ("mugcp.errors", "mugcp.utils", "mugcp.runs.layout")),
    ("config", ("mugcp.config", "mugcp.config_schema", "mugcp.recipes")),
    ("backbones and data", ("mugcp.backbones", "mugcp.data")),
    ("methods, semantics and analysis", ("mugcp.methods", "mugcp.semantics", "mugcp.analysis")),
    ("runs", ("mugcp.runs",)),
    ("training and inference", ("mugcp.training", "mugcp.inference")),
    ("reports", ("mugcp.reports",)),
    ("sweeps", ("mugcp.sweeps",)),
    ("launch", ("mugcp.launch",)),
]
COMMANDS = "commands"
KERNELS = "mugcp.kernels"


def is_kernel(module: str) -> bool:
    return module == KERNELS or module.startswith(KERNELS + ".")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> tuple[int, str]:
    """(rank, name): a package's ``__main__`` and every top-level ``mugcp.<command>`` are commands."""
    if module.endswith(".__main__"):
        return len(LAYERS), COMMANDS
    for rank, (name, prefixes) in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return rank, name
    return len(LAYERS), COMMANDS  # mugcp, mugcp.cli, mugcp.train, mugcp.sweep, ...


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports, anywhere in it (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # ``from package import submodule`` imports the submodule
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / "mugcp").rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_modules(path, name):
            # the deepest project module the import names (``mugcp.data.registry.X`` → ``mugcp.data.registry``)
            parts = imported.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts and ".".join(parts) != name:
                targets.add(".".join(parts))
        graph[name] = targets
    return graph


def test_layer_test_sees_the_project():
    graph = import_graph()
    assert "mugcp.training.trainer" in graph and "mugcp.kernels.attention" in graph
    assert "mugcp.config" in graph["mugcp.training.trainer"]
    assert layer_of("mugcp.data.__main__") == (len(LAYERS), COMMANDS)
    assert layer_of("mugcp.semantics.cache")[1] == "methods, semantics and analysis"


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for module, targets in import_graph().items():
        if is_kernel(module):
            continue
        rank, name = layer_of(module)
        for target in sorted(targets):
            if is_kernel(target):
                continue  # the kernels stand alone below every layer
            target_rank, target_name = layer_of(target)
            if target_rank > rank:
                upward.append(f"{module} ({name}) imports {target} ({target_name})")
    assert not upward, "imports running back up the layers:\n" + "\n".join(upward)


def test_kernels_import_nothing_from_mugcp():
    offending = [f"{module} imports {target}" for module, targets in import_graph().items() if is_kernel(module)
                 for target in sorted(targets) if not is_kernel(target)]
    assert not offending, "\n".join(offending)


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the graph as a list of modules (first == last), or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


@pytest.mark.parametrize("package", ["mugcp", KERNELS])
def test_no_import_cycles(package):
    # A package's __init__ hands on its modules' names (its face); a module reaching its own package's
    # face (e.g. the method registry listing the methods package) is not a loop between modules.
    faces = {module for module, path in project_modules().items() if path.name == "__init__.py"}
    graph = {module: {t for t in targets if t not in faces} for module, targets in import_graph().items()
             if module.startswith(package) and module not in faces}
    assert find_cycle(graph) == []


def test_no_file_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in project_modules().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert not long, f"files over 400 lines (split them along a real seam): {long}"


# -- short functions --------------------------------------------------------------------------------
MAX_FUNCTION_LINES = 80


def is_triton_kernel(node: ast.AST) -> bool:
    """``@triton.jit`` (or ``@triton.jit(...)``): a GPU kernel reads as one block and may be longer."""
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Attribute) and target.attr == "jit" and isinstance(target.value, ast.Name) \
                and target.value.id == "triton":
            return True
    return False


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every function or method in ``source`` longer than ``limit`` lines, decorators not counted."""
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit and not is_triton_kernel(node)]


def test_long_functions_are_found_and_kernels_excepted():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))  # def line + 80 = 81 lines
    assert long_functions(f"def f():\n{body}\n") == [("f", MAX_FUNCTION_LINES + 1)]
    assert long_functions(f"class C:\n    def m(self):\n    {body.replace(chr(10), chr(10) + '    ')}\n") == [("m", 81)]
    assert long_functions(f"@triton.jit\ndef k():\n{body}\n") == []
    assert long_functions(f"@other.jit\ndef k():\n{body}\n") == [("k", 81)]
    assert long_functions("def g():\n" + "\n".join(body.splitlines()[:-1]) + "\n") == []  # 80 lines: allowed


def test_no_function_over_80_lines():
    long = {f"{path.relative_to(ROOT)}: {name}": lines for path in project_modules().values()
            for name, lines in long_functions(path.read_text(encoding="utf-8"))}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them into steps that each have a name): {long}"


# -- run-folder names spelled once --------------------------------------------------------------------
LAYOUT = ROOT / "mugcp" / "runs" / "layout.py"
# The rule compares whole string constants (f-strings' literal parts included) with the names layout.py
# defines; docstrings are prose and not looked at; help texts and messages that merely mention a file
# inside a longer sentence do not equal a name. Where one of the words is used for something other than a
# file, it is listed here with the reason.
NOT_FILE_NAMES = {
    ("mugcp/config.py", "tensorboard"): "the config key train.tensorboard",
    ("mugcp/training/trainer.py", "tensorboard"): "the config key train.tensorboard",
    ("mugcp/methods/base.py", "checkpoint"): "the default label of where loaded weights come from",
    ("mugcp/methods/dept.py", "checkpoint"): "the same default label, on the DePT override",
    ("mugcp/reports/results.py", "checkpoint"): "the metrics key naming the checkpoint an evaluation evaluated",
    ("mugcp/training/evaluate_checkpoint.py", "checkpoint"): "the metrics key naming the evaluated checkpoint",
    ("mugcp/reports/__init__.py", "report"): "the module mugcp.reports.report",
    ("mugcp/runs/__init__.py", "checkpoint"): "the module mugcp.runs.checkpoint",
    ("mugcp/analysis/predictions.py", "predictions"): "a key of the dict of files write_subset_outputs wrote",
    ("mugcp/analysis/predictions.py", "per_class"): "a key of the dict of files write_subset_outputs wrote",
    ("mugcp/analysis/confusion.py", "confusion"): "a key of the dict of files write_confusion wrote",
}


def layout_names() -> dict[str, str]:
    """``{file name: its constant}`` for every string constant layout.py defines."""
    names = {}
    for node in ast.parse(LAYOUT.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            names[node.value.value] = node.targets[0].id
    return names


def spelled_names(source: str, names: dict[str, str]) -> list[tuple[int, str]]:
    """(line, name) of every string constant in ``source`` that is one of ``names``, docstrings left out."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
            and id(node) not in docstrings]


def test_layout_imports_nothing_and_names_each_file_once():
    assert {m for m in imported_modules(LAYOUT, "mugcp.runs.layout") if not m.startswith("__future__")} == set()
    names = layout_names()
    assert {"config.yaml", "log.txt", "metrics.json", "metrics.jsonl", "checkpoint", "trainer_state.pt", ".lock",
            "slurm_state.json", "slurm_jobs.json", "superseded.json", "splits.json"} <= set(names)
    values = [node.value.value for node in ast.parse(LAYOUT.read_text(encoding="utf-8")).body
              if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)]
    assert len(values) == len(set(values)), "two constants of layout.py name the same file"


def test_spelled_names_finds_literals_not_docstrings():
    names = {"metrics.json": "FINAL_METRICS_FILE", "eval_": "EVALUATION_DIR_PREFIX"}
    source = ('"""Writes metrics.json."""\ndef f(out, x):\n    """metrics.json"""\n'
              '    return out / "metrics.json", f"eval_{x}", "the metrics.json file"\n')
    assert spelled_names(source, names) == [(4, "metrics.json"), (4, "eval_")]


def test_run_folder_names_are_spelled_only_in_layout():
    names = layout_names()
    spelled = []
    for path in project_modules().values():
        if path == LAYOUT:
            continue
        where = str(path.relative_to(ROOT))
        for line, name in spelled_names(path.read_text(encoding="utf-8"), names):
            if (where, name) not in NOT_FILE_NAMES:
                spelled.append(f"{where}:{line}: {name!r} (use mugcp.runs.layout.{names[name]})")
    assert not spelled, "run-folder names spelled outside mugcp/runs/layout.py:\n" + "\n".join(spelled)
