"""Export of a tokenizer run: the VQGAN's safetensors in taming-transformers' key layout (no
discriminator) and a JSON with its architecture, which DAT fine-tuning reads to rebuild it."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from robustmim.config import config_from_dict, load_config
from robustmim.errors import UserError
from robustmim.fileio import atomic_write_json, sha256_of_file
from robustmim.pipeline.engine.export import consolidated_state_dict, save_safetensors
from robustmim.pipeline.models.config import PRESETS, VQGANConfig
from robustmim.pipeline.models.vqgan import VQGAN, load_taming_checkpoint
from robustmim.pipeline.tokenizer.config import TokenizerConfig

EXPORT_FORMAT = "robustmim-vqgan/1"


def export_tokenizer(checkpoints: Path, tag: str, meta: dict, out: Path) -> dict:
    run_config = checkpoints.parent / "config.yaml"
    if not run_config.is_file():
        raise UserError(f"{run_config}: missing; a tokenizer export needs the run's resolved config")
    cfg = load_config(TokenizerConfig, run_config)
    state = consolidated_state_dict(checkpoints, tag)  # `model.*` only: the discriminator stays behind
    source = str(checkpoints / tag)
    save_safetensors(state, out, {"format": EXPORT_FORMAT, "source": source})
    info = {"format": EXPORT_FORMAT, "weights": out.name, "source": source, "step": meta["step"],
            "samples_seen": meta["samples_seen"], "model": OmegaConf.to_container(OmegaConf.structured(cfg.model)),
            "weights_sha256": sha256_of_file(out), "tensors": len(state)}
    atomic_write_json(out.with_suffix(".json"), info)
    return info


def load_tokenizer(path: str | Path, preset: str = "") -> VQGAN:
    """A frozen VQGAN from our export (architecture from the JSON beside it) or a taming-transformers
    checkpoint with a named published architecture (`preset`, e.g. f8_16384)."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if preset:
        if preset not in PRESETS:
            raise UserError(f"tokenizer preset '{preset}' unknown; known: {sorted(PRESETS)}")
        cfg = PRESETS[preset]
    elif meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta.get("model"), dict):
            raise UserError(f"{meta_path}: no 'model' section")
        cfg = config_from_dict(VQGANConfig, meta["model"], f"{meta_path}: model")
    else:
        raise UserError(f"{meta_path}: missing; give a `robustmim export` of a tokenizer run, or name the "
                        f"architecture of a taming checkpoint with a preset ({', '.join(sorted(PRESETS))})")
    model = VQGAN(cfg)
    load_taming_checkpoint(model, path)
    model.eval().requires_grad_(False)
    return model
