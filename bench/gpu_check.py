"""Every GPU measurement of the project in one command and one table (docs/benchmarks.md).

    bash bench/gpu_check.sh                 # or `make bench-gpu`: ViT-L on the GPU, < 9 minutes
    python -m bench.gpu_check --smoke       # the same code at toy scale on a CPU (the tests run it)

Rows, in the order they run (the targets as users meet them first): a large bf16 matmul (the
device's real ceiling); pretraining steps per objective, model-only eager (`bench.step`) and
through `robustmim pretrain`'s Trainer with its GPU defaults (`bench.train_step`: DeepSpeed
ZeRO-1, 2 micro-steps per step, synthetic device batches, bf16 autocast, compiled blocks), with
the engine's share of the model-only rate; CERTIFY at N = 10,000 (s/image) and PGD-10 with and
without EOT 16 (images/s), as `robustmim eval` runs them; MAE through the Trainer with eager
blocks and with DeepSpeed's bf16 weights (what the `compile` and `precision` defaults were
chosen against); model-only MAE with compiled blocks; the DALI loader where DALI is installed.
With --smoke the engine compiles on the CPU too, so the test covers that path. MFU is always
against 989 TFLOP/s (dense bf16, H100/H200). Rows are printed, and --out rewritten, as they are
measured; sections past `--budget-s` are reported as not run, so the command ends in time.
Needs torch with CUDA, timm and PyYAML; omegaconf and deepspeed may come as wheels
(bench/gpu_check.sh installs a `.whl/` folder first); DALI is optional.
"""

from __future__ import annotations

import sys

if not __package__:  # it imports bench.step's helpers: bench/ must be importable as a package
    sys.exit("run from the repository root as: python -m bench.gpu_check")

import argparse
import datetime as _dt
import platform
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

HEADER = ("| section | what | setting | images/s | MFU | peak GiB | note |\n"
          "|---|---|---|---|---|---|---|")


def row(section: str, what: str, setting: str, rate=None, mfu=None, peak=None, note: str = "") -> str:
    def fmt(value, pattern):
        return "–" if value is None or value != value else pattern.format(value)  # None or NaN

    return (f"| {section} | {what} | {setting} | {fmt(rate, '{:,.1f}')} | {fmt(mfu, '{:.1%}')} | "
            f"{fmt(peak, '{:.1f}')} | {note} |")


def environment() -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86'})"
    try:
        import deepspeed

        ds = deepspeed.__version__
    except ImportError:
        ds = "absent"
    return (f"{_dt.date.today().isoformat()}, {device}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
            f"deepspeed {ds}, Python {platform.python_version()}")


