"""The DALI loader on CPU: sharding, shuffling, exact resume, transforms, start-up checks."""

import io
import json
import shutil

import pytest
import torch

from robustmim.config import load_config
from robustmim.errors import ConfigError, UserError
from robustmim.pipeline.data.config import LoaderConfig
from robustmim.pipeline.data.dali import DaliLoader
from robustmim.pipeline.data.reference import ReferenceLoader
from robustmim.shards.manifest import load_manifest

from conftest import REPO_ROOT


def loader_config(shards, **values) -> LoaderConfig:
    defaults = dict(shards=shards, split="val", batch_size=100, image_size=28, channels=1,
                    num_threads=2, shuffle_buffer=512, augment=False)
    return load_config(LoaderConfig, None, [f"{k}={v}" for k, v in {**defaults, **values}.items()])


def sample_names(sources: list[str]) -> list[str]:
    return [s.rsplit(":", 1)[1] for s in sources]


def take(loader, n_batches: int):
    batches = [next(loader) for _ in range(n_batches)]
    return (torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches]),
            sample_names([s for b in batches for s in b.sources]))


def all_members(shard_dir, split="val") -> set[str]:
    return {f"{k}.png" for k in _keys(shard_dir, split)}


def _keys(shard_dir, split):
    import tarfile
    keys = set()
    for e in load_manifest(shard_dir).splits[split].shards:
        with tarfile.open(shard_dir / e.name) as tar:
            keys |= {m.name.split(".")[0] for m in tar}
    return keys


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_streams_are_disjoint_and_cover_the_split_each_epoch(fashion_val_shards, world_size):
    cfg = loader_config(fashion_val_shards)
    everything = all_members(fashion_val_shards)
    chunks = [10000 * (r + 1) // world_size - 10000 * r // world_size for r in range(world_size)]
    streams = []
    for rank in range(world_size):
        loader = DaliLoader(cfg, rank=rank, world_size=world_size, with_source=True)
        _, _, names = take(loader, -(-2 * chunks[rank] // 100))
        streams.append(names)
    for epoch in range(2):
        parts = [s[epoch * c:(epoch + 1) * c] for s, c in zip(streams, chunks)]
        assert all(len(set(p)) == len(p) for p in parts)  # no repeats within a rank's epoch
        assert sum(len(p) for p in parts) == 10000 and set().union(*map(set, parts)) == everything
    assert streams[0][:chunks[0]] != streams[0][chunks[0]:2 * chunks[0]]  # reshuffled every epoch


def test_stream_is_reproducible_for_a_seed(fashion_val_shards):
    cfg = loader_config(fashion_val_shards, augment=True, image_size=24)
    a = take(DaliLoader(cfg, with_source=True), 5)
    b = take(DaliLoader(cfg, with_source=True), 5)
    assert torch.equal(a[0], b[0]) and a[2] == b[2]
    c = take(DaliLoader(loader_config(fashion_val_shards, augment=True, image_size=24, seed=1), with_source=True), 5)
    assert c[2] != a[2]


@pytest.mark.parametrize("world_size", [1, 2])
def test_checkpoint_rebuild_continue_equals_uninterrupted(fashion_val_shards, world_size):
    """Augmentation on, batches of 64, interrupted at batch 37 and run past the epoch end (78)."""
    cfg = loader_config(fashion_val_shards, augment=True, image_size=24, channels=3, batch_size=64)
    for rank in range(world_size):
        whole = take(DaliLoader(cfg, rank=rank, world_size=world_size, with_source=True), 37 + 60)
        first = DaliLoader(cfg, rank=rank, world_size=world_size, with_source=True)
        head = take(first, 37)
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)  # as a checkpoint would carry it
        del first
        state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
        assert (state["batches"], state["samples_seen"]) == (37, 37 * 64)
        resumed = DaliLoader(cfg, rank=rank, world_size=world_size, state=state, with_source=True)
        tail = take(resumed, 60)
        assert head[2] + tail[2] == whole[2]
        assert torch.equal(torch.cat([head[0], tail[0]]), whole[0])  # same crops and flips too
        assert torch.equal(torch.cat([head[1], tail[1]]), whole[1])
        assert resumed.samples_seen == 97 * 64 and resumed.epoch == pytest.approx(97 * 64 / (10000 / world_size))


def test_saved_position_only_applies_to_the_same_loader(fashion_val_shards):
    cfg = loader_config(fashion_val_shards)
    loader = DaliLoader(cfg, rank=1, world_size=2)
    next(loader)
    state = loader.state_dict()
    with pytest.raises(UserError, match=r"rank: saved 1, now 0.*world_size: saved 2, now 1"):
        DaliLoader(cfg, state=state)
    with pytest.raises(UserError, match=r"seed: saved 0, now 3"):
        DaliLoader(loader_config(fashion_val_shards, seed=3), rank=1, world_size=2, state=state)


@pytest.mark.parametrize("channels", [1, 3])
def test_augmented_output_shape_range_dtype(fashion_val_shards, channels):
    cfg = loader_config(fashion_val_shards, augment=True, image_size=24, channels=channels)
    batch = next(DaliLoader(cfg))
    assert batch.images.shape == (100, channels, 24, 24) and batch.images.dtype == torch.float32
    assert batch.images.min() >= 0 and batch.images.max() <= 1 and batch.images.max() > 0.5
    assert batch.labels.dtype == torch.int64 and 0 <= batch.labels.min() and batch.labels.max() < 10
    if channels == 3:  # grayscale expanded: three equal channels
        red, green, blue = batch.images[:, 0], batch.images[:, 1], batch.images[:, 2]
        assert torch.equal(red, green) and torch.equal(green, blue)


def test_augmentation_crops_and_flips(jpeg_shards):
    plain = loader_config(jpeg_shards, split="train", image_size=48, channels=3, batch_size=16,
                          eval_crop_fraction=1.0)
    augmented = loader_config(jpeg_shards, split="train", image_size=48, channels=3, batch_size=16, augment=True)
    eval_images = dict(zip(*reversed(take(DaliLoader(plain, train=False, with_source=True), 5)[::2])))
    aug = take(DaliLoader(augmented, with_source=True), 5)
    changed = [not torch.allclose(image, eval_images[name], atol=0.05) for image, name in zip(aug[0], aug[2])]
    assert sum(changed) > len(changed) * 0.8  # random crops of area 0.2-1 rarely reproduce the image
    assert aug[0].shape == (80, 3, 48, 48)


def test_dali_equals_reference_without_resampling(fashion_val_shards, jpeg_shards):
    """Augmentation off, output size = stored size: PNG equal; JPEG within decoder rounding."""
    cfg = loader_config(fashion_val_shards, eval_crop_fraction=1.0)
    dali, reference = DaliLoader(cfg, train=False), ReferenceLoader(cfg, train=False, num_workers=0)
    for dali_batch, reference_batch in zip(dali, reference):
        assert torch.equal(dali_batch.labels, reference_batch.labels)
        assert (dali_batch.images - reference_batch.images).abs().max() < 1e-6
    cfg = loader_config(jpeg_shards, split="train", image_size=48, channels=3, batch_size=16, eval_crop_fraction=1.0)
    dali, reference = DaliLoader(cfg, train=False), ReferenceLoader(cfg, train=False, num_workers=0)
    pairs = list(zip(dali, reference))
    assert sum(len(d.labels) for d, _ in pairs) == 80
    for d, r in pairs:
        assert torch.equal(d.labels, r.labels)
        diff = (d.images - r.images).abs()
        assert diff.max() <= 3 / 255 and diff.mean() < 0.5 / 255  # two JPEG decoders' IDCT rounding


def test_dali_close_to_reference_with_bicubic_resize(fashion_val_shards):
    cfg = loader_config(fashion_val_shards, eval_crop_fraction=0.875)  # 28 -> 32 bicubic -> center 28
    for d, r, _ in zip(DaliLoader(cfg, train=False), ReferenceLoader(cfg, train=False, num_workers=0), range(10)):
        assert torch.equal(d.labels, r.labels)
        assert (d.images - r.images).abs().mean() < 1 / 255  # kernels differ at the borders only


def test_eval_pass_gives_each_rank_exactly_its_chunk(fashion_val_shards):
    cfg = loader_config(fashion_val_shards, batch_size=128)
    seen = []
    for rank in range(3):
        loader = DaliLoader(cfg, rank=rank, world_size=3, train=False, with_source=True)
        batches = list(loader)
        names = sample_names([s for b in batches for s in b.sources])
        assert len(batches) == len(loader) and len(names) == (3334 if rank == 2 else 3333)  # DALI: bounds at N*r//W
        seen += names
    assert len(seen) == len(set(seen)) == 10000


@pytest.fixture
def damaged_copy(tmp_path, fashion_val_shards):
    out = tmp_path / "shards"
    shutil.copytree(fashion_val_shards, out)
    return out


def test_truncated_shard_is_a_clear_error_before_start(damaged_copy):
    entry = load_manifest(damaged_copy).splits["val"].shards[7]
    path = damaged_copy / entry.name
    path.write_bytes(path.read_bytes()[:-5000])
    expected = rf"shard .*{entry.name} has {entry.bytes - 5000} bytes, the manifest says {entry.bytes}"
    with pytest.raises(UserError, match=expected):
        DaliLoader(loader_config(damaged_copy))


def test_missing_shard_or_index_is_a_clear_error(damaged_copy):
    m = load_manifest(damaged_copy)
    (damaged_copy / m.splits["val"].shards[3].index).unlink()
    with pytest.raises(UserError, match=rf"DALI index missing from disk: .*{m.splits['val'].shards[3].index}"):
        DaliLoader(loader_config(damaged_copy))
    (damaged_copy / m.splits["val"].shards[2].name).unlink()
    with pytest.raises(UserError, match=rf"shard missing from disk: .*{m.splits['val'].shards[2].name}"):
        DaliLoader(loader_config(damaged_copy))


def test_refuses_shards_whose_verification_failed(damaged_copy):
    raw = json.loads((damaged_copy / "manifest.json").read_text())
    raw["verification"] = {"status": "failed", "time": "2026-01-01T00:00:00+00:00", "bad_shards": ["val-000004.tar"]}
    (damaged_copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"shards verify.* failed on \['val-000004.tar'\]"):
        DaliLoader(loader_config(damaged_copy))


def test_hash_check_at_start_up_when_asked(damaged_copy):
    entry = load_manifest(damaged_copy).splits["val"].shards[5]
    data = bytearray((damaged_copy / entry.name).read_bytes())
    data[-20000] ^= 1
    (damaged_copy / entry.name).write_bytes(bytes(data))
    DaliLoader(loader_config(damaged_copy))  # same size: only the hash can tell
    with pytest.raises(UserError, match=rf"{entry.name}: sha256 differs"):
        DaliLoader(loader_config(damaged_copy, verify_hashes=True))


def test_an_edited_index_is_refused_at_start_up(damaged_copy):
    """DALI trusts its index: swapping two samples' label offsets would swap their labels silently."""
    entry = load_manifest(damaged_copy).splits["val"].shards[1]
    index = damaged_copy / entry.index
    lines = index.read_text().splitlines()
    first, second = lines[1].split(), lines[2].split()
    first[1], second[1] = second[1], first[1]  # the .cls offsets of two samples, same length
    lines[1], lines[2] = " ".join(first), " ".join(second)
    index.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=rf"DALI index .*{entry.index} differs from the one built"):
        DaliLoader(loader_config(damaged_copy))


def test_an_index_with_another_sample_count_is_refused(damaged_copy):
    entry = load_manifest(damaged_copy).splits["val"].shards[2]
    raw = json.loads((damaged_copy / "manifest.json").read_text())
    for shard in raw["splits"]["val"]["shards"]:
        shard["index_sha256"] = ""  # a manifest written before index digests were recorded
    (damaged_copy / "manifest.json").write_text(json.dumps(raw))
    index = damaged_copy / entry.index
    lines = index.read_text().splitlines()
    index.write_text("\n".join([f"v1.2 {len(lines) - 2}", *lines[1:-1]]) + "\n")  # one sample dropped
    with pytest.raises(UserError, match=rf"{entry.index} lists {entry.samples - 1} samples, the manifest "
                                        rf"{entry.samples}"):
        DaliLoader(loader_config(damaged_copy))


@pytest.mark.distributed
@pytest.mark.slow
def test_same_size_damage_met_while_training_names_the_shard_and_samples(damaged_copy, tmp_path):
    """Images damaged inside a shard (same size: start-up cannot tell) met by a training run on 2
    ranks: the command fails naming the shard and its samples. DALI 2.4 raises on some such images
    and crashes (SIGSEGV) on others, so the ranks' own message may never come; the launcher then
    checks the shards itself. Run as a command, so a crash cannot take the test process with it."""
    import subprocess
    import tarfile

    from helpers import ROBUSTMIM, settings

    entries = load_manifest(damaged_copy).splits["val"].shards
    for entry in entries:  # every image of every shard: whichever a rank reads first is damaged
        path = damaged_copy / entry.name
        with tarfile.open(path) as tar:
            members = [m for m in tar if m.name.endswith(".png")]
        data = bytearray(path.read_bytes())
        for member in members:
            data[member.offset_data:member.offset_data + 16] = bytes(16)  # PNG signature and header: not an image
        path.write_bytes(bytes(data))
    entry = entries[-1]  # the last shard read: its members are still in `members`
    overrides = [f"{k}={v}" for k, v in settings(damaged_copy, tmp_path / "run").items()]
    done = subprocess.run([ROBUSTMIM, "pretrain", "--nproc-per-node", "2", *overrides], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    assert f"{entry.name} (sha256 differs from the manifest; samples that fail to decode: " in out, out[-3000:]
    assert members[0].name.rsplit(".", 1)[0] in out and "verify_hashes=true" in out


@pytest.mark.parametrize("override, message", [
    ("channels=2", "channels must be 1 or 3"), ("crop_scale=[0.5,0.2]", "crop_scale"),
    ("batch_size=0", "batch_size must be positive"), ("device=tpu", "device"),
])
def test_bad_loader_config(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(LoaderConfig, None, ["shards=/x", override])
