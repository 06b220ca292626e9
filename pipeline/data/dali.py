"""The training and evaluation loader: DALI reading the shards stage's WebDataset shards.

One pipeline definition serves both machines: with a GPU, JPEG decoding is `mixed` (nvJPEG)
and every operator after it runs on the GPU, so batches arrive as CUDA tensors; without one
(CI, this CPU machine) the same graph runs on CPU operators. The choice is made when the
pipeline is built, from `LoaderConfig.device`.

Sharding, shuffling and padding:
- The reader splits the split's samples into `world_size` contiguous chunks (`shard_id`,
  `num_shards`). Training streams reshuffle the order of whole tar shards every epoch with a
  seed shared by all ranks (`shuffle_after_epoch`), so within an epoch the ranks' chunks are
  disjoint and together cover the split once; on top, each rank shuffles within a buffer of
  `shuffle_buffer` samples (the shards were globally shuffled when built).
- Training is an endless stream: a batch that crosses the end of a rank's epoch is completed
  from its next epoch, so every rank yields full, equal batches and no rank can stall the
  others. Nothing is padded and nothing is dropped; a run's length is counted in samples.
- Evaluation is one pass in stored order with no shuffle: the reader pads each rank's chunk
  (`pad_last_batch`) and the iterator returns the last batch PARTIAL, so each rank yields
  exactly its chunk (ranks differ by at most one sample), without duplicates.

Exact resume: the pipeline is built with DALI checkpointing, which covers the webdataset
reader's position (with sharding and both shuffles) and the state of the random operators.
`state_dict()` holds that checkpoint plus our counters; a loader built with it continues with
exactly the samples and augmentations an uninterrupted loader would have produced (tested
for 1 and 2 ranks). A saved position applies only to the same shards, rank and world size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from robustmim.errors import UserError
from robustmim.pipeline.data.config import LoaderConfig, LoaderDevice
from robustmim.pipeline.data.shardset import ShardSet, open_shards

READER_NAME = "reader"
STATE_FORMAT = 1


@dataclass
class Batch:
    images: torch.Tensor  # float32 [B, C, S, S] in [0, 1]
    labels: torch.Tensor  # int64 [B]
    sources: Optional[list[str]] = None  # "<tar>:<offset>:<member>" per sample, when asked for


def use_gpu(device: LoaderDevice) -> bool:
    if device is LoaderDevice.gpu and not torch.cuda.is_available():
        raise UserError("loader device=gpu, but torch sees no CUDA device")
    return device is LoaderDevice.gpu or (device is LoaderDevice.auto and torch.cuda.is_available())


def rank_seed(seed: int, rank: int) -> int:
    """Seed of a rank's random operators and shuffle buffer: distinct per rank, fixed by (seed, rank)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0] % 2**31)


