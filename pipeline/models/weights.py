"""Loading weights safely: safetensors, or torch.load(weights_only=True); never arbitrary pickle.

Accepts our exports and the official releases (MAE's `mae_pretrain_vit_large.pth` and
DMAE/MIMIR checkpoints keep the state dict under "model"), and reports missing and unexpected
keys by name instead of failing on the first.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from robustmim.errors import UserError

_NESTED_KEYS = ("model", "state_dict", "module")


@dataclass
class LoadReport:
    path: str
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mismatched: list[str] = field(default_factory=list)  # "key: file shape vs model shape"

    def __str__(self) -> str:
        parts = [f"{len(v)} {k}: {', '.join(v[:8])}{' ...' if len(v) > 8 else ''}"
                 for k, v in (("missing", self.missing), ("unexpected", self.unexpected),
                              ("mismatched", self.mismatched)) if v]
        return f"{self.path}: " + ("; ".join(parts) if parts else "all keys matched")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:  # truncated or not a safetensors file at all
            raise UserError(f"{path}: not a readable safetensors file (truncated or damaged?): {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise UserError(f"{path}: not loadable as plain weights (weights_only=True refuses arbitrary "
                        f"pickled objects): {str(e).splitlines()[0]}") from None
    for key in _NESTED_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: no state dict of tensors found (looked at the top level and {_NESTED_KEYS})")
    return obj


def match_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path
                ) -> tuple[LoadReport, dict[str, torch.Tensor]]:
    """The report of how `state` fits `model`, and the tensors whose names and shapes match."""
    own = model.state_dict()
    report = LoadReport(str(path), missing=sorted(set(own) - set(state)), unexpected=sorted(set(state) - set(own)))
    usable = {}
    for key in sorted(set(own) & set(state)):
        if own[key].shape != state[key].shape:
            report.mismatched.append(f"{key}: {tuple(state[key].shape)} vs {tuple(own[key].shape)}")
        else:
            usable[key] = state[key]
    return report, usable


def load_weights(model: nn.Module, path: str | Path, strict: bool = False) -> LoadReport:
    """Copy matching tensors into `model`; with strict, any difference is an error naming the keys."""
    report, usable = match_state(model, read_state_dict(path), path)
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise UserError(str(report))
    model.load_state_dict(usable, strict=False)
    return report
