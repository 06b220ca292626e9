"""Weights & Biases beside TensorBoard (`logging.wandb=true`), in offline mode: one W&B run per
robustmim run, its id kept in every checkpoint, so a re-run (or a requeued job) continues it and
a branch from another run's checkpoint starts its own; W&B receives what metrics.jsonl holds."""

import json

import pytest

from robustmim.pipeline.engine.checkpoint_files import METADATA
from robustmim.pipeline.engine.metrics import read_metrics

from helpers import finish, launch, wandb_offline_runs

OFFLINE = {"logging.wandb": "true", "logging.wandb_mode": "offline"}


def logged_losses(attempts: list[list[dict]]) -> list[tuple]:
    return [(row["step"], row["pretrain/loss"]) for rows in attempts for row in rows if "pretrain/loss" in row]


@pytest.mark.slow
def test_a_rerun_continues_the_wandb_run_and_a_branch_starts_its_own(tmp_path, fashion_val_shards):
    out_dir = tmp_path / "run"
    out = finish(launch(fashion_val_shards, out_dir, nproc=1, **{"length.samples": 32 * 8, **OFFLINE}))
    finish(launch(fashion_val_shards, out_dir, nproc=1, **OFFLINE))  # 12 steps now: continues from step 8
    ids = {json.loads((tag / METADATA).read_text())["run_id"] for tag in (out_dir / "checkpoints").glob("step_*")}
    assert len(ids) == 1, ids
    (run_id,) = ids
    assert f"W&B run {run_id} of project robustmim" in out
    runs = wandb_offline_runs(out_dir)
    assert list(runs) == [run_id] and len(runs[run_id]) == 2  # two attempts, one W&B run
    metrics = [(r["step"], r["loss"]) for r in read_metrics(out_dir)]
    assert logged_losses(runs[run_id]) == metrics and [s for s, _ in metrics] == list(range(1, 13))

    branch = tmp_path / "branch"
    finish(launch(fashion_val_shards, branch, nproc=1,
                  **{"checkpoint.resume": out_dir / "checkpoints" / "step_00000008", **OFFLINE}))
    branched = wandb_offline_runs(branch)
    assert len(branched) == 1 and run_id not in branched
    (attempts,) = branched.values()
    assert [step for step, _ in logged_losses(attempts)] == [9, 10, 11, 12]
    assert logged_losses(attempts) == [(r["step"], r["loss"]) for r in read_metrics(branch)]
