"""Shared fixtures: real shard builds at toy scale (Fashion-MNIST and synthetic JPEG trees)."""

from __future__ import annotations

from pathlib import Path

import pytest

from robustmim.config import load_config
from robustmim.shards.build import build_shards
from robustmim.shards.config import FASHION_MNIST_DIR, ShardsConfig
from robustmim.shards.synthetic import make_image_tree

from helpers import REPO_ROOT  # noqa: F401 (tests import it from here)


def shards_config(**values) -> ShardsConfig:
    """A ShardsConfig from keyword overrides, through the same path as the CLI."""
    overrides = [f"{k}={v}" for k, v in values.items()]
    return load_config(ShardsConfig, None, overrides)


def build(**values):
    cfg = shards_config(**values)
    return cfg, build_shards(cfg)


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    path = Path(FASHION_MNIST_DIR)
    assert (path / "train-images-idx3-ubyte.gz").is_file(), \
        "Fashion-MNIST missing: `make test` installs Debian's dataset-fashion-mnist"
    return path


@pytest.fixture(scope="session")
def fashion_shards(tmp_path_factory, fashion_dir) -> Path:
    """The whole Fashion-MNIST set (60k + 10k) in shards of 5,000, built once per session."""
    out = tmp_path_factory.mktemp("fashion_shards")
    build(source="fashion_mnist", input=fashion_dir, out_dir=out, shard_max_samples=5000, workers=2)
    return out


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory):
    """3 classes x 8 train JPEGs and 4 val JPEGs each, in class folders; small images for speed."""
    return make_image_tree(tmp_path_factory.mktemp("tree"), classes=3, train_per_class=8, val_per_class=4,
                           min_size=40, max_size=96, seed=1)


@pytest.fixture(scope="session")
def tree_shards(tmp_path_factory, image_tree) -> Path:
    out = tmp_path_factory.mktemp("tree_shards")
    build(source="imagenet", input=image_tree.root, out_dir=out, shard_max_samples=5, workers=2)
    return out


def read_skipped(shard_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (shard_dir / "skipped.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def fashion_val_shards(tmp_path_factory, fashion_dir) -> Path:
    """Fashion-MNIST's 10,000 val images in 20 shards of 500: small, but many shards to shuffle."""
    out = tmp_path_factory.mktemp("fashion_val")
    build(source="fashion_mnist", input=fashion_dir, out_dir=out, splits="[val]", shard_max_samples=500, workers=2)
    return out


@pytest.fixture(scope="session")
def jpeg_shards(tmp_path_factory) -> Path:
    """Real JPEGs of one size (48x48), 4 classes x 20, in shards of 16."""
    root = tmp_path_factory.mktemp("jpeg_tree")
    make_image_tree(root / "in", classes=4, train_per_class=20, val_per_class=0, min_size=48, max_size=48, seed=7)
    out = root / "shards"
    build(source="imagenet", input=root / "in", out_dir=out, splits="[train]", shard_max_samples=16, workers=2)
    return out


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real Slurm (slurmctld + slurmd + munged) on loopback for the whole session."""
    import os

    from robustmim.slurm.local_cluster import LocalCluster

    cluster = LocalCluster(tmp_path_factory.mktemp("slurm"))
    seconds = cluster.start()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)  # sbatch, squeue and submitit find it through this
    print(f"\nlocal Slurm cluster up in {seconds:.1f} s")
    yield cluster
    cluster.stop()
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous


TOKENIZER_STEPS = 100


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, fashion_shards) -> Path:
    """configs/tokenizer/tiny_fmnist.yaml trained for 100 steps of 32 on one rank, validated at the
    end on every 10th test image, and exported (DAT's VQGAN in the tests)."""
    import subprocess
    import sys

    from robustmim.pipeline.engine.export import export_checkpoint

    root = tmp_path_factory.mktemp("tokenizer")
    robustmim = str(Path(sys.executable).parent / "robustmim")
    overrides = [f"out_dir={root / 'run'}", f"data.shards={fashion_shards}",
                 f"length.samples={32 * TOKENIZER_STEPS}", "global_batch=32", "micro_batch=32",
                 "data.shuffle_buffer=512", f"validation.every_steps={TOKENIZER_STEPS}", "checkpoint.every_steps=1000"]
    done = subprocess.run([robustmim, "tokenizer", "--config", "configs/tokenizer/tiny_fmnist.yaml", *overrides],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    export_checkpoint(root / "run", root / "tokenizer.safetensors")
    return root / "tokenizer.safetensors"


@pytest.fixture(scope="session")
def lpips_weights(tmp_path_factory) -> list[Path]:
    """What a user brings for the tokenizer's perceptual term, nothing downloaded: a VGG16 state
    dict in torchvision's layout (built by torchvision itself, seeded random weights: ImageNet's
    are not on this machine), and LPIPS' published linear heads (v0.1 vgg.pth, shipped inside
    the `lpips` package)."""
    import lpips
    import torch
    from safetensors.torch import save_file

    from robustmim.pipeline.timm_import import timm  # noqa: F401  (makes torchvision importable with the CPU torch)
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    vgg = {f"features.{key}": value for key, value in make_layers(cfgs["D"]).state_dict().items()}
    vgg["classifier.6.bias"] = torch.zeros(1000)  # torchvision's head, which LPIPS leaves out
    root = tmp_path_factory.mktemp("lpips")
    save_file(vgg, str(root / "vgg16.safetensors"))
    return [root / "vgg16.safetensors", Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"]


@pytest.fixture(scope="session")
def references(tmp_path_factory, fashion_val_shards):
    """Uninterrupted 12-step pretraining runs, one per ZeRO stage: the curves resumed runs must equal."""
    from helpers import finish, launch

    root = tmp_path_factory.mktemp("reference")
    runs = {stage: root / f"zero{stage}" for stage in (1, 2, 3)}
    for stage, out_dir in runs.items():
        finish(launch(fashion_val_shards, out_dir, zero_stage=stage))
    return runs
