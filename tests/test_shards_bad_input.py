"""Bad input: undecodable files are skipped and listed; structural problems are errors naming the path."""

import gzip
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from robustmim.errors import UserError
from robustmim.shards.synthetic import make_image_tree

from conftest import build, read_skipped


@pytest.fixture
def tree(tmp_path):
    return make_image_tree(tmp_path / "in", classes=2, train_per_class=3, val_per_class=2,
                           min_size=32, max_size=48, seed=5)


def _build_tree(tree, tmp_path, **values):
    return build(source="imagenet", input=tree.root, out_dir=tmp_path / "out", workers=1, **values)


def test_undecodable_files_are_skipped_listed_and_counted(tree, tmp_path):
    cls_dir = tree.root / "train" / tree.wnids[0]
    good = (cls_dir / f"{tree.wnids[0]}_0.JPEG").read_bytes()
    (cls_dir / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (cls_dir / "junk.JPEG").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 8)
    (cls_dir / "notes.txt").write_text("not an image")
    (cls_dir / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (cls_dir / "nested").mkdir()
    (cls_dir / "moved.JPEG").symlink_to(tmp_path / "gone.JPEG")  # a broken link: listed, not lost
    (tree.root / "train" / "README").write_text("stray file outside the class folders")

    _, m = _build_tree(tree, tmp_path)
    skipped = {r["path"].split("/")[-1]: r for r in read_skipped(tmp_path / "out")}
    assert set(skipped) == {"truncated.JPEG", "junk.JPEG", "notes.txt", ".DS_Store", "nested", "README", "moved.JPEG"}
    assert "truncated" in skipped["truncated.JPEG"]["reason"]
    assert skipped["notes.txt"]["reason"] == "not an image (no known image format)"
    assert skipped["nested"]["reason"] == "directory inside a class folder"
    assert skipped["moved.JPEG"]["reason"] == f"broken symbolic link (to {tmp_path / 'gone.JPEG'})"
    assert all(r["split"] == "train" for r in skipped.values())
    assert m.splits["train"].skipped == 7 and m.splits["train"].total == 6 and m.splits["val"].skipped == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped_total"] == 7


def test_non_rgb_and_other_formats_are_converted_to_png(tree, tmp_path):
    cls_dir = tree.root / "train" / tree.wnids[1]
    rgb = np.asarray(Image.open(cls_dir / f"{tree.wnids[1]}_0.JPEG"))
    Image.fromarray(rgb).convert("CMYK").save(cls_dir / "cmyk.JPEG", format="JPEG")
    Image.fromarray(rgb).convert("P").save(cls_dir / "palette.png", format="PNG")
    Image.fromarray(rgb).save(cls_dir / "bitmap.bmp", format="BMP")
    Image.fromarray(rgb).save(cls_dir / "disguised.JPEG", format="PNG")  # as ImageNet's n02105855_2933

    _, m = _build_tree(tree, tmp_path)
    assert m.splits["train"].converted == 3 and m.splits["train"].skipped == 0
    import webdataset as wds
    urls = [str(tmp_path / "out" / e.name) for e in m.splits["train"].shards]
    by_key = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}
    prefix = tree.wnids[1]
    bmp = by_key[f"{prefix}_bitmap"]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(bmp["png"]))), rgb)  # lossless
    assert json.loads(bmp["json"])["converted"] == "BMP RGB -> PNG RGB"
    assert json.loads(by_key[f"{prefix}_cmyk"]["json"])["converted"] == "JPEG CMYK -> PNG RGB"
    assert Image.open(io.BytesIO(by_key[f"{prefix}_palette"]["png"])).mode == "RGB"
    assert "converted" not in json.loads(by_key[f"{prefix}_disguised"]["json"])  # an RGB PNG is kept as is


def test_empty_class_folder_is_an_error_naming_it(tree, tmp_path):
    (tree.root / "train" / "n99999999").mkdir()
    with pytest.raises(UserError, match=r"empty class folder: .*train/n99999999"):
        _build_tree(tree, tmp_path)


def test_val_class_not_in_train(tree, tmp_path):
    shutil.move(tree.root / "val" / tree.wnids[0], tree.root / "val" / "n00000042")
    with pytest.raises(UserError, match=r"val/n00000042.*not a class of"):
        _build_tree(tree, tmp_path)


