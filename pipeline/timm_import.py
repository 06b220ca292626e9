"""Import timm on a machine whose torchvision cannot load its native library.

timm imports torchvision unconditionally, and every Linux torchvision wheel on the package
index links CUDA torch libraries: with the CPU torch its native library fails to load, and
`import torchvision` then dies registering fake kernels for operators that were never defined
("operator torchvision::nms does not exist"). robustmim uses none of torchvision (images are
decoded by PIL and DALI), so when, and only when, the native library cannot load, we define the
two operator schemas torchvision registers fake kernels for, and nothing else. With a CUDA
torch and a matching torchvision the library loads and this module changes nothing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

_KEEP_ALIVE: list[torch.library.Library] = []  # a Library's definitions live as long as it does


def _define_missing_torchvision_schemas() -> bool:
    """True if the schemas had to be defined (native torchvision library unusable)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.submodule_search_locations is None or "torchvision" in sys.modules:
        return False
    libraries = list(Path(spec.submodule_search_locations[0]).glob("_C*.so"))
    try:
        for library in libraries:
            torch.ops.load_library(str(library))
        return False
    except OSError:
        pass
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP_ALIVE.append(lib)
    return True


_define_missing_torchvision_schemas()

import timm  # noqa: E402  (after the schemas exist)

__all__ = ["timm"]
