"""`robustmim export`: consolidate a ZeRO checkpoint into one fp32 state dict in MAE's layout.

DeepSpeed's zero_to_fp32 reads the shards of any ZeRO stage without the training world size
(or a GPU); stage 0 checkpoints hold the whole module already. The `model.` prefix of the
training wrapper is removed, so the keys are the official MAE ones, loadable by
`pipeline.models.weights.load_weights`, timm or the MAE code. A JSON beside the file records
the model config needed to rebuild the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from robustmim.errors import UserError
from robustmim.fileio import atomic_write_json
from pipeline.engine.checkpoint import CHECKPOINTS_DIR, LATEST, METADATA

WRAPPER_PREFIX = "model."
EXPORT_FORMAT = "robustmim-mae/1"


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoints dir, tag) from a run dir, a checkpoints dir or a tag dir."""
    path = Path(path)
    for candidate in (path / CHECKPOINTS_DIR, path):
        if (candidate / LATEST).is_file():
            return candidate, (candidate / LATEST).read_text().strip()
    if (path / METADATA).is_file():
        return path.parent, path.name
    raise UserError(f"no checkpoint at {path}: expected a run directory, its {CHECKPOINTS_DIR}/ "
                    f"(with a '{LATEST}' file) or one checkpoint's step_* directory")


def consolidated_state_dict(checkpoints: Path, tag: str) -> dict[str, torch.Tensor]:
    tag_dir = checkpoints / tag
    if any(tag_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)
    else:  # ZeRO stage 0: the model states file holds the whole module
        state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
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


def export_checkpoint(path: str | Path, out: str | Path) -> dict:
    from safetensors.torch import save_file

    checkpoints, tag = resolve_checkpoint(path)
    if not (checkpoints / tag).is_dir():
        raise UserError(f"{checkpoints / LATEST} names {tag}, which is missing")
    state = consolidated_state_dict(checkpoints, tag)
    run_config = checkpoints.parent / "config.yaml"
    model_config = yaml.safe_load(run_config.read_text())["model"] if run_config.is_file() else None
    recomputed = fill_fixed_embeddings(state, model_config)
    meta = json.loads((checkpoints / tag / METADATA).read_text())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(state, str(tmp), metadata={"format": EXPORT_FORMAT, "source": str(checkpoints / tag)})
    tmp.replace(out)
    info = {"format": EXPORT_FORMAT, "weights": out.name, "source": str(checkpoints / tag), "step": meta["step"],
            "samples_seen": meta["samples_seen"], "model": model_config, "tensors": len(state),
            "recomputed_fixed_embeddings": recomputed}
    atomic_write_json(out.with_suffix(".json"), info)
    return info
