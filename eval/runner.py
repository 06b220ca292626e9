"""The evaluation driver: each rank (or array task) evaluates its exact chunk of the selected
samples and appends records; the merge checks completeness and writes the results.

Ranks need no collective while they work, so the same code runs under torchrun (a barrier
before the merge), as independent Slurm array tasks (`--rank/--world-size`, merge later with
`--merge-only` or `robustmim report`), or as one process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch

from robustmim.config import load_config
from robustmim.errors import UserError
from robustmim.fileio import atomic_write_json, atomic_write_text, sha256_of_file
from robustmim.provenance import write_provenance
from robustmim.log import get_logger
from robustmim.pipeline.data.config import LoaderConfig
from robustmim.pipeline.data.dali import DaliLoader
from robustmim.pipeline.data.shardset import open_shards
from robustmim.pipeline.models.deployed import DefenseKind, load_deployed, read_spec
from robustmim.eval.apgd import autoattack
from robustmim.eval.attack_names import attack_key, autoattack_fields, pgd_fields, planned_attacks
from robustmim.eval.attacks import pgd_attack
from robustmim.eval.certify import ABSTAIN, certify, largest_certifiable_radius, predict
from robustmim.eval.config import AutoAttackVersion, EvalConfig
from robustmim.pipeline.engine.config import compiles, uses_bf16
from robustmim.pipeline.models.vit import compile_blocks
from robustmim.eval.model import EvalModel
from robustmim.eval.records import MERGED, RECORDS_DIR, RECORDS_FORMAT, RecordWriter, merge_records, recorded_indices
from robustmim.eval.sampling import CERTIFY_ESTIMATE, CERTIFY_SELECT, CLEAN, PREDICT, selected_indices
from robustmim.pipeline.randomness import sample_generator
from robustmim.eval.summary import cohen_table, summarize

log = get_logger(__name__)

PLAN = "plan.json"


def certify_sigma(cfg: EvalConfig, spec) -> float | None:
    """The smoothing sigma when certification or prediction is asked for."""
    if not (cfg.certify.enabled or cfg.predict.enabled):
        return None
    if spec.defense is DefenseKind.denoise:
        raise UserError(f"{cfg.model}: De³ draws its own noise inside the model; randomized smoothing needs a "
                        f"deterministic base classifier (a standard, dmae or mimir export)")
    sigma = cfg.certify.sigma if cfg.certify.sigma is not None else (
        spec.sigma if spec.defense is DefenseKind.smoothing else None)
    if sigma is None:
        raise UserError(f"{cfg.model} was not trained for smoothing: set certify.sigma")
    return sigma


# Settings that do not change any record (per-sample seeding makes batching irrelevant) and so
# may change between a run and its restart; every other key of EvalConfig shapes the records.
# Compiled blocks round like another batch size does (fused kernels), no more: performance only.
PERFORMANCE_ONLY = ("model", "shards", "out_dir", "batch_size", "num_threads", "certify.batch", "predict.batch",
                    "certify.radii", "fresh", "max_samples", "every_nth", "split", "seed", "compact_attacks",
                    "compile")


def record_settings(cfg: EvalConfig) -> dict:
    """Every setting that shapes a record, flattened ("attacks.0.step_size": 0.01, ...). The
    model, split, seed and sample list are compared separately (they have their own plan keys)."""
    from omegaconf import OmegaConf

    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for number, inner in enumerate(value):
                walk(f"{prefix}.{number}", inner)
        else:
            flat[prefix] = value

    walk("", OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True))
    if not cfg.autoattack.enabled:  # a disabled section shapes nothing
        flat = {k: v for k, v in flat.items() if not k.startswith("autoattack.") or k == "autoattack.enabled"}
    for section in ("certify", "predict"):
        if not getattr(cfg, section).enabled:
            flat = {k: v for k, v in flat.items() if not k.startswith(f"{section}.") or k == f"{section}.enabled"}
    flat["records_format"] = RECORDS_FORMAT  # records of another format cannot be merged with these
    return {k: v for k, v in sorted(flat.items()) if k not in PERFORMANCE_ONLY}


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in keys if old.get(k) != new.get(k)]


def write_plan(cfg: EvalConfig, check_previous: bool = True) -> dict:
    """The evaluated index list and settings, fixed before any rank starts (same on every rank).
    With `check_previous`, a plan already in out_dir must match: its records were made under it.
    A mismatch is refused naming the settings, or, with `fresh=true`, the old evaluation is
    moved to out_dir/superseded/<time>/ and this one starts from nothing."""
    spec = read_spec(cfg.model)
    if cfg.autoattack.enabled and cfg.autoattack.version is AutoAttackVersion.standard \
            and spec.defense in (DefenseKind.denoise, DefenseKind.smoothing):
        raise UserError(f"{cfg.model}: a randomized model ({spec.defense.value}); autoattack.version=standard is for "
                        f"deterministic models: use autoattack.version=rand (APGD-CE and APGD-DLR with EOT)")
    shards = open_shards(cfg.shards, cfg.split)
    weights = Path(cfg.model).with_suffix(".safetensors")
    settings = record_settings(cfg)
    plan = {"model": str(cfg.model), "weights_sha256": sha256_of_file(weights) if weights.is_file() else None,
            "method": spec.method, "defense": spec.defense.value, "sigma": spec.sigma,
            "certify_sigma": certify_sigma(cfg, spec), "shards": str(cfg.shards), "split": cfg.split,
            "split_size": shards.total, "seed": cfg.seed, "radii": list(cfg.certify.radii),
            "indices": selected_indices(shards.total, cfg.every_nth, cfg.max_samples),
            "attacks": planned_attacks(cfg),  # every attack result's key and settings
            "record_settings": settings, "settings_digest": settings_digest(settings),
            "trained": {k: spec.trained[k] for k in ("init", "samples_seen", "step") if k in spec.trained}}
    if check_previous and cfg.certify.enabled and plan["certify_sigma"]:
        reach = largest_certifiable_radius(plan["certify_sigma"], cfg.certify.n, cfg.certify.alpha)
        beyond = [r for r in cfg.certify.radii if r > reach]
        if beyond:
            log.warning(f"eval: with certify.n={cfg.certify.n} and alpha={cfg.certify.alpha} no radius above "
                        f"{reach:.3f} can be certified at sigma {plan['certify_sigma']:g}; radii {beyond} will read 0")
    out = Path(cfg.out_dir)
    previous = out / PLAN
    if check_previous and previous.is_file():
        old = json.loads(previous.read_text())
        changed = [f"{k}: differs" for k in ("model", "weights_sha256", "split", "seed", "indices", "certify_sigma")
                   if old.get(k) != plan[k]]
        changed += _differences(old.get("record_settings", {}), settings)
        if changed and cfg.fresh:
            aside = out / "superseded" / time.strftime("%Y%m%dT%H%M%S")
            aside.mkdir(parents=True)
            for name in (PLAN, RECORDS_DIR, MERGED, "summary.json", "certify.tsv"):
                if (out / name).exists():
                    (out / name).rename(aside / name)
            log.info(f"eval: settings changed ({'; '.join(changed)}); the previous evaluation moved to {aside}")
        elif changed:
            raise UserError(f"{out} holds records made with other settings ({'; '.join(changed)}): use another "
                            f"out_dir, or fresh=true to move the old evaluation aside and start over")
    return plan


def loader_for(cfg: EvalConfig, spec, rank: int, world_size: int, local_rank: int) -> DaliLoader:
    data = load_config(LoaderConfig, None, [f"shards={cfg.shards}", f"split={cfg.split}"])
    data = dataclasses.replace(data, batch_size=cfg.batch_size, image_size=spec.classifier.img_size,
                               channels=spec.classifier.in_chans, augment=False,
                               eval_crop_fraction=cfg.eval_crop_fraction, num_threads=cfg.num_threads)
    return DaliLoader(data, rank, world_size, local_rank, train=False)


def evaluate_batch(model: EvalModel, images, labels, indices: list[int], cfg: EvalConfig, sigma,
                   digest: str = "") -> list[dict]:
    started = time.perf_counter()
    device = images.device
    records = [{"idx": i, "label": label, "settings": digest} for i, label in zip(indices, labels.tolist())]
    results: dict[str, dict[str, torch.Tensor]] = {}
    if cfg.clean:
        generators = [sample_generator(cfg.seed, i, CLEAN, device=device) for i in indices]
        pred = model.vote(images, generators, cfg.clean_draws)
        results["clean"] = {"pred": pred, "correct": pred == labels}
    for number, attack in enumerate(cfg.attacks):
        per_epsilon = pgd_attack(model, images, labels, indices, attack, number, cfg.seed, cfg.compact_attacks)
        for epsilon, result in zip(attack.epsilons, per_epsilon):
            results[attack_key(pgd_fields(attack, epsilon))] = result
    if cfg.autoattack.enabled:
        aa = cfg.autoattack
        for part, result in autoattack(model, images, labels, indices, aa, cfg.seed, cfg.compact_attacks).items():
            results[attack_key(autoattack_fields(aa, part.replace("-", "")))] = result
    shared = (time.perf_counter() - started) / len(indices)
    host = {name: {k: v.tolist() for k, v in result.items()} for name, result in results.items()}  # one read
    for position, record in enumerate(records):
        sample_started = time.perf_counter()
        if "clean" in host:
            record["clean"] = {"pred": host["clean"]["pred"][position], "correct": host["clean"]["correct"][position]}
        record["attacks"] = {name: {k: v[position] for k, v in result.items()}
                             for name, result in host.items() if name != "clean"}
        image, idx = images[position], record["idx"]
        if cfg.certify.enabled:
            c = cfg.certify
            cert = certify(model.base_classifier, image, sigma, c.n0, c.n, c.alpha, c.batch,
                           sample_generator(cfg.seed, idx, CERTIFY_SELECT, device=device),
                           sample_generator(cfg.seed, idx, CERTIFY_ESTIMATE, device=device), model.num_classes)
            record["certify"] = {"predict": cert.prediction, "radius": cert.radius, "count": cert.count,
                                 "p_lower": cert.p_lower, "correct": cert.prediction == record["label"],
                                 "sigma": sigma, "n0": c.n0, "n": c.n, "alpha": c.alpha}
        if cfg.predict.enabled:
            p = cfg.predict
            prediction = predict(model.base_classifier, image, sigma, p.n, p.alpha, p.batch,
                                 sample_generator(cfg.seed, idx, PREDICT, device=device), model.num_classes)
            record["predict"] = {"predict": prediction, "correct": prediction == record["label"],
                                 "abstain": prediction == ABSTAIN, "sigma": sigma, "n": p.n, "alpha": p.alpha}
        record["time_s"] = shared + time.perf_counter() - sample_started
    return records


def evaluate_chunk(cfg: EvalConfig, plan: dict, rank: int, world_size: int, local_rank: int,
                   device: torch.device, show_progress: bool = False) -> int:
    """Evaluate this rank's chunk of the plan's indices, skipping recorded ones; returns the count.
    With `show_progress`, a progress bar (plain lines in Slurm logs) with samples/s and ETA."""
    from robustmim.pipeline.engine.metrics import Progress

    module, spec = load_deployed(cfg.model, device)
    if compiles(cfg.compile, device.type == "cuda"):
        compile_blocks(module)
    model = EvalModel(module, spec)
    loader = loader_for(cfg, spec, rank, world_size, local_rank)
    out = Path(cfg.out_dir)
    selected, done = set(plan["indices"]), recorded_indices(out)
    chunk = range(loader.first_index, loader.first_index + loader.chunk_size)
    todo = sum(1 for i in chunk if i in selected and i not in done)
    progress = Progress(todo, 0, "sample", "eval: samples") if show_progress else None
    started = time.perf_counter()
    writer = RecordWriter(out, rank)
    pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (index, image, label) awaiting a full batch
    evaluated, index = 0, loader.first_index

    bf16 = uses_bf16(cfg.precision, device.type == "cuda")

    def flush() -> None:
        images = torch.stack([image for _, image, _ in pending]).to(device)
        labels = torch.stack([label for _, _, label in pending]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            records = evaluate_batch(model, images, labels, [i for i, _, _ in pending], cfg, plan["certify_sigma"],
                                     plan["settings_digest"])
        for record in records:
            writer.write(record)
        pending.clear()
        if progress:
            rate = evaluated / (time.perf_counter() - started)
            progress.show(evaluated, f"{rate:.2f} samples/s, eta {(todo - evaluated) / rate / 60:.1f} min")

    try:
        # A sparse subset (every 50th image) leaves few samples per loader batch: gather them
        # into full batches so attacks run at the configured batch size.
        for batch in loader:
            for position in range(batch.labels.shape[0]):
                if index + position in selected and index + position not in done:
                    pending.append((index + position, batch.images[position].clone(), batch.labels[position].clone()))
                    evaluated += 1
                if len(pending) == cfg.batch_size:
                    flush()
            index += batch.labels.shape[0]
        if pending:
            flush()
    finally:
        writer.close()
        if progress:
            progress.close()
    return evaluated


def finalize(out_dir: str | Path) -> dict:
    """Merge the rank files (strictly), then write records.jsonl, certify.tsv and summary.json."""
    out = Path(out_dir)
    if not (out / PLAN).is_file():
        raise UserError(f"{out}: no {PLAN}; not an evaluation directory")
    plan = json.loads((out / PLAN).read_text())
    made_as = plan.get("record_settings", {}).get("records_format", 1)
    if made_as != RECORDS_FORMAT:
        raise UserError(f"{out / PLAN}: an evaluation by an earlier robustmim (records format {made_as}, this one "
                        f"merges {RECORDS_FORMAT}); re-run it with fresh=true")
    records = merge_records(out, plan["indices"], plan.get("settings_digest"))
    atomic_write_text(out / MERGED, "".join(json.dumps(r) + "\n" for r in records))
    if records and "certify" in records[0]:
        atomic_write_text(out / "certify.tsv", cohen_table(records))
    summary = summarize(records, plan)
    atomic_write_json(out / "summary.json", summary)
    return summary


def run_eval(cfg: EvalConfig, rank: int | None = None, world_size: int | None = None, merge: bool = True) -> dict:
    """torchrun / srun / one process (rank None), or one array task (rank and world_size given)."""
    from robustmim.pipeline.dist import detect_env, init_distributed, shutdown_distributed

    env = detect_env()
    array_task = rank is not None
    rank = env.rank if rank is None else rank
    world_size = env.world_size if world_size is None else world_size
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", env.local_rank) if on_gpu else torch.device("cpu")
    collective = not array_task and world_size > 1
    plan = write_plan(cfg, check_previous=rank == 0 or array_task)  # rank 0 decides for a torchrun group
    if collective:
        init_distributed(env, on_gpu)
    try:
        out = Path(cfg.out_dir)
        if rank == 0 or array_task:
            out.mkdir(parents=True, exist_ok=True)
            write_provenance(out, cfg, "eval")
            atomic_write_json(out / PLAN, plan)
        if collective:
            torch.distributed.barrier()
        evaluated = evaluate_chunk(cfg, plan, rank, world_size, env.local_rank if not array_task else 0, device,
                                   show_progress=rank == 0 or array_task)
        if collective:
            torch.distributed.barrier()  # every rank's records are complete
        summary = finalize(out) if merge and rank == 0 and not array_task else None
        return {"rank": rank, "evaluated": evaluated, "summary": summary}
    finally:
        if collective:
            shutdown_distributed()
