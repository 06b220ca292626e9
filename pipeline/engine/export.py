"""`robustmim export`: consolidate a ZeRO checkpoint into one fp32 state dict and hand it to the
export of the stage that saved it (the stage is read from the checkpoint's own metadata):
pipeline/pretrain/export.py (an autoencoder), pipeline/finetune/export.py (a classifier),
pipeline/tokenizer/export.py (a VQGAN).

DeepSpeed's zero_to_fp32 reads the shards of any ZeRO stage without the training world size
(or a GPU); stage 0 checkpoints hold the whole module already. The `model.` prefix of the
training wrapper is removed, so the keys are the module's own (for an autoencoder, the official
MAE ones).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch

from robustmim.errors import UserError
from robustmim.log import get_logger
from robustmim.pipeline.engine.checkpoint import CHECKPOINTS_DIR, LATEST, warn
from robustmim.pipeline.engine.checkpoint_files import METADATA, check_tag, safe_torch_load, select_checkpoint

log = get_logger(__name__)

WRAPPER_PREFIX = "model."


def resolve_checkpoint(path: str | Path) -> tuple[Path, str, dict]:
    """(checkpoints dir, tag, its metadata) from a run dir, a checkpoints dir or a tag dir, after
    checking the tag's files (pipeline/engine/checkpoint_files.py). A run or checkpoints dir gives
    the tag `latest` names, or the newest complete one when `latest` is missing or damaged."""
    path = Path(path)
    for candidate in (path / CHECKPOINTS_DIR, path):
        latest = candidate / LATEST
        chosen = select_checkpoint(candidate, latest.read_text().strip() if latest.is_file() else None, warn)
        if chosen is not None:
            return candidate, chosen[0], chosen[1]
    if (path / METADATA).is_file():
        return path.parent, path.name, check_tag(path)
    raise UserError(f"no checkpoint at {path}: expected a run directory, its {CHECKPOINTS_DIR}/ "
                    f"or one checkpoint's step_* directory")


def consolidated_state_dict(checkpoints: Path, tag: str) -> dict[str, torch.Tensor]:
    """The module's fp32 weights; only for a tag `resolve_checkpoint` checked (DeepSpeed's
    zero_to_fp32 unpickles without restrictions)."""
    tag_dir = checkpoints / tag
    if any(tag_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # zero_to_fp32 narrates its work (prints and a progress bar): debug level, not the console
        with contextlib.redirect_stdout(io.StringIO()) as printed, contextlib.redirect_stderr(printed):
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)
        for line in printed.getvalue().splitlines():
            log.debug(f"deepspeed: {line}")
    else:  # ZeRO stage 0: the model states file holds the whole module
        state = safe_torch_load(tag_dir / "mp_rank_00_model_states.pt", mmap=False)["module"]
    return {k[len(WRAPPER_PREFIX):]: v.float().contiguous() for k, v in state.items() if k.startswith(WRAPPER_PREFIX)}


def holds_the_same(out: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    """Whether `out` already holds exactly these tensors and metadata."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(out), "pt") as existing:
            return (existing.metadata() == metadata and set(existing.keys()) == set(state)
                    and all(torch.equal(existing.get_tensor(k), v.detach().cpu()) for k, v in state.items()))
    except (OSError, SafetensorError):
        return False


def save_safetensors(state: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> None:
    """Write under a temporary name, then rename: a reader never sees half a file.

    An export already holding the same tensors and metadata is left untouched: safetensors
    writes its metadata in an order that changes from process to process, so a rewrite would
    change the file's bytes (and sha256) without changing the model, and evaluations recorded
    against that sha256 (a re-run `make demo` re-exports every stage) could no longer resume."""
    from safetensors.torch import save_file

    if out.is_file() and holds_the_same(out, state, metadata):
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(out)


def checkpoint_stage(checkpoints: Path, meta: dict) -> str:
    """The stage that wrote a checkpoint: its own metadata says so. Checkpoints written before the
    metadata held it (2026-11-30) are named by the run's provenance.json, recorded at its start."""
    if "stage" in meta:
        return meta["stage"]
    provenance = checkpoints.parent / "provenance.json"
    stage = json.loads(provenance.read_text()).get("stage") if provenance.is_file() else None
    if stage is None:
        raise UserError(f"{checkpoints}: neither the checkpoint's {METADATA} nor the run's provenance.json says "
                        f"which stage wrote it")
    return stage


def export_checkpoint(path: str | Path, out: str | Path) -> dict:
    """Consolidate a checkpoint (a run directory, its checkpoints/ or a step_* directory) into
    `out` with the export of the stage that wrote it (robustmim/stages.py)."""
    from robustmim.stages import resolve, stage_named

    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: expected a .safetensors file name")
    checkpoints, tag, meta = resolve_checkpoint(path)
    stage = stage_named(checkpoint_stage(checkpoints, meta))
    if stage.export is None:
        raise UserError(f"{checkpoints / tag}: the {stage.name} stage has no export")
    return resolve(stage.export)(checkpoints, tag, meta, out)
