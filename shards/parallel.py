"""A process pool with a progress bar, shared by building and verifying shards."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

from tqdm import tqdm


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _exit_with_parent(parent_pid: int) -> None:
    """Worker initializer: a worker whose parent dies (SIGKILL, OOM killer) ends too, instead of
    waiting forever on a queue nobody feeds. Linux delivers SIGKILL on the parent's death; the
    polling thread covers other systems and a parent that died before this line ran."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def run_parallel(fn, jobs: list[tuple], workers: int, desc: str, weights: list[int], unit: str) -> list:
    """fn(*job) for each job on `workers` processes, in completion order; the progress bar
    advances by each job's weight and hides itself when stderr is not a terminal (Slurm logs)."""
    if not jobs:
        return []
    results = []
    # spawn: workers start clean, whatever threads the parent (tqdm, numpy) runs
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context,
                             initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool, \
            tqdm(total=sum(weights), desc=desc, unit=unit, disable=None, file=sys.stderr) as bar:
        futures = {pool.submit(fn, *job): weight for job, weight in zip(jobs, weights, strict=True)}
        try:
            for future in as_completed(futures):
                results.append(future.result())
                bar.update(futures[future])
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results