@pytest.fixture
def flat_tree(tmp_path):
    return make_image_tree(tmp_path / "in", classes=2, train_per_class=2, val_per_class=2,
                           min_size=32, max_size=48, flat_val=True, seed=6)


def test_flat_val_without_label_file(flat_tree, tmp_path):
    (flat_tree.root / "LOC_val_solution.csv").unlink()
    with pytest.raises(UserError, match=r"val has no class folders and no label file.*LOC_val_solution.csv"):
        _build_tree(flat_tree, tmp_path)


def test_label_file_listing_a_missing_image(flat_tree, tmp_path):
    (flat_tree.root / "val" / "ILSVRC2012_val_00000002.JPEG").unlink()
    with pytest.raises(UserError, match=r"LOC_val_solution.csv lists 1 image\(s\) not in .*ILSVRC2012_val_00000002"):
        _build_tree(flat_tree, tmp_path)


def test_image_without_a_label(flat_tree, tmp_path):
    shutil.copy(flat_tree.root / "val" / "ILSVRC2012_val_00000001.JPEG", flat_tree.root / "val" / "extra.JPEG")
    with pytest.raises(UserError, match=r"LOC_val_solution.csv has no label for .*extra.JPEG"):
        _build_tree(flat_tree, tmp_path)


def test_label_with_unknown_class(flat_tree, tmp_path):
    csv = flat_tree.root / "LOC_val_solution.csv"
    csv.write_text(csv.read_text().replace(flat_tree.wnids[1], "n12345678", 1))
    with pytest.raises(UserError, match=r"LOC_val_solution.csv:\d+: class 'n12345678' is not a class"):
        _build_tree(flat_tree, tmp_path)


def test_malformed_label_files(flat_tree, tmp_path):
    csv = flat_tree.root / "LOC_val_solution.csv"
    csv.write_text("id,label\n")
    with pytest.raises(UserError, match="LOC_val_solution.csv: expected the header"):
        _build_tree(flat_tree, tmp_path)
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("1\n7\n1\n2\n")
    (tmp_path / "synsets.txt").write_text("\n".join(flat_tree.wnids))
    with pytest.raises(UserError, match=r"ground_truth.txt:2: expected an ILSVRC2012_ID in 1..2, got '7'"):
        _build_tree(flat_tree, tmp_path, val_labels=gt, val_synsets=tmp_path / "synsets.txt")
    with pytest.raises(UserError, match="needs the devkit's synset order"):
        _build_tree(flat_tree, tmp_path, val_labels=gt)
    with pytest.raises(UserError, match="label file not found: .*nope.csv"):
        _build_tree(flat_tree, tmp_path, val_labels=tmp_path / "nope.csv")


def test_missing_dataset_root_and_split(tmp_path, tree):
    with pytest.raises(UserError, match=r"dataset root not found: .*missing"):
        build(source="imagenet", input=tmp_path / "missing", out_dir=tmp_path / "out")
    shutil.rmtree(tree.root / "val")
    with pytest.raises(UserError, match=r"split folder not found: .*in/val"):
        _build_tree(tree, tmp_path)


def test_unwritable_output_is_an_error_naming_it(tree, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match=r"output directory .*a_file/shards is not writable"):
        build(source="imagenet", input=tree.root, out_dir=tmp_path / "a_file" / "shards")


@pytest.fixture
def fashion_copy(tmp_path, fashion_dir):
    copy = tmp_path / "fm"
    shutil.copytree(fashion_dir, copy)
    return copy


def test_fashion_mnist_missing_or_damaged_files(tmp_path, fashion_copy):
    labels = fashion_copy / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(labels.read_bytes())
    labels.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(UserError, match=r"t10k-labels-idx1-ubyte.gz: 9998 bytes, the header \[10000\] implies 10008"):
        build(source="fashion_mnist", input=fashion_copy, out_dir=tmp_path / "out", splits="[val]")
    labels.write_bytes(b"not gzip")
    with pytest.raises(UserError, match=r"t10k-labels-idx1-ubyte.gz: cannot read gzip"):
        build(source="fashion_mnist", input=fashion_copy, out_dir=tmp_path / "out", splits="[val]")
    labels.unlink()
    with pytest.raises(UserError, match=r"Fashion-MNIST file not found: .*t10k-labels-idx1-ubyte.gz"):
        build(source="fashion_mnist", input=fashion_copy, out_dir=tmp_path / "out", splits="[val]")
    assert not (tmp_path / "out" / "manifest.json").exists()