def sections(smoke: bool) -> list:
    """(name, function returning rows) in the order they run: the figures that decide defaults
    first, so a run cut short by its budget still has them."""
    encoder = "vit_tiny_patch4" if smoke else "vit_large_patch16"
    batches = {"mae": 16, "dmae": 16, "mimir": 16, "nim": 16} if smoke else \
        {"mae": 256, "dmae": 256, "mimir": 256, "nim": 128}
    dtype = "fp32" if smoke else "bf16"
    objectives = ["mae"] if smoke else ["mae", "dmae", "mimir", "nim"]
    model_only_rate: dict[str, float] = {}  # objective -> eager images/s, for the engine's overhead

    def device():
        import torch

        from bench.step import matmul_peak
        from robustmim.pipeline.flops import PEAK_TFLOPS_DENSE_BF16 as PEAK_TFLOPS

        on_gpu = torch.cuda.is_available()
        n = 8192 if on_gpu else 512
        flops = matmul_peak(torch.device("cuda" if on_gpu else "cpu"), torch.bfloat16 if on_gpu else torch.float32, n)
        return [row("device", "matmul", f"{n}x{n}x{n}, {dtype}", note=f"{flops / 1e12:.0f} TFLOP/s "
                    f"({flops / (PEAK_TFLOPS * 1e12):.0%} of the {PEAK_TFLOPS:.0f} MFU divides by)")]

    def model_only(compiled: bool):
        from bench.step import measure

        rows = []
        for r in measure(encoder, ["mae"] if compiled else objectives, 16, dtype, warmup=1 if smoke else 3,
                         steps=2 if smoke else 10, compile_blocks_too=compiled, batches=batches):
            if r["compiled"] != compiled:
                continue
            if not compiled:
                model_only_rate[r["objective"]] = r["images_per_s"]
            rows.append(row("pretrain, model only", r["objective"],
                            f"micro {r['batch']}, {dtype}, {'compiled blocks' if compiled else 'eager'}",
                            r["images_per_s"], r["mfu"], r["peak_gib"]))
        return rows

    def engine(objectives: list[str], precision: str = "auto", compile: str = "auto"):
        from bench.train_step import run

        results = run(SimpleNamespace(encoder=encoder, objectives=",".join(objectives), micro=16 if smoke else 0,
                                      accumulation=2, intervals=3 if smoke else 4, log_every=2 if smoke else 3,
                                      zero_stage=1, compile=compile, precision=precision,
                                      child_timeout_s=240.0))
        rows = []
        for r in results:
            eager = model_only_rate.get(r["objective"])
            note = "synthetic device batches" + (f"; {r['images_per_s'] / eager:.0%} of model-only eager" if eager
                                                 else "")
            setting = (f"micro {r['micro']} x {r['accumulation']}, ZeRO-1, "
                       f"{dtype if r['precision'] == 'auto' else r['precision']}"
                       f"{', compiled blocks' if r['compiled'] else ', eager'}")
            rows.append(row("pretrain, robustmim engine", r["objective"], setting, r["images_per_s"], r["mfu"],
                            r["peak_gib"], note))
        return rows

    def certification():
        from bench.certify import measure

        r = measure(encoder, 1 if smoke else 2, 200 if smoke else 10_000, 10 if smoke else 100,
                    100 if smoke else 1000)
        return [row("eval", "CERTIFY", f"N {r['n']}, n0 {r['n0']}, batch {r['batch']}, {r['dtype']}, "
                    f"{'compiled blocks' if r['compiled'] else 'eager'}",
                    r["images_per_s"], note=f"{r['s_per_image']:.2f} s/image")]

    def attacks():
        from bench.attacks import measure

        rows = []
        for eot in (1, 16):
            r = measure(encoder, 4 if smoke else 50, 2 if smoke else 10, 2 if smoke and eot > 1 else eot,
                        repeats=1)
            rows.append(row("eval", r["attack"], f"batch {r['batch']}, {r['precision']}, "
                            f"{'compiled blocks' if r['compiled'] else 'eager'}", r["images_per_s"],
                            peak=r["peak_gib"]))
        return rows

    def loader():
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            return [row("loader", "DALI", "–", note="not run: DALI is not installed here (~0.8 GB; cannot travel "
                                                     "to a machine without network)")]
        import subprocess

        command = [sys.executable, "-m", "bench.loader", "--skip-reference", "--batches", "20" if smoke else "200",
                   "--jpegs", "200" if smoke else "3000"]
        out = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("JPEG")]
        return [row("loader", "DALI", " ".join(line.split()[:-1]), float(line.split()[-1])) for line in lines] or \
            [row("loader", "DALI", "–", note=f"failed: {out.stderr.strip().splitlines()[-1:]}")]

    # The targets first, as users run them (the defaults: bf16 autocast, compiled blocks on GPU),
    # then what the defaults were chosen against: eager blocks, and DeepSpeed's bf16 weights with
    # fp32 masters (losses within tolerance of fp32 in tests/test_engine.py).
    return [("device", device), ("model-only", lambda: model_only(False)),
            ("engine", lambda: engine(objectives, compile="true" if smoke else "auto")),
            ("certify", certification), ("attacks", attacks),
            ("engine-eager", lambda: engine(["mae"], compile="false")),
            ("engine-bf16-weights", lambda: engine(["mae"], precision="bf16_weights")),
            ("model-only-compiled", lambda: model_only(True)),
            ("loader", loader)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy scale on any machine (tests)")
    parser.add_argument("--budget-s", type=float, default=400.0, help="start no section after this many seconds")
    parser.add_argument("--out", help="also write the table to this file (rewritten after every section)")
    parser.add_argument("--sections", help="comma-separated section names to run (default: all)")
    args = parser.parse_args()
    from robustmim.fileio import atomic_write_text

    started = time.monotonic()
    lines = [f"GPU check: {environment()}", "", HEADER]
    print("\n".join(lines), flush=True)

    def record(new_lines: list[str]) -> None:
        """Print rows as they are measured and keep --out whole, so a run stopped from outside
        still leaves every figure it had."""
        lines.extend(new_lines)
        print("\n".join(new_lines), flush=True)
        if args.out:
            atomic_write_text(Path(args.out), "\n".join(lines) + "\n")

    planned = sections(args.smoke)
    if args.sections:
        wanted = [name.strip() for name in args.sections.split(",")]
        unknown = sorted(set(wanted) - {name for name, _ in planned})
        if unknown:
            parser.error(f"unknown --sections {unknown}; the sections are: {', '.join(name for name, _ in planned)}")
        planned = [(name, measure) for name, measure in planned if name in wanted]
    for name, measure in planned:
        if time.monotonic() - started > args.budget_s:
            record([row(name, "–", "–", note=f"not run: past the {args.budget_s:.0f}-s budget")])
            continue
        section_started = time.monotonic()
        try:
            record(measure())
        except Exception as e:  # noqa: BLE001 - one failing section must not hide the others' figures
            traceback.print_exc()
            record([row(name, "–", "–", note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")])
        print(f"[{name}: {time.monotonic() - section_started:.0f} s]", file=sys.stderr, flush=True)
    record(["", f"total {time.monotonic() - started:.0f} s"])


if __name__ == "__main__":
    main()
