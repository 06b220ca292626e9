"""A pretraining run's export: the autoencoder's fp32 weights in the official MAE layout, loadable
by `robustmim.pipeline.models.weights.load_weights`, timm or the MAE code, and a JSON beside them with the
model config that rebuilds the network (and the objective's norm_pix_loss, which De³ needs)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from robustmim.config import config_from_dict
from robustmim.errors import UserError
from robustmim.fileio import atomic_write_json
from robustmim.pipeline.engine.export import consolidated_state_dict, save_safetensors
from robustmim.pipeline.models.config import ModelConfig
from robustmim.pipeline.models.mae import MaskedAutoencoder
from robustmim.pipeline.models.weights import load_weights

EXPORT_FORMAT = "robustmim-mae/1"


def fill_fixed_embeddings(state: dict[str, torch.Tensor], model_config: dict | None) -> list[str]:
    """ZeRO-3's consolidation leaves out frozen parameters; ours are the fixed sin-cos position
    embeddings, a function of the model config alone, so they are recomputed as at init."""
    missing = [k for k in ("pos_embed", "decoder_pos_embed") if k not in state]
    if not missing:
        return []
    if model_config is None:
        raise UserError(f"the checkpoint lacks {missing} and no run config.yaml says how to rebuild them")
    from robustmim.config import load_config
    from robustmim.pipeline.models.config import ModelConfig
    from robustmim.pipeline.models.pos_embed import sincos_2d

    cfg = load_config(ModelConfig, None, [f"{k}={v}" for k, v in model_config.items()])
    grid = cfg.img_size // cfg.patch_size
    widths = {"pos_embed": cfg.embed_dim, "decoder_pos_embed": cfg.decoder_dims[0]}
    for key in missing:
        state[key] = sincos_2d(widths[key], grid).unsqueeze(0)
    return missing


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


def read_autoencoder_export(path: str | Path) -> tuple[ModelConfig, bool]:
    """(model config, norm_pix) from the JSON beside a pretraining export."""
    meta_path = Path(path).with_suffix(".json")
    if not meta_path.is_file():
        raise UserError(f"{meta_path}: missing; the denoiser must be a `robustmim export` of a NIM run "
                        f"(its JSON says how to rebuild the autoencoder)")
    meta = json.loads(meta_path.read_text())
    if not isinstance(meta.get("model"), dict):
        raise UserError(f"{meta_path}: no 'model' section")
    return config_from_dict(ModelConfig, meta["model"], f"{meta_path}: model"), bool(meta.get("norm_pix_loss", True))


def load_denoiser(path: str | Path) -> tuple[MaskedAutoencoder, bool]:
    """(frozen autoencoder in eval mode, norm_pix) from a pretraining export: De³'s denoiser."""
    model_cfg, norm_pix = read_autoencoder_export(path)
    denoiser = MaskedAutoencoder(model_cfg)
    load_weights(denoiser, path, strict=True)
    return denoiser.eval().requires_grad_(False), norm_pix
