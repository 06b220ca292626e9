"""The installed `robustmim` command, end to end in a subprocess."""

import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

ROBUSTMIM = str(Path(sys.executable).parent / "robustmim")


def run(*args):
    return subprocess.run([ROBUSTMIM, *map(str, args)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)


def test_build_summary_and_verify(tmp_path, image_tree):
    out = tmp_path / "shards"
    built = run("shards", "build", "--config", "configs/shards/imagenet.yaml",
                f"input={image_tree.root}", f"out={out}", "workers=2")
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
    result = run("shards", "build", "out=" + str(tmp_path), "shard_max_samples=-3")
    assert result.returncode == 2
    assert result.stderr.strip() == "robustmim shards: error: shard_max_samples must be >= 0 (0 = no limit), got -3"
    result = run("shards", "verify", tmp_path)
    assert result.returncode == 2 and "no manifest: " in result.stderr and "Traceback" not in result.stderr


def test_help_lists_the_stages():
    result = run("--help")
    assert result.returncode == 0 and "shards" in result.stdout


def test_a_single_process_run_picks_a_free_port_unless_one_is_given():
    """Two single-process runs on one machine must not both take torch's default 29500."""
    from pipeline.dist import detect_env

    first, second = detect_env({}), detect_env({})
    assert first.launcher == "single" and 29500 not in (first.master_port, second.master_port)
    assert detect_env({"MASTER_PORT": "29123"}).master_port == 29123
