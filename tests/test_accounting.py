"""Run length in samples; samples seen per rank and in total across 2 real gloo processes."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from robustmim.config import load_config
from robustmim.errors import ConfigError
from robustmim.pipeline.data.accounting import RunLength
from robustmim.pipeline.data.config import LoaderConfig
from robustmim.pipeline.data.dali import DaliLoader


def test_run_length_in_samples_or_epochs():
    assert RunLength(samples=1000).steps(split_size=60000, global_batch=64) == 16
    assert RunLength(epochs=2).total_samples(60000) == 120000
    assert RunLength(epochs=0.5).steps(60000, 4096) == 8
    assert load_config(RunLength, None, ["samples=10", "epochs=1"]).total_samples(60000) == 10  # samples win
    with pytest.raises(ConfigError, match="needs samples or epochs > 0"):
        load_config(RunLength)
    with pytest.raises(ConfigError, match="needs samples or epochs > 0"):
        load_config(RunLength, None, ["epochs=-1"])


def _rank_main(rank: int, world_size: int, port: int, shards: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        cfg = load_config(LoaderConfig, None, [f"shards={shards}", "split=val", "batch_size=50", "image_size=28",
                                               "channels=1", "num_threads=1", "augment=False"])
        loader = DaliLoader(cfg, rank=rank, world_size=world_size, with_source=True)
        names = [s for _ in range(7 + rank) for s in next(loader).sources]  # ranks at different steps
        gathered = [None] * world_size
        dist.all_gather_object(gathered, names)
        total = torch.tensor([loader.samples_seen])
        dist.all_reduce(total)  # what a run's sample count over all ranks is
        results[rank] = (loader.samples_seen, int(total), gathered)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_samples_seen_per_rank_and_total_on_two_processes(fashion_val_shards):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank_main, args=(2, port, str(fashion_val_shards), results), nprocs=2, join=True)
    (seen0, total0, gathered), (seen1, total1, _) = results[0], results[1]
    assert (seen0, seen1) == (350, 400) and total0 == total1 == 750
    assert not set(gathered[0]) & set(gathered[1])  # each process reads its own part of the split
