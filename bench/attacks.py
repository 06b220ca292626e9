"""Attack throughput as `robustmim eval` runs it: PGD images/s on a plain classifier and on a
smoothing classifier with EOT, in the precision eval uses (bf16 autocast on GPU, fp32 on CPU).

    .venv/bin/python -m bench.attacks                                    # tiny ViT, CPU
    python -m bench.attacks --encoder vit_large_patch16 --batch 50       # a GPU: PGD-10, PGD-10 EOT-16

Random weights (the work does not depend on them), compaction off so every image is attacked
at every step: the figure is the attack's cost, not the model's robustness.
"""

from __future__ import annotations

import argparse
import time

import torch

from robustmim.config import load_config
from robustmim.pipeline.models.classifier import ViTClassifier
from robustmim.pipeline.engine.config import compiles
from robustmim.pipeline.models.config import ClassifierConfig
from robustmim.pipeline.models.vit import compile_blocks
from robustmim.pipeline.models.deployed import DefenseKind, DeploymentSpec, deployed_model
from robustmim.eval.attacks import pgd_attack
from robustmim.eval.config import PGDConfig
from robustmim.eval.model import EvalModel


def measure(encoder: str, batch: int, steps: int, eot: int, repeats: int = 2, compile: bool | None = None) -> dict:
    """PGD images/s with `compile` (None: what eval does, compiled blocks on GPU only)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = encoder.startswith("vit_tiny")
    size, channels = (28, 1) if tiny else (224, 3)
    cfg = load_config(ClassifierConfig, None, [f"encoder={encoder}", f"img_size={size}", f"in_chans={channels}",
                                               f"pixel_mean={[0.5] * channels}", f"pixel_std={[0.5] * channels}",
                                               f"num_classes={10 if tiny else 1000}"])
    torch.manual_seed(0)
    model = ViTClassifier(cfg).to(device)
    compiled = compiles(compile, device.type == "cuda")
    if compiled:
        compile_blocks(model)
    defense = DefenseKind.smoothing if eot > 1 else DefenseKind.none
    spec = DeploymentSpec(method="bench", weights="-", classifier=cfg, defense=defense, sigma=0.25)
    attack = load_config(PGDConfig, None, ["epsilons=[0.0157]", f"steps={steps}", f"eot={eot}", "score_draws=1"])
    eval_model = EvalModel(deployed_model(defense, model, spec.sigma), spec)
    images = torch.rand(batch, channels, size, size, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    bf16 = device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for repeat in range(repeats + 1):  # the first is warm-up (and compiles)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            result, = pgd_attack(eval_model, images, labels, list(range(batch)), attack, 0, seed=repeat,
                                 compact=False)
        result["correct"].tolist()  # the host read eval does once per batch
        if repeat:
            times.append(time.perf_counter() - started)
    seconds = min(times)
    return {"encoder": encoder, "attack": f"PGD-{steps}" + (f" EOT-{eot}" if eot > 1 else ""), "batch": batch,
            "precision": "bf16" if bf16 else "fp32", "compiled": compiled, "images_per_s": batch / seconds,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="vit_tiny_patch4")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eot", default="1,16", help="EOT draws per gradient: 1 (a plain model) and/or more")
    parser.add_argument("--compile", choices=["auto", "true", "false"], default="auto",
                        help="compile the classifier's blocks (auto: what `robustmim eval` does, on GPU only)")
    args = parser.parse_args()
    compile = {"auto": None, "true": True, "false": False}[args.compile]
    print(f"{'encoder':<18} {'attack':<14} {'batch':>5} {'dtype':>5} {'compiled':>8} {'images/s':>9} {'peak GiB':>9}")
    for eot in (int(e) for e in args.eot.split(",")):
        r = measure(args.encoder, args.batch, args.steps, eot, compile=compile)
        print(f"{r['encoder']:<18} {r['attack']:<14} {r['batch']:>5} {r['precision']:>5} {str(r['compiled']):>8} "
              f"{r['images_per_s']:>9.1f} {r['peak_gib']:>9.1f}")


if __name__ == "__main__":
    main()
