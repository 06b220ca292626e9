"""Sharded DeepSpeed checkpoints that only become visible when complete.

Layout: <out_dir>/checkpoints/step_NNNNNNNN/ (DeepSpeed's shards, plus `robustmim.json`: step,
samples seen, world size, stage, config hash, the run's id) and `latest`, naming the newest complete tag. Every
rank writes its shards; after a barrier rank 0 writes robustmim.json, then replaces `latest`
atomically, then prunes all but the last `keep_last` tags. A crash at any point leaves
`latest` naming a complete checkpoint.

Per-rank state that DeepSpeed's client state would keep only from rank 0 (the loader's DALI
position, torch RNG states) is gathered and saved in the client state as per-rank lists.

Before anything is loaded, the chosen tag's files are checked against the sizes and sha256
digests its metadata recorded, and every pickle is parsed with torch's restricted unpickler
(pipeline/engine/checkpoint_files.py): a damaged checkpoint is moved to checkpoints/damaged/ and
the previous complete one is used; one holding code is refused. A missing `latest` falls back
to the newest complete tag.

Elastic resume: when the saved world size differs, rank 0 converts the tag to DeepSpeed's
universal format once (`ds_to_universal --inject_missing_state`, kept as <tag>_universal) and
the engine loads it with `load_universal`. Model and optimizer state carry over (to float
rounding); the loaders cannot (DALI's position is per rank and world size), so they restart on
a stream seeded by (seed, step): the run stays deterministic, but its data order from the
resume on differs from an uninterrupted run's.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from robustmim.errors import UserError
from robustmim.fileio import atomic_write_json, atomic_write_text
from robustmim.log import get_logger
from robustmim.pipeline.dist import broadcast_object
from robustmim.pipeline.engine.checkpoint_files import (METADATA, DamagedCheckpoint, check_tag, complete_tags,
                                                        file_records, owned_files, read_metadata, scan_pickles,
                                                        select_checkpoint)

log = get_logger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
DAMAGED_DIR = "damaged"
UNIVERSAL_SUFFIX = "_universal"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@dataclass
class ResumePoint:
    tag: str
    step: int
    samples_seen: int
    world_size: int
    elastic: bool  # saved on another number of ranks: load the universal conversion
    source: Optional[Path] = None  # the checkpoints directory holding `tag` (None: this run's)
    run_id: Optional[str] = None  # the id of the run that saved it (None: saved before ids were kept)

    @property
    def load_tag(self) -> str:
        return self.tag + UNIVERSAL_SUFFIX if self.elastic else self.tag


def warn(text: str) -> None:
    log.warning(text)


class Checkpointer:
    def __init__(self, out_dir: str | Path, keep_last: int, rank: int, world_size: int, stage: str):
        self.dir = Path(out_dir) / CHECKPOINTS_DIR
        self.keep_last, self.rank, self.world_size = keep_last, rank, world_size
        self.stage = stage  # recorded in every checkpoint's metadata: `robustmim export` dispatches on it

    # -- resuming ------------------------------------------------------------------------------
    def latest_tag(self) -> Optional[str]:
        path = self.dir / LATEST
        return path.read_text().strip() if path.is_file() else None

    def resume_point(self, choice: str = "latest") -> Optional[ResumePoint]:
        """The checkpoint to continue from (`checkpoint.resume`: latest, none or a step_*
        directory), chosen and checked by rank 0 and broadcast (all ranks agree); None if there is
        none."""
        point = None
        if self.rank == 0:
            try:
                point = self._choose_among(choice)
            except UserError as e:
                point = e
        point = broadcast_object(point)
        if isinstance(point, UserError):
            raise point
        if point is not None and point.elastic:
            self._ensure_universal(point)
        return point

    def _choose_among(self, choice: str) -> Optional[ResumePoint]:
        own = complete_tags(self.dir)
        if choice == "none":
            if own:
                raise UserError(f"checkpoint.resume=none, but {self.dir} holds checkpoints (newest {own[0]}): choose "
                                f"another out_dir, or resume=latest to continue them")
            return None
        if choice == "latest":
            return self._choose()
        chosen = Path(choice).absolute()
        if own:  # a requeue or re-run of a run that started from `chosen`: continue it
            if chosen.parent != self.dir.absolute():
                log.info(f"note: {self.dir} holds checkpoints of its own; continuing from them, not from {chosen} "
                         f"(checkpoint.resume names where the run started)")
            return self._choose()
        if not (chosen / METADATA).is_file():
            raise UserError(f"checkpoint.resume={choice}: not a complete checkpoint (a step_* directory holding "
                            f"{METADATA})")
        try:
            meta = check_tag(chosen)
        except DamagedCheckpoint as e:
            raise UserError(f"checkpoint.resume={choice} is damaged: {e}") from None
        return ResumePoint(chosen.name, meta["step"], meta["samples_seen"], meta["world_size"],
                           meta["world_size"] != self.world_size, source=chosen.parent, run_id=meta.get("run_id"))

    def _choose(self) -> Optional[ResumePoint]:
        chosen = select_checkpoint(self.dir, self.latest_tag(), warn)
        if chosen is None:
            return None
        tag, meta, damaged = chosen
        for bad in damaged:  # kept for inspection, out of the way of the saves that follow
            aside = self.dir / DAMAGED_DIR / bad
            aside.parent.mkdir(exist_ok=True)
            shutil.rmtree(aside, ignore_errors=True)
            (self.dir / bad).rename(aside)
            shutil.rmtree(self.dir / (bad + UNIVERSAL_SUFFIX), ignore_errors=True)
            warn(f"moved the damaged {bad} to {aside}")
        if self.latest_tag() != tag:
            atomic_write_text(self.dir / LATEST, tag)
        return ResumePoint(tag, meta["step"], meta["samples_seen"], meta["world_size"],
                           meta["world_size"] != self.world_size, run_id=meta.get("run_id"))

    def _ensure_universal(self, point: ResumePoint) -> None:
        target = self.dir / point.load_tag
        if self.rank == 0 and not (target / METADATA).is_file():
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            result = subprocess.run(
                [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                 str(self.source_of(point) / point.tag), "--output_folder", str(partial), "--inject_missing_state"],
                capture_output=True, text=True)
            if result.returncode == 0:
                try:
                    scan_pickles(partial)
                except Exception as e:  # noqa: BLE001 - named in the error below
                    result = subprocess.CompletedProcess(result.args, 1, stderr=f"{e}")
            if result.returncode != 0:
                error = UserError(f"converting {self.source_of(point) / point.tag} to a universal checkpoint for "
                                  f"{self.world_size} ranks failed:\n{result.stderr[-2000:]}")
            else:
                meta = read_metadata(self.source_of(point) / point.tag)
                meta.pop("files", None)  # those digests describe the original tag's files
                atomic_write_json(partial / METADATA, meta)
                shutil.rmtree(target, ignore_errors=True)
                partial.rename(target)
                error = None
        else:
            error = None
        error = broadcast_object(error)
        if error is not None:
            raise error

    def source_of(self, point: ResumePoint) -> Path:
        return point.source if point.source is not None else self.dir

    def load(self, engine, point: ResumePoint) -> dict:
        # a universal conversion is written into this run's directory, also for another run's tag
        folder = self.dir if point.elastic else self.source_of(point)
        try:
            _, client_state = engine.load_checkpoint(str(folder), tag=point.load_tag,
                                                     load_module_strict=True, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
        except RuntimeError as error:
            if "Error(s) in loading state_dict" not in str(error):
                raise
            raise UserError(f"{folder / point.load_tag}: its module's tensors do not match this run's module "
                            f"({key_mismatch(str(error))}). It was saved under another model config, or by a "
                            f"robustmim whose module held other networks (fine-tuning checkpoints from before "
                            f"2026-12 also held the frozen denoiser or tokenizer). Resume it with the version and "
                            f"settings that wrote it, or start a new out_dir; `robustmim export` still reads "
                            f"it.") from None
        if client_state is None:
            raise UserError(f"DeepSpeed could not load {folder / point.load_tag}")
        return client_state

    # -- saving --------------------------------------------------------------------------------
    def save(self, engine, step: int, samples_seen: int, config_hash: str, client_state: dict,
             run_id: Optional[str] = None) -> str:
        tag = tag_for(step)
        try:
            engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            # The launcher (torchrun, srun) stops the other ranks when this one exits.
            free = shutil.disk_usage(self.dir).free
            raise UserError(f"rank {self.rank} could not save checkpoint {self.dir / tag}: "
                            f"{str(e).strip().splitlines()[-1]} ({free / 1e6:.0f} MB free there; a full disk or "
                            f"quota?); {self.dir / LATEST} still names the previous complete checkpoint") from None
        # Each rank digests the files it wrote, so the work is spread and the files are read once.
        records = [None] * self.world_size
        dist.all_gather_object(records, file_records(owned_files(self.dir / tag, self.rank)))
        if self.rank == 0:
            files = {name: record for mine in records for name, record in mine.items()}
            atomic_write_json(self.dir / tag / METADATA, {"step": step, "samples_seen": samples_seen,
                                                          "world_size": self.world_size, "stage": self.stage,
                                                          "config_hash": config_hash, "run_id": run_id,
                                                          "files": files})
            atomic_write_text(self.dir / LATEST, tag)
            self._prune(keep=tag)
        dist.barrier()
        return tag

    def _prune(self, keep: str) -> None:
        tags = sorted(p.name for p in self.dir.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))
        originals = [t for t in tags if not t.endswith(UNIVERSAL_SUFFIX)]
        for old in originals[:-self.keep_last]:
            if old != keep:
                shutil.rmtree(self.dir / old, ignore_errors=True)
                shutil.rmtree(self.dir / (old + UNIVERSAL_SUFFIX), ignore_errors=True)


def key_mismatch(message: str, shown: int = 3) -> str:
    """'N unexpected: a, b, c, ...; M missing: ...' from torch's load_state_dict error."""
    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:shown]) + (", ..." if len(keys) > shown else "")

    parts = []
    for kind in ("Unexpected", "Missing"):
        found = re.search(kind + r' key\(s\) in state_dict: (.*?)\.\s*$', message, re.M)
        if found:
            keys = re.findall(r'"([^"]+)"', found.group(1))
            parts.append(f"{len(keys)} {kind.lower()}: {listed(keys)}")
    sizes = re.findall(r"size mismatch for ([^:]+):", message)
    if sizes:
        parts.append(f"{len(sizes)} of other shapes: {listed(sizes)}")
    return "; ".join(parts) or message.splitlines()[0]
