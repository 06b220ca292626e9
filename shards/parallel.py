"""A process pool with a progress bar, shared by building and verifying shards."""

from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed

from tqdm import tqdm


def run_parallel(fn, jobs: list[tuple], workers: int, desc: str, weights: list[int], unit: str) -> list:
    """fn(*job) for each job on `workers` processes, in completion order; the progress bar
    advances by each job's weight and hides itself when stderr is not a terminal (Slurm logs)."""
    if not jobs:
        return []
    results = []
    # spawn: workers start clean, whatever threads the parent (tqdm, numpy) runs
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool, \
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
