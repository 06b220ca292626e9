"""Building shards from Fashion-MNIST and ImageNet-style trees, read back with webdataset."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import webdataset as wds
from PIL import Image

from robustmim.fileio import sha256_of_file
from robustmim.shards.manifest import load_manifest
from robustmim.shards.sources import FASHION_MNIST_CLASSES, read_idx_gz
from robustmim.shards.synthetic import make_image_tree

from conftest import build


def read_split(shard_dir: Path, split: str) -> dict[str, dict]:
    """Every sample of a split, raw bytes per member, read with webdataset."""
    manifest = load_manifest(shard_dir)
    urls = [str(shard_dir / e.name) for e in manifest.splits[split].shards]
    samples = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert sample["__key__"] not in samples, f"duplicate key {sample['__key__']}"
        samples[sample["__key__"]] = sample
    return samples


@pytest.mark.parametrize("split, prefix", [("train", "train"), ("val", "t10k")])
def test_fashion_mnist_every_key_label_and_pixel(fashion_shards, fashion_dir, split, prefix):
    images = read_idx_gz(fashion_dir / f"{prefix}-images-idx3-ubyte.gz", 2051)
    labels = read_idx_gz(fashion_dir / f"{prefix}-labels-idx1-ubyte.gz", 2049)
    samples = read_split(fashion_shards, split)
    assert sorted(samples) == [f"{prefix}_{i:05d}" for i in range(len(labels))]
    for key, sample in samples.items():
        i = int(key.split("_")[1])
        assert int(sample["cls"]) == labels[i]
        assert np.frombuffer(sample["cls.i32"], "<i4")[0] == labels[i]
        pixels = np.asarray(Image.open(io.BytesIO(sample["png"])))
        np.testing.assert_array_equal(pixels, images[i])  # lossless


def test_fashion_mnist_manifest(fashion_shards):
    m = load_manifest(fashion_shards)
    assert [c["name"] for c in m.classes] == list(FASHION_MNIST_CLASSES)
    assert (m.splits["train"].total, m.splits["val"].total) == (60000, 10000)
    assert [len(m.splits[s].shards) for s in ("train", "val")] == [12, 2]
    assert all(e.samples == 5000 for s in m.splits.values() for e in s.shards)
    assert m.skipped_total == 0 and m.image == {"mode": "L", "width": 28, "height": 28}
    for s in m.splits.values():
        for e in s.shards:
            assert sha256_of_file(fashion_shards / e.name) == e.sha256
            assert (fashion_shards / e.index).is_file()
    on_disk = json.loads((fashion_shards / "manifest.json").read_text())
    assert on_disk["num_classes"] == 10 and on_disk["skipped_total"] == 0


def test_shuffle_mixes_classes_across_shards(fashion_shards):
    m = load_manifest(fashion_shards)
    with tarfile.open(fashion_shards / m.splits["train"].shards[0].name) as tar:
        labels = [int(tar.extractfile(t).read()) for t in tar if t.name.endswith(".cls")]
        keys = [t.name.split(".")[0] for t in tar if t.name.endswith(".cls")]
    assert len(set(labels)) == 10  # a global shuffle, not one class per shard
    assert keys != sorted(keys)


def test_image_tree_bytes_labels_and_metadata(tree_shards, image_tree):
    m = load_manifest(tree_shards)
    assert [c["id"] for c in m.classes] == image_tree.wnids
    for split, expected in (("train", image_tree.train), ("val", image_tree.val)):
        samples = read_split(tree_shards, split)
        assert m.splits[split].total == len(samples) == len(expected)
        by_source = {json.loads(s["json"])["source"]: s for s in samples.values()}
        assert set(by_source) == set(expected)
        for rel, wnid in expected.items():
            sample = by_source[rel]
            source_bytes = (image_tree.root / rel).read_bytes()
            assert sample["jpg"] == source_bytes  # JPEGs are stored as they are, never re-encoded
            assert int(sample["cls"]) == image_tree.wnids.index(wnid)
            meta = json.loads(sample["json"])
            assert meta["class"] == wnid
            assert (meta["width"], meta["height"]) == Image.open(io.BytesIO(source_bytes)).size
            assert sample["__key__"] == f"{wnid}_{Path(rel).stem}"


def _labels_by_source(shard_dir: Path) -> dict[str, int]:
    return {json.loads(s["json"])["source"]: int(s["cls"]) for s in read_split(shard_dir, "val").values()}


def test_flat_val_with_loc_solution_csv(tmp_path):
    tree = make_image_tree(tmp_path / "in", classes=3, train_per_class=2, val_per_class=3,
                           min_size=32, max_size=48, flat_val=True, seed=2)
    build(source="imagenet", input=tree.root, out_dir=tmp_path / "out", workers=1)
    assert _labels_by_source(tmp_path / "out") == {rel: tree.wnids.index(w) for rel, w in tree.val.items()}


def _devkit_ground_truth(tree, tmp_path, synset_order: list[str]) -> Path:
    """The devkit's form: ground truth as ILSVRC2012_IDs (1-based, in `synset_order`)."""
    (tree.root / "LOC_val_solution.csv").unlink()
    ids = {Path(rel).stem: synset_order.index(w) + 1 for rel, w in tree.val.items()}
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("".join(f"{ids[f'ILSVRC2012_val_{n:08d}']}\n" for n in range(1, len(ids) + 1)))
    return gt


