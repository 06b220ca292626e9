"""`robustmim shards verify` catches damage and names the shard and, where it can, the sample."""

import json
import shutil

import pytest

from robustmim.cli import main
from robustmim.shards.manifest import load_manifest
from robustmim.shards.verify import _selected

from conftest import build


@pytest.fixture
def shards_copy(tmp_path, tree_shards):
    out = tmp_path / "shards"
    shutil.copytree(tree_shards, out)
    return out


def _verify(capsys, shard_dir, *extra):
    code = main(["shards", "verify", str(shard_dir), "--workers", "2", *extra])
    return code, capsys.readouterr().out


def _set_first_member_byte(shard_dir, split: str, ext: str, value) -> tuple[str, str]:
    """Change the first data byte of the first sample's `.ext` member (found through the DALI
    index) to value(old byte); returns (shard name, sample key)."""
    entry = load_manifest(shard_dir).splits[split].shards[0]
    fields = (shard_dir / entry.index).read_text().splitlines()[1].split()
    member = next(i for i in range(0, len(fields), 4) if fields[i] == ext)
    key, offset = fields[member + 3].split(".")[0], int(fields[member + 1])
    path = shard_dir / entry.name
    data = bytearray(path.read_bytes())
    data[offset] = value(data[offset])
    path.write_bytes(bytes(data))
    return entry.name, key


def test_clean_shards_pass_and_the_outcome_is_recorded(capsys, shards_copy):
    code, out = _verify(capsys, shards_copy)
    assert code == 0 and out.strip().endswith("ok")
    v = load_manifest(shards_copy).verification
    assert v["status"] == "passed" and v["problems"] == 0 and v["decoded_fraction"] == 1.0


def test_truncated_shard(capsys, shards_copy):
    entry = load_manifest(shards_copy).splits["train"].shards[1]
    path = shards_copy / entry.name
    path.write_bytes(path.read_bytes()[: entry.bytes // 2])
    code, out = _verify(capsys, shards_copy)
    assert code == 1
    assert f"BAD {entry.name}: {entry.bytes // 2} bytes, the manifest says {entry.bytes}" in out
    assert f"samples, the manifest says {entry.samples}" in out
    v = load_manifest(shards_copy).verification
    assert v["status"] == "failed" and v["bad_shards"] == [entry.name]


def test_flipped_byte_in_an_image_names_the_sample(capsys, shards_copy):
    shard, key = _set_first_member_byte(shards_copy, "val", "jpg", lambda b: b ^ 0xFF)  # JPEG marker gone
    code, out = _verify(capsys, shards_copy)
    assert code == 1
    assert f"BAD {shard}: sha256 differs from the manifest" in out
    assert f"BAD {shard} [{key}]: image .jpg: not an image" in out


def test_flipped_label_byte_names_the_sample(capsys, shards_copy):
    shard, key = _set_first_member_byte(shards_copy, "train", "cls", lambda b: ord("9"))  # of 3 classes
    code, out = _verify(capsys, shards_copy)
    assert code == 1
    assert f"BAD {shard} [{key}]: label 9 outside 0..2" in out
    assert f"BAD {shard} [{key}]: int32 label" in out  # no longer equal to the binary label


def test_wrong_count_in_manifest(capsys, shards_copy):
    raw = json.loads((shards_copy / "manifest.json").read_text())
    raw["splits"]["train"]["shards"][0]["samples"] += 1
    name = raw["splits"]["train"]["shards"][0]["name"]
    (shards_copy / "manifest.json").write_text(json.dumps(raw))
    code, out = _verify(capsys, shards_copy)
    assert code == 1 and f"BAD {name}: 5 samples, the manifest says 6" in out


def test_missing_shard_and_index(capsys, shards_copy):
    m = load_manifest(shards_copy)
    (shards_copy / m.splits["train"].shards[0].name).unlink()
    (shards_copy / m.splits["val"].shards[0].index).unlink()
    code, out = _verify(capsys, shards_copy, "--no-record")
    assert code == 1
    assert f"BAD {m.splits['train'].shards[0].name}: missing" in out
    assert f"DALI index {m.splits['val'].shards[0].index} is missing" in out
    assert load_manifest(shards_copy).verification is None  # --no-record leaves the manifest alone


def test_stale_index_is_caught(capsys, shards_copy):
    m = load_manifest(shards_copy)
    a, b = m.splits["train"].shards[0], m.splits["train"].shards[1]
    shutil.copy(shards_copy / b.index, shards_copy / a.index)
    code, out = _verify(capsys, shards_copy)
    assert code == 1 and f"BAD {a.name}: DALI index {a.index} does not match the tar" in out


def test_sampled_decode_checks_a_seeded_fraction(capsys, tmp_path, fashion_dir):
    keys = [f"t10k_{i:05d}" for i in range(10000)]
    picked = [k for k in keys if _selected(k, 0.1, seed=0)]
    assert 900 < len(picked) < 1100 and picked == [k for k in keys if _selected(k, 0.1, seed=0)]
    assert picked != [k for k in keys if _selected(k, 0.1, seed=1)]

    out = tmp_path / "fm"
    build(source="fashion_mnist", input=fashion_dir, out_dir=out, splits="[val]", shard_max_samples=2500, workers=2)
    code, _ = _verify(capsys, out, "--sample", "0.1")
    assert code == 0 and load_manifest(out).verification["decoded_fraction"] == 0.1
    assert main(["shards", "verify", str(out), "--sample", "0"]) == 2
