"""`robustmim export`: consolidate a ZeRO checkpoint into one fp32 state dict in MAE's layout
(pretraining runs; fine-tuning runs export a classifier, see pipeline/finetune/export.py, and
tokenizer runs a VQGAN, see pipeline/tokenizer/export.py).

DeepSpeed's zero_to_fp32 reads the shards of any ZeRO stage without the training world size
(or a GPU); stage 0 checkpoints hold the whole module already. The `model.` prefix of the
training wrapper is removed, so the keys are the official MAE ones, loadable by
`pipeline.models.weights.load_weights`, timm or the MAE code. A JSON beside the file records
the model config needed to rebuild the network.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch
import yaml

from robustmim.errors import UserError
from robustmim.fileio import atomic_write_json
from robustmim.log import get_logger
from pipeline.engine.checkpoint import CHECKPOINTS_DIR, LATEST, warn
from pipeline.engine.checkpoint_files import METADATA, check_tag, safe_torch_load, select_checkpoint

log = get_logger(__name__)

WRAPPER_PREFIX = "model."
EXPORT_FORMAT = "robustmim-mae/1"


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


def fill_fixed_embeddings(state: dict[str, torch.Tensor], model_config: dict | None) -> list[str]:
    """ZeRO-3's consolidation leaves out frozen parameters; ours are the fixed sin-cos position
    embeddings, a function of the model config alone, so they are recomputed as at init."""
    missing = [k for k in ("pos_embed", "decoder_pos_embed") if k not in state]
    if not missing:
        return []
    if model_config is None:
        raise UserError(f"the checkpoint lacks {missing} and no run config.yaml says how to rebuild them")
    from robustmim.config import load_config
    from pipeline.models.config import ModelConfig
    from pipeline.models.pos_embed import sincos_2d

    cfg = load_config(ModelConfig, None, [f"{k}={v}" for k, v in model_config.items()])
    grid = cfg.img_size // cfg.patch_size
    widths = {"pos_embed": cfg.embed_dim, "decoder_pos_embed": cfg.decoder_dims[0]}
    for key in missing:
        state[key] = sincos_2d(widths[key], grid).unsqueeze(0)
    return missing


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


def export_autoencoder(checkpoints: Path, tag: str, meta: dict, out: Path) -> dict:
    """A pretrained autoencoder: fp32 weights, and a .json with its model config beside them."""
    state = consolidated_state_dict(checkpoints, tag)
    run_config_path = checkpoints.parent / "config.yaml"
    run_config = yaml.safe_load(run_config_path.read_text()) if run_config_path.is_file() else {}
    model_config = run_config.get("model")
    recomputed = fill_fixed_embeddings(state, model_config)
    save_safetensors(state, out, {"format": EXPORT_FORMAT, "source": str(checkpoints / tag)})
    info = {"format": EXPORT_FORMAT, "weights": out.name, "source": str(checkpoints / tag), "step": meta["step"],
            "samples_seen": meta["samples_seen"], "model": model_config,
            "norm_pix_loss": run_config.get("objective", {}).get("norm_pix_loss", True), "tensors": len(state),
            "recomputed_fixed_embeddings": recomputed}
    atomic_write_json(out.with_suffix(".json"), info)
    return info
