"""`manifest.json`: the description of a shard directory that every later stage trusts.

It is written last, atomically, from the records of completed shards, so a shard listed in it
is complete. `verification` is filled by `robustmim shards verify`; loaders refuse a directory
whose last verification failed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from robustmim.errors import UserError
from robustmim.fileio import atomic_write_json

MANIFEST_NAME = "manifest.json"
SKIPPED_NAME = "skipped.jsonl"
MANIFEST_FORMAT = "robustmim-shards/1"
# Member extensions of every sample (the image is one of IMAGE_EXTENSIONS).
MEMBERS = {"label": "cls", "label_int32": "cls.i32", "image": ["jpg", "png"], "metadata": "json"}


@dataclass
class ShardEntry:
    name: str  # the tar's file name
    index: str  # the DALI index's file name
    samples: int
    bytes: int
    sha256: str
    index_sha256: str = ""  # checked at every loader start (manifests before it lack it)


@dataclass
class SplitEntry:
    total: int
    skipped: int
    converted: int  # images re-encoded to PNG (CMYK JPEG, palette PNG, other formats)
    shards: list[ShardEntry]


@dataclass
class Manifest:
    source: dict  # {"kind", "path"}
    seed: int
    classes: list[dict]  # {"index", "id", "name"}
    image: dict  # what every image shares, e.g. {"mode": "L", "width": 28, "height": 28}
    splits: dict[str, SplitEntry]
    created: str
    git_sha: str
    members: dict = field(default_factory=lambda: dict(MEMBERS))
    verification: dict | None = None  # {"status": "passed"|"failed", "time", "problems", ...}
    format: str = MANIFEST_FORMAT

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def skipped_total(self) -> int:
        return sum(s.skipped for s in self.splits.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_classes"] = self.num_classes
        d["skipped_total"] = self.skipped_total
        return d


def manifest_path(shard_dir: str | Path) -> Path:
    return Path(shard_dir) / MANIFEST_NAME


def save_manifest(shard_dir: str | Path, manifest: Manifest) -> None:
    atomic_write_json(manifest_path(shard_dir), manifest.to_dict())


def load_manifest(shard_dir: str | Path) -> Manifest:
    path = manifest_path(shard_dir)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no manifest: {path} (build the shards with `robustmim shards build`)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable manifest: {e}") from None
    if d.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path}: format '{d.get('format')}', expected '{MANIFEST_FORMAT}'")
    try:
        splits = {name: SplitEntry(**{**s, "shards": [ShardEntry(**e) for e in s["shards"]]})
                  for name, s in d["splits"].items()}
        fields = {k: d[k] for k in ("source", "seed", "classes", "image", "created", "git_sha", "members")}
        return Manifest(splits=splits, verification=d.get("verification"), **fields)
    except (KeyError, TypeError) as e:
        raise UserError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None


def summary_text(manifest: Manifest, shard_dir: str | Path) -> str:
    rows = [("split", "shards", "samples", "skipped", "converted", "GB")]
    for name, s in manifest.splits.items():
        gb = sum(e.bytes for e in s.shards) / 1e9
        rows.append((name, str(len(s.shards)), str(s.total), str(s.skipped), str(s.converted), f"{gb:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)
    verified = manifest.verification["status"] if manifest.verification else "not yet verified"
    return (f"shards in {shard_dir}\n"
            f"source: {manifest.source['kind']} ({manifest.source['path']}), seed {manifest.seed}, "
            f"{manifest.num_classes} classes, verification: {verified}\n{table}")
