"""How a stage's ranks start on this machine (`--nproc-per-node`) and the options every
training launch shares (`--resume`), for the training commands, `eval` and `submit` alike."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Callable

RESUME_HELP = ("latest (default): continue from out_dir's newest checkpoint; none: start at step 0 (refused when "
               "out_dir holds checkpoints); or a step_* directory of any run to start from (checkpoint.resume)")


def add_resume_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", metavar="latest|none|PATH", help=RESUME_HELP)


def with_resume(overrides: list[str], resume: str | None) -> list[str]:
    """The overrides with `--resume` as the `checkpoint.resume` key (after them: the flag wins)."""
    return [*overrides, f"checkpoint.resume={resume}"] if resume else list(overrides)


# Exit status of a training run stopped by a signal (preemption, time-limit warning, Ctrl-C
# through SIGTERM) after writing its checkpoint: EX_TEMPFAIL, "try again later". Re-running the
# same command resumes. Scripts and Slurm epilogs tell it from 0 (finished) and 1/2 (failed).
EXIT_STOPPED = 75
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# Set for the ranks `launch_local_ranks` starts: they exit 0 when stopped and this process, which
# reads run_state.json, returns EXIT_STOPPED (torchrun would report their 75 as a crash).
SUPERVISED_ENV = "ROBUSTMIM_SUPERVISED_BY"


# Set for the ranks `launch_local_ranks` starts: a rank that stops on a UserError (a message
# naming the cause: bad data, a bad setting) leaves a file there. A failure without one is a rank
# killed outright (SIGSEGV in a decoder, the OOM killer; its peers then fail in a collective),
# whose cause the launching command looks for.
FAILURE_DIR_ENV = "ROBUSTMIM_FAILURE_DIR"


def record_rank_failure(error: BaseException) -> None:
    """Called by a rank's `main` on its way out with a UserError: leave the mark described above."""
    failures = os.environ.get(FAILURE_DIR_ENV)
    if failures and os.path.isdir(failures):
        rank = os.environ.get("RANK", "0")
        with open(os.path.join(failures, f"rank{rank}"), "w") as f:
            f.write(f"{type(error).__name__}: {error}\n")


def launch_local_ranks(stage: str, nproc_per_node: int, config: str | None, overrides: list[str],
                       on_crash: Callable[[], None] | None = None) -> int | None:
    """Run `nproc_per_node` ranks of `robustmim <stage>` under torchrun as a child and return its
    exit status; None when nothing needs starting (one rank, or already under a launcher).
    `on_crash` runs when they failed and none of them said why (see FAILURE_DIR_ENV).

    Stop signals sent to this process go straight to the ranks (torchrun would give them 30 s
    before killing them, less than a large checkpoint may need), so `kill <pid>` stops a local
    run as Slurm's SIGTERM does."""
    import shutil
    import tempfile

    from robustmim.pipeline.dist import detect_env

    if nproc_per_node <= 1 or detect_env().launcher != "single":
        return None
    failures = tempfile.mkdtemp(prefix="robustmim-failures-")
    try:
        status = _run_torchrun(stage, nproc_per_node, config, overrides, {FAILURE_DIR_ENV: failures})
        if status not in (0, EXIT_STOPPED) and on_crash is not None and not os.listdir(failures):
            on_crash()
        return status
    finally:
        shutil.rmtree(failures, ignore_errors=True)


def _run_torchrun(stage: str, nproc_per_node: int, config: str | None, overrides: list[str],
                  env: dict[str, str]) -> int:
    import subprocess

    import psutil

    from robustmim.pipeline.dist import free_port

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc_per_node),
               "--master_port", str(free_port()), "-m", "robustmim.cli", stage,
               *(["--config", config] if config else []), *overrides]
    # torchrun sets OMP_NUM_THREADS=1 for its ranks when unset, with a banner saying so: the
    # same value, set here, without the banner.
    child = subprocess.Popen(command, env={"OMP_NUM_THREADS": "1", **os.environ, SUPERVISED_ENV: str(os.getpid()),
                                           **env})

    def forward(signum, frame) -> None:
        for worker in psutil.Process(child.pid).children(recursive=True):
            try:
                worker.send_signal(signum)
            except psutil.NoSuchProcess:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        return child.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the whole process group: let the ranks finish exiting
        child.wait()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def explain_failed_ranks(stage: str, shards: str, split: str) -> None:
    """After ranks were killed outright (no rank reported an error): check the split's shards
    against their manifest and, when damaged, say which shards and samples. A damaged image can
    crash DALI's decoder (SIGSEGV in DALI 2.4, before the loader can name the shard), so this is
    where the user learns the cause. (A rank's own error already says it; hashing the shards after
    it would cost minutes on ImageNet for nothing.)"""
    from robustmim.errors import UserError
    from robustmim.pipeline.data.shardset import describe_damage, open_shards

    print(f"robustmim {stage}: a rank was killed without an error message; checking the sha256 of {shards} "
          f"(split {split}) against its manifest",
          file=sys.stderr, flush=True)
    try:
        damage = describe_damage(open_shards(shards, split))
    except (UserError, OSError) as e:  # the shards are unreadable or gone: say that instead
        damage = str(e)
    if damage:
        print(f"robustmim {stage}: error: damaged shards: {damage}. Rebuild the damaged shard; "
              f"data.verify_hashes=true finds such damage before training starts", file=sys.stderr, flush=True)
