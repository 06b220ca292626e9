"""The GPU check's code path at toy scale on this CPU, and the dry run's memory estimate."""

import subprocess
import sys

import pytest

from robustmim.config import load_config
from robustmim.pipeline.pretrain.config import PretrainConfig
from robustmim.slurm.launch import estimate_memory

from conftest import REPO_ROOT


@pytest.mark.slow
def test_gpu_check_runs_every_section_at_toy_scale(tmp_path):
    out = tmp_path / "table.md"
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--smoke", "--out", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    for what in ("| pretrain, model only | mae | micro 16, fp32, eager |",
                 "| pretrain, robustmim engine | mae | micro 16 x 2, ZeRO-1, fp32, compiled blocks |",
                 "| pretrain, robustmim engine | mae | micro 16 x 2, ZeRO-1, fp32, eager |",
                 "| pretrain, robustmim engine | mae | micro 16 x 2, ZeRO-1, bf16_weights, eager |",
                 "| pretrain, model only | mae | micro 16, fp32, compiled blocks |", "| device | matmul |",
                 "| eval | CERTIFY | N 200", "| eval | PGD-2 |", "| eval | PGD-2 EOT-2 |", "| loader | DALI |"):
        assert what in table, (what, table)
    assert "failed" not in table and "not run" not in table
    engine = next(line for line in table.splitlines() if "robustmim engine" in line)
    assert float(engine.split("|")[4].replace(",", "")) > 0  # images/s from the Trainer's own log


# The benches the GPU check does not run, at their smallest: each must still start and print its
# table (a bench nobody runs breaks silently when a config rule changes).
@pytest.mark.slow
@pytest.mark.parametrize("bench, args, expect", [
    ("bench.dat", ["--batch", "8", "--warmup", "0", "--steps", "1"], "VQGAN round trip"),
    ("bench.engine", ["--batch", "8", "--warmup", "0", "--steps", "1"], "zero1"),
    # as a file: bench/ first on sys.path, where its shards.py must not hide robustmim.shards
    ("bench/shards.py", ["--imagenet-like", "20"], "imagenet-like 224-500px JPEG"),
])
def test_every_other_bench_runs_at_toy_scale(bench, args, expect):
    command = [sys.executable, bench] if bench.endswith(".py") else [sys.executable, "-m", bench]
    done = subprocess.run([*command, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert expect in done.stdout, done.stdout


def test_the_memory_estimate_counts_one_micro_batch_of_activations():
    def estimate(name, *overrides):
        cfg = load_config(PretrainConfig, REPO_ROOT / f"configs/pretrain/{name}_vitl_in1k.yaml", list(overrides))
        return estimate_memory(cfg, world_size=8)

    mae, double = estimate("mae"), estimate("mae", "micro_batch=512")
    assert mae.micro_batch == 256 and double.activations_gb == 2 * mae.activations_gb
    assert estimate("mae", "activation_checkpointing=true").activations_gb is None  # not estimated then
    nim = estimate("nim")  # every patch through the encoder: more per image, half the micro-batch
    assert nim.activations_gb / nim.micro_batch > 1.5 * mae.activations_gb / mae.micro_batch
    assert mae.total_gb < 80 and nim.total_gb < 80  # the shipped micro-batches are meant for an 80 GB card
    # DeepSpeed's bf16 weights: 2 + 2 bytes per parameter on every rank, 12 (fp32 masters + Adam) sharded by ZeRO-1
    native = estimate("mae", "precision=bf16_weights")
    assert native.model_states_gb == pytest.approx(mae.params * (4 + 12 / 8) / 1e9)
    assert "bf16 weights and gradients, fp32 master weights" in native.describe()
    # fp32 weights under autocast: weights + gradients + their bf16 copies on every rank; Adam's moments
    # and DeepSpeed's fp32 partition and gradient partition sharded by ZeRO-1
    assert mae.model_states_gb == pytest.approx(mae.params * (4 + 4 + 2 + (8 + 8) / 8) / 1e9)
    assert "activations ~" in mae.describe() and "micro-batch 256, bf16" in mae.describe()


# Peak GiB (torch.cuda.max_memory_allocated) of `robustmim pretrain`'s step with the ViT-L configs'
# settings, one H200, ZeRO-1, bf16 autocast, compiled blocks: bench/gpu_check.py, 2026-11-30,
# docs/benchmarks.md. (objective, micro-batch, precision) -> measured peak.
H200_PEAKS_GIB = {("mae", 256, "auto"): 28.6, ("dmae", 256, "auto"): 28.7, ("mimir", 256, "auto"): 22.2,
                  ("nim", 128, "auto"): 34.4, ("mae", 512, "auto"): 46.5, ("mae", 256, "bf16_weights"): 22.9}


@pytest.mark.parametrize("objective, micro, precision", list(H200_PEAKS_GIB))
def test_the_memory_estimate_is_within_15_percent_of_the_peak_measured_on_a_gpu(objective, micro, precision):
    cfg = load_config(PretrainConfig, REPO_ROOT / f"configs/pretrain/{objective}_vitl_in1k.yaml",
                      [f"micro_batch={micro}", "zero_stage=1", f"precision={precision}"])
    estimate_gib = estimate_memory(cfg, world_size=1).total_gb * 1e9 / 2**30
    assert estimate_gib == pytest.approx(H200_PEAKS_GIB[objective, micro, precision], rel=0.15)
