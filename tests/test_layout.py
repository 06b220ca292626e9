"""The package layout: no import circle between the project's modules (imports inside functions
included: a circle there is one `import` away from a failing start-up), and models that import
no objective (data flows objective -> model, never back); test modules that share helpers, not
each other."""

import ast
from pathlib import Path

from conftest import REPO_ROOT

PACKAGES = ("robustmim", "pipeline", "eval", "slurm", "shards")


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imported(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports anywhere in its body (absolute imports)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    found = set()
    for name in names:
        while name and name not in modules:  # `from pkg.mod import func` -> pkg.mod
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported(path, modules) - {name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
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
                    found.append(sorted(component))
    return found


def test_no_import_circle_between_the_projects_modules():
    graph = import_graph()
    assert len(graph) > 60 and "pipeline.engine.trainer" in graph
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_models_import_no_objective():
    offenders = {name: sorted(n for n in deps if n.startswith("pipeline.objectives"))
                 for name, deps in import_graph().items() if name.startswith("pipeline.models")}
    assert {name: deps for name, deps in offenders.items() if deps} == {}


def test_test_modules_share_helpers_not_each_other():
    """Shared test code lives in tests/helpers.py or conftest.py: a test module imported by another
    would run its own tests' module-level code twice and hide where the helper lives."""
    test_modules = {path.stem: path for path in (REPO_ROOT / "tests").glob("test_*.py")}
    offenders = {name: sorted(imported(path, test_modules)) for name, path in test_modules.items()}
    assert {name: deps for name, deps in offenders.items() if deps} == {}


def test_a_launching_command_checks_its_config_without_importing_torch():
    """`robustmim <stage> --nproc-per-node N` loads and checks its config, then starts torchrun;
    the ranks import torch, timm, DeepSpeed and DALI. A launcher that imported them too would pay
    ~3 s before every launch (a dozen launches in `make demo`): this walks the launcher's path in
    a fresh interpreter and looks for torch in what it loaded."""
    import subprocess
    import sys

    script = """
import sys
from robustmim.cli import build_parser
from robustmim.config import load_config
from robustmim.launcher import launch_local_ranks, explain_failed_ranks
from robustmim.stages import STAGES, Launch, resolve
from pipeline.dist import detect_env, free_port
from pipeline.engine.run_state import read_run_state
build_parser()
for stage in STAGES:
    if stage.launch in (Launch.training, Launch.array):
        config = sorted((__import__("pathlib").Path("configs") / stage.name).glob("*.yaml"))[0]
        cfg = load_config(resolve(stage.config), str(config), [])
        if stage.launch is Launch.training:
            cfg.accumulation(2)
detect_env(), free_port()
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "deepspeed", "nvidia"))
print(heavy[:5])
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