def build_pipeline(cfg: LoaderConfig, shards: ShardSet, rank: int, world_size: int, device_id: Optional[int],
                   train: bool, with_source: bool = False, checkpoint: Optional[str] = None):
    """The DALI pipeline of one rank (device_id None: CPU operators only)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    on_gpu = device_id is not None
    decoder_device = "mixed" if on_gpu else "cpu"
    color = types.RGB if cfg.channels == 3 else types.GRAY
    size = cfg.image_size

    decoder_options = {}
    if on_gpu:  # the mixed (nvJPEG) decoder's load split and memory reservations
        decoder_options = {"hw_decoder_load": cfg.hw_decoder_load}
        for key in ("device_memory_padding", "host_memory_padding", "preallocate_width_hint",
                    "preallocate_height_hint"):
            if getattr(cfg, key):
                decoder_options[key] = getattr(cfg, key)

    @pipeline_def(batch_size=cfg.batch_size, num_threads=cfg.num_threads, device_id=device_id,
                  seed=rank_seed(cfg.seed, rank), prefetch_queue_depth=cfg.prefetch, enable_checkpointing=True)
    def graph():
        encoded, labels = fn.readers.webdataset(
            paths=shards.tar_paths, index_paths=shards.index_paths,
            ext=["jpg;png", "cls.i32"], dtypes=[types.UINT8, types.INT32], missing_component_behavior="error",
            shard_id=rank, num_shards=world_size,
            random_shuffle=train, initial_fill=cfg.shuffle_buffer,
            shuffle_after_epoch=train,
            **({"shuffle_after_epoch_seed": cfg.seed} if train else {}),  # the same on every rank
            pad_last_batch=not train,
            dont_use_mmap=True,  # plain reads: mmap turns some damaged files into SIGSEGV in DALI 2.4
            name=READER_NAME)
        if train and cfg.augment:
            images = fn.decoders.image_random_crop(
                encoded, device=decoder_device, output_type=color, num_attempts=10,
                random_area=list(cfg.crop_scale), random_aspect_ratio=list(cfg.crop_ratio), **decoder_options)
            images = fn.resize(images, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)
            mirror = fn.random.coin_flip(probability=0.5) if cfg.flip else 0
        else:
            images = fn.decoders.image(encoded, device=decoder_device, output_type=color, **decoder_options)
            images = fn.resize(images, resize_shorter=cfg.eval_resize, interp_type=types.INTERP_CUBIC, antialias=True)
            mirror = 0
        images = fn.crop_mirror_normalize(
            images, crop=(size, size), mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
            mean=[0.0] * cfg.channels, std=[255.0] * cfg.channels)  # [0, 1]: objectives normalize later
        labels = fn.reshape(labels, shape=[])
        outputs = [images, labels.gpu() if on_gpu else labels]
        if with_source:  # padded to the batch's longest, so the iterator sees one shape
            outputs.append(fn.pad(fn.get_property(encoded, key="source_info"), axes=[0], fill_value=0))
        return tuple(outputs)

    pipe = graph(checkpoint=checkpoint)
    pipe.build()
    return pipe


class DaliLoader:
    """Batches of one rank: an endless shuffled, augmented stream (train) or one ordered pass (eval)."""

    def __init__(self, cfg: LoaderConfig, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 train: bool = True, state: Optional[dict] = None, with_source: bool = False):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.cfg, self.rank, self.world_size, self.train = cfg, rank, world_size, train
        self.shards = open_shards(cfg.shards, cfg.split, cfg.verify_hashes)
        if self.shards.total < world_size:
            raise UserError(f"{cfg.shards}: split '{cfg.split}' has {self.shards.total} samples for {world_size} ranks")
        self.batches, self.samples_seen = 0, 0
        checkpoint = None
        if state is not None:
            self._check_state(state)
            self.batches, self.samples_seen, checkpoint = state["batches"], state["samples_seen"], state["dali"]
        device_id = local_rank if use_gpu(cfg.device) else None
        pipe = build_pipeline(cfg, self.shards, rank, world_size, device_id, train, with_source, checkpoint)
        self.on_gpu = device_id is not None
        self._with_source = with_source
        outputs = ["images", "labels"] + (["sources"] if with_source else [])
        if train:  # endless: no reader_name, so the iterator never stops at an epoch end
            self._iterator = DALIGenericIterator([pipe], outputs, size=-1, auto_reset=False)
        else:
            self._iterator = DALIGenericIterator([pipe], outputs, reader_name=READER_NAME,
                                                 last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> "DaliLoader":
        return self

    def __next__(self) -> Batch:
        try:
            out = next(self._iterator)[0]
        except RuntimeError as e:  # DALI's reader or decoder failed on a shard
            from robustmim.pipeline.data.shardset import describe_damage

            damage = describe_damage(self.shards)
            where = f"damaged: {damage}" if damage else "every shard still matches its manifest sha256"
            raise UserError(f"the loader failed reading {self.cfg.shards} (split {self.cfg.split}, rank {self.rank}): "
                            f"{where}. DALI said: {str(e).strip().splitlines()[0][:300]}. Rebuild the damaged shard; "
                            f"data.verify_hashes=true finds such damage before training starts") from None
        batch = Batch(out["images"], out["labels"].long())
        if self._with_source:
            batch.sources = [bytes(row[row != 0].tolist()).decode() for row in out["sources"].cpu()]
        self.batches += 1
        self.samples_seen += batch.labels.shape[0]  # a shape, not a value: no host sync
        return batch

    def __len__(self) -> int:
        """Batches of one evaluation pass on this rank (a training stream has no length)."""
        if self.train:
            raise TypeError("a training stream is endless; count its length in samples")
        per_rank = _chunk_sizes(self.shards.total, self.world_size)[self.rank]
        return -(-per_rank // self.cfg.batch_size)

    @property
    def chunk_size(self) -> int:
        """Samples of this rank's chunk in an evaluation pass."""
        return _chunk_sizes(self.shards.total, self.world_size)[self.rank]

    @property
    def first_index(self) -> int:
        """Index in the split of this rank's first sample in an evaluation pass (contiguous chunks)."""
        return self.shards.total * self.rank // self.world_size

    @property
    def epoch(self) -> float:
        """Epochs of the split this rank has consumed (training streams)."""
        return self.samples_seen / _chunk_sizes(self.shards.total, self.world_size)[self.rank]

    # -- position ----------------------------------------------------------------------------
    def _identity(self) -> dict:
        return {"format": STATE_FORMAT, "shards": self.shards.fingerprint(), "split": self.cfg.split,
                "rank": self.rank, "world_size": self.world_size, "seed": self.cfg.seed,
                "batch_size": self.cfg.batch_size, "train": self.train}

    def state_dict(self) -> dict:
        """The position after the last batch returned: restore with DaliLoader(..., state=...)."""
        return {**self._identity(), "batches": self.batches, "samples_seen": self.samples_seen,
                "dali": self._iterator.checkpoints()[0]}

    def _check_state(self, state: dict) -> None:
        expected = self._identity()
        if state.get("shards") == self.shards.path_fingerprint():  # saved by an earlier version, same paths
            expected["shards"] = state["shards"]
        differ = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if differ:
            details = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise UserError(f"saved loader position does not apply to this loader ({details})")


def _chunk_sizes(total: int, world_size: int) -> list[int]:
    """Samples per rank as DALI's reader splits them: contiguous, as even as possible."""
    bounds = [total * r // world_size for r in range(world_size + 1)]
    return [bounds[r + 1] - bounds[r] for r in range(world_size)]
