"""Launching through submitit against a real local Slurm cluster."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from submitit.slurm.slurm import SlurmJob

from robustmim.config import load_config
from robustmim.pipeline.engine.metrics import read_metrics
from robustmim.slurm.config import SlurmConfig
from robustmim.slurm.jobs import read_submissions
from robustmim.slurm.launch import submit, submit_array

from conftest import REPO_ROOT
from helpers import curve, finish, launch, settings, tiny_classifier_config, wait_finished

pytestmark = pytest.mark.slurm  # every test here submits to the real Slurm cluster the session starts

ROBUSTMIM = str(Path(sys.executable).parent / "robustmim")
CPU_TASKS = ["tasks_per_node=2", "cpus_per_task=1", "time=10", "cluster=slurm"]


def run_cli(*args):
    return subprocess.run([ROBUSTMIM, *map(str, args)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)


def job_report(out_dir: Path) -> str:
    """What a failed assertion on a job's state prints: status, the attempts and each log's tail,
    so a failure seen once in CI can be read without rerunning it."""
    parts = [run_cli("status", out_dir).stdout]
    attempts = out_dir / "attempts.jsonl"
    if attempts.exists():
        parts.append(attempts.read_text())
    for log in sorted((out_dir / "slurm").glob("*/*_log.*")):
        parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
    return "\n".join(parts)


def test_two_task_job_all_reduces_over_gloo(slurm_cluster, tmp_path):
    job_id = submit("check", tmp_path, None, [], load_config(SlurmConfig, None, CPU_TASKS), dry_run=False)
    assert wait_finished(job_id, timeout_s=120) == "COMPLETED"
    results = SlurmJob(folder=tmp_path / "slurm" / "%j", job_id=job_id, tasks=(0, 1)).results()
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world_size"] == 2 and r["sum"] == 3.0 for r in results)  # 1 + 2 on every rank
    assert read_submissions(tmp_path)[0]["job_id"] == job_id
    status = run_cli("status", tmp_path)
    assert status.returncode == 0, status.stderr
    assert f"job {job_id} (check, 2 task(s)" in status.stdout and "COMPLETED" in status.stdout


def test_dry_run_prints_the_script_and_submits_nothing(slurm_cluster, tmp_path, fashion_val_shards):
    overrides = [f"{k}={v}" for k, v in settings(fashion_val_shards, tmp_path / "run").items()]
    result = run_cli("submit", "pretrain", *overrides, "--tasks-per-node", 2, "--cpus-per-task", 1,
                     "--time", "1-12:00", "--partition", "debug", "--signal-delay-s", 90, "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for line in ("#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=1", "#SBATCH --time=2160",
                 "#SBATCH --partition=debug", "#SBATCH --signal=USR2@90", "#SBATCH --nodes=1",
                 f"#SBATCH --output={tmp_path / 'run'}/slurm/%j/%j_0_log.out", "srun --unbuffered",
                 "# world size: 2 (1 node(s) x 2 task(s))",
                 "# per rank: micro batch 16 x 1 accumulation step(s); global batch 32",
                 "2.2M parameters; model states ~0.03 GB per GPU"):
        assert line in out, line
    assert not (tmp_path / "run" / "jobs.jsonl").exists()
    tokenizer = run_cli("submit", "tokenizer", "--config", "configs/tokenizer/tiny_fmnist.yaml",
                        f"out_dir={tmp_path / 'tok'}", "--tasks-per-node", 2, "--cpus-per-task", 1, "--dry-run")
    assert tokenizer.returncode == 0, tokenizer.stderr
    assert "# per rank: micro batch 32 x 1 accumulation step(s); global batch 64" in tokenizer.stdout
    assert "1.0M parameters" in tokenizer.stdout  # the VQGAN alone (967,441)


@pytest.mark.parametrize("flags, message", [
    (["--partition", "gpu-h100"], "invalid partition specified: gpu-h100"),
    (["--time", "1:2:3:4"], "time '1:2:3:4' is not a Slurm time"),
    (["--tasks-per-node", 3], "Requested node configuration is not available"),
    (["--nodes", 2], "Requested node configuration is not available"),
])
def test_bad_inputs_are_rejected_before_anything_is_queued(slurm_cluster, tmp_path, flags, message):
    result = run_cli("submit", "check", "--out-dir", tmp_path, "--cpus-per-task", 1, "--time", 5, *flags)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "jobs.jsonl").exists()


def test_pretraining_requeued_mid_run_finishes_like_an_uninterrupted_run(slurm_cluster, tmp_path, fashion_val_shards):
    reference = tmp_path / "reference"
    uninterrupted = launch(fashion_val_shards, reference)  # the same 2 ranks under torchrun, alongside
    out_dir = tmp_path / "run"
    overrides = [f"{k}={v}" for k, v in settings(fashion_val_shards, out_dir).items()]
    job_id = submit("pretrain", out_dir, None, overrides, load_config(SlurmConfig, None, CPU_TASKS), dry_run=False)
    finish(uninterrupted)
    deadline = time.monotonic() + 180
    while not (read_metrics(out_dir) and read_metrics(out_dir)[-1]["step"] >= 6):
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.2)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    state = wait_finished(job_id, timeout_s=300)
    assert state == "COMPLETED", job_report(out_dir)
    attempts = [json.loads(line) for line in (out_dir / "attempts.jsonl").read_text().splitlines()]
    assert [a["restarts"] for a in attempts] == [0, 1]  # started twice, the second time as a requeue
    assert curve(out_dir) == curve(reference)
    status = run_cli("status", out_dir)
    assert "started 2 time(s)" in status.stdout and "last checkpoint: step_00000012" in status.stdout


def test_finetuning_job_runs_on_two_tasks_and_status_shows_its_validation(slurm_cluster, tmp_path, fashion_shards):
    out_dir = tmp_path / "finetune"
    overrides = [f"out_dir={out_dir}", f"data.shards={fashion_shards}", "init=", "length.samples=256",
                 "global_batch=32", "micro_batch=16", "log_every=2", "data.num_threads=1",
                 "validation.every_steps=8", "validation.every_nth=50", "validation.batch_size=100"]
    job_id = submit("finetune", out_dir, "configs/finetune/standard_tiny_fmnist.yaml", overrides,
                    load_config(SlurmConfig, None, CPU_TASKS), dry_run=False)
    assert wait_finished(job_id, timeout_s=300) == "COMPLETED"
    validation = [r for r in read_metrics(out_dir) if "val_top1" in r]
    assert [r["step"] for r in validation] == [8] and validation[0]["val_samples"] == 200  # every 50th of 10k
    status = run_cli("status", out_dir)
    assert f"job {job_id} (finetune, 2 task(s)" in status.stdout and "COMPLETED" in status.stdout
    assert "last validation: step 8" in status.stdout and "last checkpoint: step_00000008" in status.stdout


def test_array_job_completes(slurm_cluster, tmp_path):
    import math

    cfg = load_config(SlurmConfig, None, ["tasks_per_node=1", "cpus_per_task=1", "time=5", "cluster=slurm"])
    job_ids = submit_array(math.factorial, [3, 4, 5, 6], cfg, tmp_path)
    assert len(job_ids) == 4 and len({j.split("_")[0] for j in job_ids}) == 1  # one array, four tasks
    assert [wait_finished(j, timeout_s=120) for j in job_ids] == ["COMPLETED"] * 4
    array_id = job_ids[0].split("_")[0]
    results = [SlurmJob(folder=tmp_path / "slurm" / "%j", job_id=j).result() for j in job_ids]
    assert results == [6, 24, 120, 720] and (tmp_path / "slurm" / array_id).is_dir()


def test_a_failed_job_shows_its_error_and_log_in_status(slurm_cluster, tmp_path, fashion_val_shards):
    out_dir = tmp_path / "run"
    values = settings(fashion_val_shards, out_dir, **{"data.shards": tmp_path / "no_such_shards"})
    job_id = submit("pretrain", out_dir, None, [f"{k}={v}" for k, v in values.items()],
                    load_config(SlurmConfig, None, CPU_TASKS), dry_run=False)
    assert wait_finished(job_id, timeout_s=120) == "FAILED"
    status = run_cli("status", out_dir)
    assert status.returncode == 1
    assert f"job {job_id} (pretrain, 2 task(s)" in status.stdout and "FAILED" in status.stdout
    assert f"error log: {out_dir / 'slurm' / job_id / f'{job_id}_0_log.err'}" in status.stdout
    assert "no manifest" in status.stdout


def test_status_shows_the_log_of_the_task_that_failed_not_only_task_0s(tmp_path):
    from robustmim.slurm.cli import failed_task_logs

    logs = tmp_path / "slurm" / "7"
    logs.mkdir(parents=True)
    (logs / "7_0_log.err").write_text("rank 0 waiting for the others\nprocess group torn down\n")
    (logs / "7_1_log.err").write_text("Traceback (most recent call last):\n  ...\nOSError: No space left\n")
    assert failed_task_logs(logs, "7") == [(logs / "7_1_log.err", ["Traceback (most recent call last):", "  ...",
                                                                    "OSError: No space left"])]
    (logs / "7_1_log.err").write_text("")
    assert failed_task_logs(logs, "7")[0][0] == logs / "7_0_log.err"  # no error anywhere: task 0's


def test_local_cluster_runs_the_same_job_without_slurm(tmp_path):
    cfg = load_config(SlurmConfig, None, ["tasks_per_node=2", "cpus_per_task=1", "time=5", "cluster=local"])
    job_id = submit("check", tmp_path, None, [], cfg, dry_run=False)
    from submitit.local.local import LocalJob

    results = LocalJob(folder=tmp_path / "slurm" / "%j", job_id=job_id, tasks=(0, 1)).results()
    assert sorted((r["rank"], r["world_size"], r["sum"]) for r in results) == [(0, 2, 3.0), (1, 2, 3.0)]


def test_time_limit_requeues_and_the_run_finishes_like_an_uninterrupted_run(slurm_cluster, tmp_path,
                                                                             fashion_val_shards):
    """A 2-minute limit with the warning 30 s before it. slurmctld checks limits every 30 s
    (PERIODIC_TIMEOUT) and sends the warning once now + 30 s >= end - signal_delay, so it lands
    60-90 s into each attempt: after start-up (15-40 s on 2 busy cores) and before the end of
    500 steps (~65 s of work alone, twice that while the uninterrupted reference runs beside
    it on the same 2 cores), so the first attempt is warned with training under way.
    (With a 1-minute limit the warning came at the first check after the start, often before
    training began: submitit's handler requeued without progress until its budget ran out.)
    SIGUSR2 stops the trainer with a checkpoint, the job requeues itself and resumes; the curve
    must equal the uninterrupted one."""
    long_run = {"length.samples": 32 * 500, "checkpoint.every_steps": 100, "log_every": 5}
    reference = tmp_path / "reference"
    uninterrupted = launch(fashion_val_shards, reference, **long_run)
    out_dir = tmp_path / "run"
    overrides = [f"{k}={v}" for k, v in settings(fashion_val_shards, out_dir, **long_run).items()]
    cfg = load_config(SlurmConfig, None, ["tasks_per_node=2", "cpus_per_task=1", "time=2", "signal_delay_s=30",
                                          "max_requeues=10", "cluster=slurm"])
    job_id = submit("pretrain", out_dir, None, overrides, cfg, dry_run=False)
    finish(uninterrupted)
    state = wait_finished(job_id, timeout_s=600, poll_s=2)
    assert state == "COMPLETED", job_report(out_dir)
    attempts = [json.loads(line) for line in (out_dir / "attempts.jsonl").read_text().splitlines()]
    requeues = [a for a in attempts if "event" in a]
    assert requeues and all("checkpoint saved; requeued" in a["event"] for a in requeues)
    starts = [a for a in attempts if "event" not in a]
    assert len(starts) >= len(requeues) + 1  # each requeue was followed by a restart
    assert curve(out_dir) == curve(reference)
    assert f"started {len(starts)} time(s)" in run_cli("status", out_dir).stdout  # requeue events are not starts


def test_two_node_job_on_one_machine(tmp_path, monkeypatch):
    """Two slurmd daemons (nodes) on this machine; one task on each all-reduces over gloo."""
    from robustmim.slurm.local_cluster import LocalCluster

    cluster = LocalCluster(tmp_path / "cluster", nodes=2)
    try:
        cluster.start()
        monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
        cfg = load_config(SlurmConfig, None, ["nodes=2", "tasks_per_node=1", "cpus_per_task=1", "time=5",
                                              "cluster=slurm"])
        job_id = submit("check", tmp_path / "run", None, [], cfg, dry_run=False)
        assert wait_finished(job_id, timeout_s=120) == "COMPLETED"
        results = SlurmJob(folder=tmp_path / "run" / "slurm" / "%j", job_id=job_id, tasks=(0, 1)).results()
        assert sorted((r["rank"], r["world_size"], r["sum"]) for r in results) == [(0, 2, 3.0), (1, 2, 3.0)]
        nodes = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
        assert f"NodeList={cluster.hostname}n[1-2]" in nodes  # one task on each node
    finally:
        cluster.stop()


def test_eval_array_job_one_task_per_shard_merges_to_the_single_process_result(slurm_cluster, tmp_path,
                                                                              fashion_val_shards):
    """fashion_val_shards: the val split in 20 shards of 500 -> 20 array tasks by default; here 4."""
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from robustmim.pipeline.models.classifier import ViTClassifier
    from robustmim.pipeline.models.deployed import DeploymentSpec

    torch.manual_seed(0)
    model = ViTClassifier(tiny_classifier_config())
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    spec = DeploymentSpec(method="standard", weights="m.safetensors", classifier=model.cfg)
    (tmp_path / "m.json").write_text(json.dumps(OmegaConf.to_container(OmegaConf.structured(spec), enum_to_str=True)))
    settings = [f"model={tmp_path / 'm.json'}", f"shards={fashion_val_shards}", "every_nth=400", "batch_size=8",
                "num_threads=1", "attacks=[{epsilons: [0.0157], steps: 2}]"]
    single = run_cli("eval", *settings, f"out_dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr
    out = tmp_path / "array"
    submitted = run_cli("submit", "eval", *settings, f"out_dir={out}", "--array-tasks", 4, "--cpus-per-task", 1,
                        "--time", 10, "--cluster", "slurm")
    assert submitted.returncode == 0, submitted.stderr
    job_ids = [job["job_id"] for job in read_submissions(out)]
    assert len(job_ids) == 4 and all(wait_finished(j, timeout_s=300) == "COMPLETED" for j in job_ids)
    status = run_cli("status", out)
    assert "(eval, 1 task(s)" in status.stdout and "evaluation: 25 of 25 samples recorded" in status.stdout
    assert status.stdout.count("COMPLETED, started 1 time(s)") == 4  # each array task counted
    merged = run_cli("eval", "--merge-only", "--out", out)
    assert merged.returncode == 0, merged.stderr

    def records(path):
        rows = [json.loads(line) for line in (path / "records.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]

    assert records(out) == records(tmp_path / "single")
    assert len(list((out / "records").glob("rank*.jsonl"))) == 4


def test_one_counter_limits_both_requeue_paths(monkeypatch, tmp_path):
    """Slurm's SLURM_RESTART_COUNT against max_requeues decides where the job requeues itself
    (time limit during training) and where submitit asks `checkpoint()` (before training)."""
    import submitit

    from robustmim.slurm.job import StageJob

    job = StageJob("pretrain", str(tmp_path), None, [], max_requeues=2)
    for count, allowed in (("", True), ("1", True), ("2", False), ("5", False)):
        monkeypatch.setenv("SLURM_RESTART_COUNT", count)
        assert job.may_requeue() is allowed
        resubmission = job.checkpoint()
        assert isinstance(resubmission, submitit.helpers.DelayedSubmission) if allowed else resubmission is None
