"""Stop requests from Slurm: SIGTERM (preemption, scancel, requeue) and SIGUSR1/SIGUSR2 (the
warning before the time limit; submitit asks Slurm for SIGUSR2) set a flag; the loop checks
it, all ranks together, at log intervals, then checkpoints and exits cleanly. While training
runs these handlers replace submitit's, whose SIGUSR2 handler would requeue and exit at once,
before a checkpoint could be written; the job requeues itself afterwards (slurm/job.py)."""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
TIME_LIMIT_WARNINGS = ("SIGUSR1", "SIGUSR2")


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
