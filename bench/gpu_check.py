"""Every GPU measurement of the project in one command and one table (docs/benchmarks.md).

    bash bench/gpu_check.sh                 # or `make bench-gpu`: ViT-L on the GPU, < 9 minutes
    python -m bench.gpu_check --smoke       # the same code at toy scale on a CPU (the tests run it)

Rows: pretraining steps per objective, model-only (`bench.step`, eager and with compiled
blocks for MAE) and through `robustmim pretrain`'s Trainer (`bench.train_step`: DeepSpeed
ZeRO-1, 2 micro-steps per step, synthetic device batches); CERTIFY at N = 10,000 (s/image);
PGD-10 and PGD-10 with EOT 16 (images/s); the DALI loader where DALI is installed. MFU is
always against 989 TFLOP/s (dense bf16, H100/H200). Sections past `--budget-s` are reported as
not run, so the command ends in time. Needs torch with CUDA, timm and PyYAML; omegaconf and
deepspeed may come as wheels (bench/gpu_check.sh installs a `.whl/` folder first); DALI is
optional.
"""

from __future__ import annotations

import sys

if not __package__:
    sys.exit("run from the repository root as: python -m bench.gpu_check")

import argparse
import datetime as _dt
import platform
import time
import traceback
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
    """(name, function returning rows) in the order they run."""
    encoder = "vit_tiny_patch4" if smoke else "vit_large_patch16"
    batches = {"mae": 16, "dmae": 16, "mimir": 16, "nim": 16} if smoke else \
        {"mae": 256, "dmae": 256, "mimir": 256, "nim": 128}
    dtype = "fp32" if smoke else "bf16"
    objectives = ["mae"] if smoke else ["mae", "dmae", "mimir", "nim"]

    def model_only():
        from bench.step import measure

        rows = []
        for r in measure(encoder, objectives, 16, dtype, warmup=1 if smoke else 3, steps=2 if smoke else 10,
                         compile_blocks_too=False, batches=batches):
            rows.append(row("pretrain, model only", r["objective"], f"micro {r['batch']}, {dtype}, eager",
                            r["images_per_s"], r["mfu"], r["peak_gib"]))
        if not smoke:  # torch.compile per block, MAE only (compiling takes a minute)
            for r in measure(encoder, ["mae"], 16, dtype, warmup=3, steps=10, compile_blocks_too=True,
                             batches=batches)[1:]:
                rows.append(row("pretrain, model only", r["objective"], f"micro {r['batch']}, {dtype}, compiled",
                                r["images_per_s"], r["mfu"], r["peak_gib"]))
        return rows

    def engine():
        from bench.train_step import run

        args = SimpleNamespace(encoder=encoder, objectives=",".join(objectives), micro=16 if smoke else 0,
                               accumulation=2, intervals=3 if smoke else 4, log_every=2 if smoke else 3,
                               zero_stage=1, compile=False, precision="auto")
        results = run(args)
        # MAE again with DeepSpeed's bf16 weights (fp32 masters) against autocast over fp32 weights: the
        # faster of the two, losses within tolerance of fp32 (tests/test_engine.py), is the GPU default.
        results += run(SimpleNamespace(**{**vars(args), "objectives": "mae", "precision": "bf16_weights"}))
        return [row("pretrain, robustmim engine", r["objective"],
                    f"micro {r['micro']} x {r['accumulation']}, ZeRO-1, "
                    f"{dtype if r['precision'] == 'auto' else r['precision']}", r["images_per_s"], r["mfu"],
                    r["peak_gib"], "synthetic device batches") for r in results]

    def certification():
        from bench.certify import measure

        r = measure(encoder, 1 if smoke else 2, 200 if smoke else 10_000, 10 if smoke else 100,
                    100 if smoke else 1000)
        return [row("eval", "CERTIFY", f"N {r['n']}, n0 {r['n0']}, batch {r['batch']}, {r['dtype']}",
                    r["images_per_s"], note=f"{r['s_per_image']:.2f} s/image")]

    def attacks():
        from bench.attacks import measure

        rows = []
        for eot in (1, 16):
            r = measure(encoder, 4 if smoke else 50, 2 if smoke else 10, 2 if smoke and eot > 1 else eot,
                        repeats=1)
            rows.append(row("eval", r["attack"], f"batch {r['batch']}, {r['precision']}", r["images_per_s"],
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

    return [("model only", model_only), ("engine", engine), ("certify", certification), ("attacks", attacks),
            ("loader", loader)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy scale on any machine (tests)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no section after this many seconds")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    started = time.monotonic()
    lines = [f"GPU check: {environment()}", "", HEADER]
    for name, measure in sections(args.smoke):
        if time.monotonic() - started > args.budget_s:
            lines.append(row(name, "–", "–", note=f"not run: past the {args.budget_s:.0f}-s budget"))
            continue
        section_started = time.monotonic()
        try:
            lines += measure()
        except Exception as e:  # noqa: BLE001 - one failing section must not hide the others' figures
            traceback.print_exc()
            lines.append(row(name, "–", "–", note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"))
        print(f"[{name}: {time.monotonic() - section_started:.0f} s]", file=sys.stderr, flush=True)
    lines.append("")
    lines.append(f"total {time.monotonic() - started:.0f} s")
    table = "\n".join(lines)
    print(table, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