def test_flat_val_with_devkit_ground_truth_and_meta_mat(tmp_path):
    tree = make_image_tree(tmp_path / "in", classes=3, train_per_class=2, val_per_class=3,
                           min_size=32, max_size=48, flat_val=True, seed=3)
    devkit_order = list(reversed(tree.wnids))  # the devkit's ID order is not the sorted wnid order
    gt = _devkit_ground_truth(tree, tmp_path, devkit_order)
    synsets = np.array([(i + 1, w, "words", 0) for i, w in enumerate(devkit_order)] + [(4, "n99999999", "parent", 3)],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    scipy.io.savemat(tmp_path / "meta.mat", {"synsets": synsets.reshape(-1, 1)})
    build(source="imagenet", input=tree.root, out_dir=tmp_path / "out", workers=1,
          val_labels=gt, val_synsets=tmp_path / "meta.mat")
    assert _labels_by_source(tmp_path / "out") == {rel: tree.wnids.index(w) for rel, w in tree.val.items()}


def test_flat_val_with_ground_truth_and_synset_text_file(tmp_path):
    tree = make_image_tree(tmp_path / "in", classes=3, train_per_class=2, val_per_class=2,
                           min_size=32, max_size=48, flat_val=True, seed=4)
    devkit_order = [tree.wnids[1], tree.wnids[2], tree.wnids[0]]
    gt = _devkit_ground_truth(tree, tmp_path, devkit_order)
    (tmp_path / "synsets.txt").write_text("\n".join(devkit_order) + "\n")
    build(source="imagenet", input=tree.root, out_dir=tmp_path / "out", workers=1,
          val_labels=gt, val_synsets=tmp_path / "synsets.txt")
    assert _labels_by_source(tmp_path / "out") == {rel: tree.wnids.index(w) for rel, w in tree.val.items()}


def _shard_hashes(shard_dir: Path) -> dict[str, str]:
    return {p.name: sha256_of_file(p) for p in sorted(shard_dir.glob("*-*.*")) if p.suffix in (".tar", ".idx")}


def test_same_input_and_seed_give_identical_shards(tmp_path, image_tree, tree_shards):
    build(source="imagenet", input=image_tree.root, out_dir=tmp_path / "again", shard_max_samples=5, workers=1)
    assert _shard_hashes(tmp_path / "again") == _shard_hashes(tree_shards)
    assert (tmp_path / "again" / "skipped.jsonl").read_bytes() == (tree_shards / "skipped.jsonl").read_bytes()
    build(source="imagenet", input=image_tree.root, out_dir=tmp_path / "seed1", shard_max_samples=5, workers=1, seed=1)
    assert _shard_hashes(tmp_path / "seed1") != _shard_hashes(tree_shards)


def test_shard_size_limits(tmp_path, image_tree):
    _, m = build(source="imagenet", input=image_tree.root, out_dir=tmp_path / "bytes", splits="[train]",
                 shard_max_bytes=40_000, workers=2)
    shards = m.splits["train"].shards
    assert len(shards) > 2 and sum(e.samples for e in shards) == 24
    tar_record = 10240  # tarfile pads a closed archive to whole 10 KiB records
    assert all(e.bytes <= 40_000 + tar_record for e in shards if e.samples > 1)
    _, m = build(source="imagenet", input=image_tree.root, out_dir=tmp_path / "count", splits="[train]",
                 shard_max_samples=7, workers=2)
    assert [e.samples for e in m.splits["train"].shards] == [7, 7, 7, 3]


def test_index_matches_dalis_own_tool(tree_shards, tmp_path):
    """Our index files are byte for byte what NVIDIA's wds2idx writes for the same tar."""
    wds2idx = Path(sys.executable).parent / "wds2idx"  # installed with the DALI wheel
    for e in load_manifest(tree_shards).splits["train"].shards:
        subprocess.run([str(wds2idx), str(tree_shards / e.name), str(tmp_path / e.index)],
                       check=True, capture_output=True)
        assert (tmp_path / e.index).read_bytes() == (tree_shards / e.index).read_bytes()


def test_dali_reads_the_shards_with_their_index(fashion_shards):
    """DALI's webdataset reader (CPU) reads every sample and its int32 label through our index."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    entry = load_manifest(fashion_shards).splits["val"].shards[1]
    with tarfile.open(fashion_shards / entry.name) as tar:
        expected = [int(tar.extractfile(t).read()) for t in tar if t.name.endswith(".cls")]

    @pipeline_def(batch_size=1000, num_threads=2, device_id=None)
    def pipe():
        image, label = fn.readers.webdataset(
            paths=[str(fashion_shards / entry.name)], index_paths=[str(fashion_shards / entry.index)],
            ext=["jpg;png", "cls.i32"], dtypes=[types.UINT8, types.INT32], random_shuffle=False)
        return fn.decoders.image(image, device="cpu", output_type=types.GRAY), label

    p = pipe()
    p.build()
    got = []
    for _ in range(entry.samples // 1000):
        images, labels = p.run()
        assert images.as_array().shape == (1000, 28, 28, 1)
        got += [int(x) for x in labels.as_array().ravel()]
    assert got == expected
