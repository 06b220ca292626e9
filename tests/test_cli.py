"""The installed `robustmim` command, end to end in a subprocess."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

ROBUSTMIM = str(Path(sys.executable).parent / "robustmim")


def run(*args):
    return subprocess.run([ROBUSTMIM, *map(str, args)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)


def test_build_summary_and_verify(tmp_path, image_tree):
    out = tmp_path / "shards"
    built = run("shards", "build", "--config", "configs/shards/imagenet.yaml",
                f"input={image_tree.root}", f"out_dir={out}", "workers=2")
    assert built.returncode == 0, built.stderr
    assert "source: imagenet" in built.stdout and "3 classes" in built.stdout
    table = {line.split()[0]: line.split()[1:] for line in built.stdout.splitlines()[2:]}
    assert table["train"][1] == "24" and table["val"][1] == "12"  # samples per split
    assert (out / "config.yaml").is_file() and (out / "provenance.json").is_file()

    verified = run("shards", "verify", out)
    assert verified.returncode == 0 and verified.stdout.strip().endswith("ok")
    summary = run("shards", "summary", out)
    assert summary.returncode == 0 and "verification: passed" in summary.stdout


def test_user_errors_are_one_line_without_traceback(tmp_path):
    result = run("shards", "build", "out_dir=" + str(tmp_path), "shard_max_samples=-3")
    assert result.returncode == 2
    assert result.stderr.strip() == "robustmim shards: error: shard_max_samples must be >= 0 (0 = no limit), got -3"
    result = run("shards", "verify", tmp_path)
    assert result.returncode == 2 and "no manifest: " in result.stderr and "Traceback" not in result.stderr


def test_help_lists_every_stage_with_its_own_help_line():
    from robustmim.stages import STAGES

    result = run("--help")
    assert result.returncode == 0
    shown = " ".join(result.stdout.split())  # argparse wraps long help lines
    for stage in STAGES:
        if stage.add_arguments is not None:  # a command of its own
            assert f" {stage.name} {' '.join(stage.help.split())}" in shown, (stage.name, result.stdout)


def test_a_single_process_run_picks_a_free_port_unless_one_is_given():
    """Two single-process runs on one machine must not both take torch's default 29500."""
    from robustmim.pipeline.dist import detect_env

    first, second = detect_env({}), detect_env({})
    assert first.launcher == "single" and 29500 not in (first.master_port, second.master_port)
    assert detect_env({"MASTER_PORT": "29123"}).master_port == 29123


@pytest.mark.slow
def test_print_config_shows_every_setting_with_its_help_and_reads_back_as_overrides(tmp_path):
    """`--print-config` prints the resolved settings and starts nothing; its lines, given back as
    key=value overrides, rebuild the same config; an unknown key is still refused, naming it."""
    from robustmim.config import load_config
    from robustmim.pipeline.pretrain.config import PretrainConfig

    shown = run("pretrain", "--print-config", "--config", "configs/pretrain/mae_tiny_fmnist.yaml",
                f"out_dir={tmp_path / 'run'}", "seed=3")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert "seed=3  # initial weights and every per-step draw (masks, noise, attacks) [default: 0]" in lines
    assert "zero_bucket_size=50000000  # ZeRO-2 reduce / all-gather bucket (elements)" in lines
    assert any(line.startswith("objective.mimir.hsic_eps=1e-05  # ridge") for line in lines)
    assert not (tmp_path / "run").exists()  # nothing ran
    settings = [line.split("  # ")[0] for line in lines if not line.startswith("#")]
    expected = load_config(PretrainConfig, REPO_ROOT / "configs/pretrain/mae_tiny_fmnist.yaml",
                           [f"out_dir={tmp_path / 'run'}", "seed=3"])
    assert load_config(PretrainConfig, None, settings) == expected
    unknown = run("pretrain", "--print-config", "--config", "configs/pretrain/mae_tiny_fmnist.yaml", "sede=3")
    assert unknown.returncode == 2 and "unknown key 'sede'" in unknown.stderr
    for stage in (["eval"], ["finetune"], ["tokenizer"], ["shards", "build"], ["study", "--config",
                                                                              "configs/study/tiny_fmnist.yaml"]):
        listed = run(*stage, "--print-config")
        assert listed.returncode == 0 and listed.stdout.count("\n") > 5, (stage, listed.stderr)


def test_every_setting_of_every_stage_has_its_help():
    """The help `--print-config` shows comes from the comment beside (or above) each dataclass
    field: a setting without one would print bare."""
    from omegaconf import OmegaConf

    from robustmim.config_help import config_entries
    from robustmim.stages import STAGES, resolve

    schemas = [resolve(stage.config) for stage in STAGES if stage.config]
    assert len(schemas) == 6  # shards, pretrain, finetune, tokenizer, eval, study
    for schema in schemas:
        tree = OmegaConf.structured(schema)
        bare = [key for key, _, _, help_text in config_entries(schema, tree, tree, "") if not help_text]
        assert not bare, (schema.__name__, bare)


def test_every_stage_help_shows_an_example_and_every_submit_flag_has_help():
    import argparse

    from robustmim.cli import build_parser
    from robustmim.stages import commands

    parser = build_parser()
    stages = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for stage in commands():
        assert f"example:\n  robustmim {stage.name} " in stages.choices[stage.name].format_help(), stage.name
    submit = stages.choices["submit"]
    bare = [a.option_strings for a in submit._actions if a.option_strings and not a.help]
    assert not bare, bare
    assert "--cluster {auto,slurm,local}" in submit.format_help()


def add_dummy_arguments(parser):
    parser.add_argument("--greeting", default="hello")


def run_dummy(args) -> int:
    print(f"dummy says {args.greeting}")
    return 0


def test_a_new_stage_is_one_registry_entry(capsys):
    """A stage added to the registry gets its command, its --help example, and a place among the
    stages `submit` sends and the training stages the Slurm job runs, from that entry alone."""
    import argparse
    import dataclasses

    from robustmim.cli import build_parser
    from robustmim.stages import STAGES, Launch, Stage, stage_named, submittable, training_stages

    dummy = Stage("dummy", "a stage made in a test", "robustmim dummy --greeting hi", Launch.training,
                  "test_cli:add_dummy_arguments", "test_cli:run_dummy",
                  config=stage_named("pretrain").config, train=stage_named("pretrain").train)
    stages = (*STAGES, dummy)
    parser = build_parser(stages)
    args = parser.parse_args(["dummy", "--greeting", "hi"])
    assert args._run(args) == 0 and capsys.readouterr().out == "dummy says hi\n"
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "example:\n  robustmim dummy --greeting hi" in subcommands.choices["dummy"].format_help()
    assert "dummy" in parser.format_help()
    assert "dummy" in submittable(stages) and "dummy" in training_stages(stages)
    assert "dummy" not in submittable() and stage_named("dummy", stages) == dummy
    local = dataclasses.replace(dummy, launch=Launch.local)
    assert "dummy" not in submittable((*STAGES, local)) and "dummy" not in training_stages((*STAGES, local))
