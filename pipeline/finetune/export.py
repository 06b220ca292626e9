"""Export of a fine-tuning run: the classifier's safetensors plus the deployment JSON the eval
stage loads (`robustmim.pipeline.models.deployed.load_deployed`); De³ exports also carry the denoiser."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from robustmim.config import load_config
from robustmim.errors import UserError
from robustmim.fileio import atomic_write_json, sha256_of_file
from robustmim.pipeline.engine.export import consolidated_state_dict, save_safetensors
from robustmim.pipeline.finetune.config import FinetuneConfig, RecipeName
from robustmim.pipeline.finetune.recipes import deployment_of
from robustmim.pipeline.models.deployed import DefenseKind, DenoiserSpec, DeploymentSpec
from robustmim.pipeline.models.weights import read_state_dict
from robustmim.pipeline.pretrain.export import read_autoencoder_export


def deployment_spec(cfg: FinetuneConfig, weights: str, denoiser_weights: str, trained: dict) -> DeploymentSpec:
    recipe = cfg.recipe
    defense, sigma = deployment_of(recipe)
    spec = DeploymentSpec(method=recipe.name.value, weights=weights, classifier=cfg.model, defense=defense,
                          sigma=sigma, trained=trained)
    if defense is DefenseKind.denoise:
        model, norm_pix = read_autoencoder_export(recipe.de3.denoiser)
        spec.denoiser = DenoiserSpec(weights=denoiser_weights, model=model, norm_pix=norm_pix)
    return spec


def export_classifier(checkpoints: Path, tag: str, meta: dict, out: Path) -> dict:
    run_config = checkpoints.parent / "config.yaml"
    if not run_config.is_file():
        raise UserError(f"{run_config}: missing; a classifier export needs the run's resolved config")
    cfg = load_config(FinetuneConfig, run_config)
    state = consolidated_state_dict(checkpoints, tag)
    source = str(checkpoints / tag)
    save_safetensors(state, out, {"format": "robustmim-classifier/1", "source": source})
    denoiser_name = f"{out.stem}.denoiser.safetensors"
    if cfg.recipe.name is RecipeName.de3:
        denoiser_path = Path(cfg.recipe.de3.denoiser)
        save_safetensors(read_state_dict(denoiser_path), out.with_name(denoiser_name),
                         {"format": "robustmim-mae/1", "source": str(denoiser_path)})
    trained = {"run": str(checkpoints.parent), "source": source, "step": meta["step"],
               "samples_seen": meta["samples_seen"], "init": cfg.init,
               "weights_sha256": sha256_of_file(out)}
    spec = deployment_spec(cfg, out.name, denoiser_name, trained)
    info = OmegaConf.to_container(OmegaConf.structured(spec), enum_to_str=True)
    atomic_write_json(out.with_suffix(".json"), info)
    return {**info, "tensors": len(state), "step": meta["step"], "source": source}
