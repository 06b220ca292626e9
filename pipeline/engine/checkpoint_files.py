"""What may be loaded from a checkpoint directory, decided before anything unpickles it.

A checkpoint's `.pt` files are pickles, and unpickling runs whatever a `__reduce__` names. A run
directory can come from anywhere (a shared scratch space, a colleague's copy), so resume and
export never hand a file to DeepSpeed's loader (which unpickles with `weights_only=False`) or to
its `zero_to_fp32` before this module has:

1. matched every file against the sizes and sha256 digests recorded in the checkpoint's
   metadata when it was saved (damage, truncation or replacement is found up front), and
2. parsed every `.pt` file with torch's restricted unpickler (`weights_only=True`, memory
   mapped, so tensor data is not read) allowing only what a genuine DeepSpeed checkpoint holds:
   tensors, containers, and the three DeepSpeed types below.

A damaged checkpoint (`DamagedCheckpoint`) is skipped for an older complete one; a file that
holds anything else is refused outright (`UserError`), since no genuine checkpoint does.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

from robustmim.errors import UserError
from robustmim.fileio import sha256_of_file

METADATA = "robustmim.json"
TAG_PATTERN = re.compile(r"step_\d{8}")
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")


class DamagedCheckpoint(Exception):
    """A checkpoint whose files do not match what was saved (truncated, missing, changed)."""


def _deepspeed_safe_globals() -> list:
    """The only non-torch types DeepSpeed 0.19 pickles into ZeRO 0-3 checkpoints (universal too):
    the loss scaler object, the ZeRO stage enum and the fragment addresses of flattened groups."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: Path, mmap: bool = True):
    """`torch.load` with the restricted unpickler and the DeepSpeed allow-list; UserError naming
    the file and the globals it asked for when it holds anything else."""
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        try:
            wanted = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - only used to word the message
            wanted = []
        raise UserError(f"refusing {path}: it is not a plain checkpoint (it asks to run "
                        f"{', '.join(wanted) or 'code'} when loaded; a crafted or foreign pickle?). "
                        f"Nothing of it was executed") from None


def owned_files(tag_dir: Path, rank: int) -> list[Path]:
    """The files of a saved tag that `rank` wrote: DeepSpeed names per-rank files
    `zero_pp_rank_<r>_...`; rank 0 writes the rest (the module states of ZeRO 0-2)."""
    mine = []
    for path in sorted(tag_dir.iterdir()):
        if not path.is_file() or path.name == METADATA:
            continue
        match = _RANK_FILE.match(path.name)
        if (int(match.group(1)) if match else 0) == rank:
            mine.append(path)
    return mine


def file_records(paths: list[Path]) -> dict[str, dict]:
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_of_file(p)} for p in paths}


def read_metadata(tag_dir: Path) -> dict:
    path = tag_dir / METADATA
    try:
        meta = json.loads(path.read_text())
        _ = meta["step"], meta["samples_seen"], meta["world_size"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DamagedCheckpoint(f"{path} is unreadable: {e}") from None
    return meta


def check_tag(tag_dir: Path, *, verify_hashes: bool = True) -> dict:
    """The tag's metadata after checking its files (see the module docstring). Raises
    DamagedCheckpoint naming the first damaged file, or UserError for an unsafe one."""
    meta = read_metadata(tag_dir)
    for name, record in (meta.get("files") or {}).items():
        path = tag_dir / name
        if not path.is_file():
            raise DamagedCheckpoint(f"{path} is missing")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise DamagedCheckpoint(f"{path} has {size} bytes, {record['bytes']} were saved (truncated?)")
        if verify_hashes and sha256_of_file(path) != record["sha256"]:
            raise DamagedCheckpoint(f"{path} does not match the sha256 recorded when it was saved")
    scan_pickles(tag_dir)
    return meta


def scan_pickles(directory: Path) -> None:
    """Parse every .pt file below `directory` with the restricted unpickler (tensor data stays on disk)."""
    for path in sorted(directory.rglob("*.pt")):
        try:
            safe_torch_load(path)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - zip or pickle errors of a damaged file
            raise DamagedCheckpoint(f"{path} cannot be read: {str(e).splitlines()[0] if str(e) else e!r}") from None


def complete_tags(checkpoints: Path) -> list[str]:
    """Tags whose metadata was written (after every rank's files), newest first."""
    if not checkpoints.is_dir():
        return []
    tags = [p.name for p in checkpoints.iterdir() if TAG_PATTERN.fullmatch(p.name) and (p / METADATA).is_file()]
    return sorted(tags, reverse=True)


def select_checkpoint(checkpoints: Path, latest: str | None, warn) -> tuple[str, dict, list[str]] | None:
    """(tag, metadata, damaged tags) of the checkpoint to load: the one `latest` names or, when
    `latest` is missing, the newest complete one; a damaged one is passed over for the next older
    complete one, with a warning naming the damaged file. None when there is no checkpoint at all;
    UserError when every one is damaged."""
    complete = complete_tags(checkpoints)
    if latest is None and complete:
        warn(f"{checkpoints / 'latest'} is missing; resuming from the newest complete checkpoint, {complete[0]}")
    order = ([latest] if latest else []) + [t for t in complete if t != latest]
    damaged, reasons = [], []
    for tag in order:
        try:
            meta = check_tag(checkpoints / tag)
        except DamagedCheckpoint as e:
            damaged.append(tag)
            reasons.append(str(e))
            warn(f"checkpoint {tag} is damaged: {e}; trying the previous complete checkpoint")
            continue
        return tag, meta, damaged
    if reasons:
        raise UserError(f"every checkpoint in {checkpoints} is damaged: {'; '.join(reasons)}. "
                        f"Move {checkpoints} aside to start over")
    return None
