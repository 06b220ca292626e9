"""The package layout: one installed name (`robustmim`, with the stage folders at the repository
root linked in as its subpackages), every import through it; no import circle between the
project's modules (imports inside functions included: a circle there is one `import` away from a
failing start-up), and models that import no objective (data flows objective -> model, never
back); test modules that share helpers, not each other."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

STAGE_FOLDERS = ("pipeline", "eval", "slurm", "shards")  # at the root, robustmim.<folder> when imported


def project_modules() -> dict[str, Path]:
    """Dotted name -> file, as Python imports them: robustmim/*.py and the stage folders' modules
    under robustmim.<folder>."""
    modules = {}
    roots = [(REPO_ROOT / "robustmim", ["robustmim"])]
    roots += [(REPO_ROOT / folder, ["robustmim", folder]) for folder in STAGE_FOLDERS]
    for root, prefix in roots:
        for path in root.rglob("*.py"):
            relative = path.relative_to(root)
            if relative.parts[0] in STAGE_FOLDERS and root.name == "robustmim":
                continue  # the links: these files are listed from their own folder
            parts = prefix + list(relative.with_suffix("").parts)
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


def python_files() -> list[Path]:
    """Every Python file of the project: the packages, bench/ and tests/."""
    folders = ["robustmim", *STAGE_FOLDERS, "bench", "tests"]
    return [path for folder in folders for path in (REPO_ROOT / folder).rglob("*.py")
            if not (folder == "robustmim" and path.relative_to(REPO_ROOT / folder).parts[0] in STAGE_FOLDERS)]


def test_the_stage_folders_are_robustmims_subpackages_through_links():
    for folder in STAGE_FOLDERS:
        link = REPO_ROOT / "robustmim" / folder
        assert link.is_symlink() and os.readlink(link) == f"../{folder}", link
        assert (link / "__init__.py").samefile(REPO_ROOT / folder / "__init__.py")


def test_every_import_of_the_projects_code_goes_through_the_robustmim_name():
    """`import pipeline` would load a second copy of a module (or another package's `pipeline`)."""
    bare = {}
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            found = [name for name in names if name.split(".")[0] in STAGE_FOLDERS]
            if found:
                bare.setdefault(str(path.relative_to(REPO_ROOT)), []).extend(found)
    assert bare == {}


@pytest.mark.slow
def test_each_module_and_the_cli_work_beside_foreign_packages_named_like_the_stage_folders(tmp_path):
    """Packages called pipeline, eval, slurm and shards (there are such on PyPI) first on the path:
    every project module still imports, each on its own (no other project module loaded before
    it: one that worked only after another had been imported would fail here), and a stage's
    command line runs."""
    for folder in STAGE_FOLDERS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text(f"raise ImportError('the foreign {folder} was imported')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    outside = tmp_path / "elsewhere"  # not the repository root, whose folders would come first
    outside.mkdir()
    names = sorted(name for name in project_modules() if not name.endswith("__main__"))
    script = """
import importlib, sys
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m.split(".")[0] == "robustmim"]:
        del sys.modules[loaded]
    importlib.import_module(name)
print("imported")
"""
    done = subprocess.run([sys.executable, "-c", script, *names], cwd=outside, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-3000:]
    config = REPO_ROOT / "configs/pretrain/mae_tiny_fmnist.yaml"
    done = subprocess.run([str(Path(sys.executable).with_name("robustmim")), "pretrain", "--config", str(config),
                           "--print-config"], cwd=outside, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "objective.name" in done.stdout, done.stderr[-3000:]


def test_no_import_circle_between_the_projects_modules():
    graph = import_graph()
    assert len(graph) > 60 and "robustmim.pipeline.engine.trainer" in graph
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_models_import_no_objective():
    offenders = {name: sorted(n for n in deps if n.startswith("robustmim.pipeline.objectives"))
                 for name, deps in import_graph().items() if name.startswith("robustmim.pipeline.models")}
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
    script = """
import sys
from robustmim.cli import build_parser
from robustmim.config import load_config
from robustmim.launcher import launch_local_ranks, explain_failed_ranks
from robustmim.stages import STAGES, Launch, resolve
from robustmim.pipeline.dist import detect_env, free_port
from robustmim.pipeline.engine.run_state import read_run_state
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
