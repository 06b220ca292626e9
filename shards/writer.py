"""Writing one shard in a worker process: decode-check, write under a temporary name, index,
rename. Completion is recorded last, in `.build/<shard>.json`, which is what a resumed build
trusts (after rechecking the hashes it records)."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from robustmim.fileio import atomic_write_json, atomic_write_text, sha256_of_file
from robustmim.shards.images import EncodedImage, UndecodableImage, encode_file_bytes, encode_pixels
from robustmim.shards.sources import Payload, SourceSample
from robustmim.shards.tario import SampleTarWriter, dali_index_text

BUILD_RECORDS_DIR = ".build"


@dataclass
class ShardTask:
    out_dir: str
    name: str
    split: str
    fingerprint: str
    samples: list[SourceSample]
    payloads: list[Payload]
    class_ids: list[str]  # label -> class id, written into each image file's json metadata


@dataclass
class ShardRecord:
    """What a completed shard holds; the manifest is assembled from these."""

    name: str
    split: str
    fingerprint: str
    samples: int
    bytes: int
    sha256: str
    index_sha256: str
    converted: int = 0
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"} per sample left out

    @property
    def tar_name(self) -> str:
        return f"{self.name}.tar"

    @property
    def index_name(self) -> str:
        return f"{self.name}.idx"


def record_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / BUILD_RECORDS_DIR / f"{name}.json"


def read_record(out_dir: str | Path, name: str) -> ShardRecord | None:
    try:
        return ShardRecord(**json.loads(record_path(out_dir, name).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _encode(payload: Payload, sample: SourceSample, class_ids: list[str]) -> tuple[EncodedImage, dict | None]:
    if isinstance(payload, np.ndarray):
        return encode_pixels(payload), None
    try:
        with open(payload, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UndecodableImage(f"cannot read: {e.strerror}") from None
    image = encode_file_bytes(data)
    meta = {"source": str(sample.ref), "class": class_ids[sample.label],
            "width": image.width, "height": image.height, **image.meta}
    return image, meta


def sample_members(sample: SourceSample, image: EncodedImage, meta: dict | None) -> list[tuple[str, bytes]]:
    members = [("cls", str(sample.label).encode()),
               ("cls.i32", struct.pack("<i", sample.label)),
               (image.ext, image.data)]
    if meta is not None:
        members.append(("json", json.dumps(meta, sort_keys=True).encode()))
    return members


def write_shard(task: ShardTask) -> ShardRecord:
    out = Path(task.out_dir)
    tar_path, idx_path = out / f"{task.name}.tar", out / f"{task.name}.idx"
    tmp_path = out / f".{task.name}.tar.tmp"
    skipped, written, converted = [], 0, 0
    try:
        with open(tmp_path, "wb") as f:
            writer = SampleTarWriter(f)
            for sample, payload in zip(task.samples, task.payloads, strict=True):
                try:
                    image, meta = _encode(payload, sample, task.class_ids)
                except UndecodableImage as e:
                    skipped.append({"path": str(payload) if isinstance(payload, str) else sample.key,
                                    "reason": str(e)})
                    continue
                writer.add(sample.key, sample_members(sample, image, meta))
                written += 1
                converted += bool(meta and "converted" in meta)
            size, sha = writer.close()
            f.flush()
            os.fsync(f.fileno())
        record = ShardRecord(task.name, task.split, task.fingerprint, written, size, sha, "", converted, skipped)
        if written:
            index_text = dali_index_text(tmp_path)
            atomic_write_text(idx_path, index_text)
            record.index_sha256 = sha256_of_file(idx_path)
            os.replace(tmp_path, tar_path)  # the tar appears under its name only when complete
        else:  # every sample was skipped: no shard at all (an empty tar would trouble readers)
            tar_path.unlink(missing_ok=True)
            idx_path.unlink(missing_ok=True)
    finally:
        tmp_path.unlink(missing_ok=True)
    atomic_write_json(record_path(out, task.name), asdict(record))
    return record


def check_completed(out_dir: str, name: str, fingerprint: str) -> ShardRecord | None:
    """The shard's record if the shard on disk is complete, intact and still the planned one."""
    record = read_record(out_dir, name)
    if record is None or record.fingerprint != fingerprint:
        return None
    if record.samples == 0:
        return record
    tar_path, idx_path = Path(out_dir) / record.tar_name, Path(out_dir) / record.index_name
    try:
        intact = (tar_path.stat().st_size == record.bytes and sha256_of_file(tar_path) == record.sha256
                  and sha256_of_file(idx_path) == record.index_sha256)
    except OSError:
        return None
    return record if intact else None
