"""`robustmim shards build`: list → plan → write shards in parallel → manifest.

Resumable: each shard is written under a temporary name and renamed when complete, then
recorded in `.build/`. A re-run keeps every planned shard whose record and hashes check, and
writes the rest. `manifest.json` is removed before any shard is (re)written and written again,
atomically, only when every shard is complete, so it never lists a half-written shard.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
from pathlib import Path

from robustmim.errors import UserError
from robustmim.fileio import atomic_write_text
from robustmim.provenance import write_provenance
from robustmim.log import get_logger
from robustmim.shards.config import ShardsConfig
from robustmim.shards.manifest import SKIPPED_NAME, Manifest, ShardEntry, SplitEntry, manifest_path, save_manifest
from robustmim.shards.parallel import run_parallel
from robustmim.shards.plan import SHARD_FILE, ShardPlan, plan_split
from robustmim.shards.sources import Skipped, Source, open_source
from robustmim.shards.writer import BUILD_RECORDS_DIR, ShardRecord, ShardTask, check_completed, read_record, write_shard

log = get_logger(__name__)

_TMP_FILE = re.compile(r"^\..*\.tmp(-\d+)?$")


def prepare_output(out: str) -> Path:
    out_dir = Path(out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / BUILD_RECORDS_DIR).mkdir(exist_ok=True)
        probe = out_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output directory {out_dir} is not writable: {e.strerror or e}") from None
    for leftover in out_dir.iterdir():  # temporary files of an interrupted build
        if _TMP_FILE.match(leftover.name):
            leftover.unlink()
    return out_dir


def remove_unplanned_shards(out_dir: Path, plans: list[ShardPlan]) -> list[str]:
    """Shards of an earlier build with other settings would sit unlisted beside the new ones."""
    planned = {p.name for p in plans}
    removed = []
    for path in sorted(out_dir.iterdir()):
        m = SHARD_FILE.match(path.name)
        if m and m["name"] not in planned:
            path.unlink()
            removed.append(path.name)
    for record in (out_dir / BUILD_RECORDS_DIR).glob("*.json"):
        if record.stem not in planned:
            record.unlink()
    return removed


def build_shards(cfg: ShardsConfig) -> Manifest:
    workers = cfg.workers or os.cpu_count() or 1
    out_dir = prepare_output(cfg.out_dir)
    source = open_source(cfg)
    provenance = write_provenance(out_dir, cfg, "shards build")

    plans: list[ShardPlan] = []
    listing_skips: dict[str, list[Skipped]] = {}
    for split in cfg.splits:
        samples, listing_skips[split] = source.list_split(split)
        plans += plan_split(split, samples, cfg.seed, cfg.shard_max_bytes, cfg.shard_max_samples)
    removed = remove_unplanned_shards(out_dir, plans)
    if removed:
        log.info(f"removed {len(removed)} shard file(s) of an earlier build not in this plan")

    recorded = [p for p in plans if (r := read_record(out_dir, p.name)) and r.fingerprint == p.fingerprint()]
    checks = [(str(out_dir), p.name, p.fingerprint()) for p in recorded]
    kept = [r for r in run_parallel(check_completed, checks, workers, "checking existing shards",
                                    [1] * len(checks), "shard") if r is not None]
    records = {r.name: r for r in kept}
    todo = [p for p in plans if p.name not in records]
    if todo:
        manifest_path(out_dir).unlink(missing_ok=True)
        if kept:
            log.info(f"resuming: {len(kept)} completed shard(s) kept, {len(todo)} to write")
        tasks = [(_task(out_dir, source, p),) for p in todo]
        try:
            for r in run_parallel(write_shard, tasks, workers, "writing shards", [len(p.samples) for p in todo],
                                  "img"):
                records[r.name] = r
        except OSError as e:  # a full disk or quota: every completed shard is recorded and kept
            free = shutil.disk_usage(out_dir).free
            raise UserError(f"writing shards into {out_dir} failed: {e.strerror or e} ({e.filename or 'a shard'}; "
                            f"{free / 1e6:.0f} MB free there). Completed shards are kept: free some space and run "
                            f"the same command again to resume") from None

    manifest = _assemble_manifest(cfg, source, plans, records, listing_skips, provenance["git_sha"])
    _write_skipped(out_dir, cfg.splits, plans, records, listing_skips)
    save_manifest(out_dir, manifest)
    return manifest


def _task(out_dir: Path, source: Source, plan: ShardPlan) -> ShardTask:
    return ShardTask(str(out_dir), plan.name, plan.split, plan.fingerprint(), plan.samples,
                     source.payload(plan.split, plan.samples), [c.id for c in source.classes])


def _assemble_manifest(cfg, source: Source, plans, records: dict[str, ShardRecord],
                       listing_skips, git_sha: str) -> Manifest:
    splits = {}
    for split in cfg.splits:
        split_records = [records[p.name] for p in plans if p.split == split]
        shards = [ShardEntry(r.tar_name, r.index_name, r.samples, r.bytes, r.sha256, r.index_sha256)
                  for r in split_records if r.samples]
        splits[split] = SplitEntry(
            total=sum(r.samples for r in split_records),
            skipped=sum(len(r.skipped) for r in split_records) + len(listing_skips[split]),
            converted=sum(r.converted for r in split_records),
            shards=shards)
    return Manifest(
        source={"kind": cfg.source.value, "path": str(Path(cfg.input).resolve())},
        seed=cfg.seed,
        classes=[{"index": c.index, "id": c.id, "name": c.name} for c in source.classes],
        image=dict(source.image_info),
        splits=splits,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        git_sha=git_sha)


def _write_skipped(out_dir: Path, splits, plans, records, listing_skips) -> None:
    rows = []
    for split in splits:
        entries = [{"path": s.path, "reason": s.reason} for s in listing_skips[split]]
        for p in plans:
            if p.split == split:
                entries += records[p.name].skipped
        rows += [{"split": split, **e} for e in sorted(entries, key=lambda e: e["path"])]
    atomic_write_text(out_dir / SKIPPED_NAME, "".join(json.dumps(r) + "\n" for r in rows))
