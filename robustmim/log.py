"""Diagnostics through `logging`, on stderr: notes from rank 0, warnings and errors from any rank.

Every module logs to a child of the `robustmim` logger (`get_logger(__name__)`); the command's
own output (tables, summaries, `--print-config`) stays on stdout. `setup_logging` installs the
one handler, once per process, with a filter that lets ranks other than 0 through only from
WARNING up: N ranks would otherwise print every note N times, but a problem seen by one rank
must still show. Warnings read `warning: ...`, notes as written.

`quiet_libraries` keeps out of the console what carries nothing for a user of this pipeline:
DeepSpeed's INFO lines (accelerator probing, its config dump) and its notice that a machine
without a GPU runs on the CPU (intended here), and torch's deprecation warning about a
collective DeepSpeed calls. DeepSpeed's own warnings and errors still show.
"""

from __future__ import annotations

import logging
import sys
import warnings

ROOT = "robustmim"


def get_logger(name: str) -> logging.Logger:
    """The logger of a module (`get_logger(__name__)`), under `robustmim`."""
    return logging.getLogger(f"{ROOT}.{name}")


class RankFilter(logging.Filter):
    """Everything on rank 0; WARNING and above on the other ranks."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return f"warning: {message}" if record.levelno == logging.WARNING else message


def setup_logging(rank: int, level: int = logging.INFO) -> None:
    """One stderr handler on the `robustmim` logger for this process (again: its rank updated)."""
    logger = logging.getLogger(ROOT)
    logger.setLevel(level)
    logger.propagate = False  # a host application's root handlers would print every line twice
    for handler in logger.handlers:
        if getattr(handler, "robustmim", False):
            handler.filters = [RankFilter(rank)]
            return
    handler = logging.StreamHandler(sys.stderr)
    handler.robustmim = True
    handler.setFormatter(PlainFormatter("%(message)s"))
    handler.addFilter(RankFilter(rank))
    logger.addHandler(handler)


class DeepSpeedNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        return not record.getMessage().startswith("Setting accelerator to CPU")


def quiet_libraries() -> None:
    """Call before DeepSpeed is imported (its accelerator notice comes at import)."""
    deepspeed_logger = logging.getLogger("DeepSpeed")  # DeepSpeed's logger keeps this object and its filters
    if not any(isinstance(f, DeepSpeedNoise) for f in deepspeed_logger.filters):
        deepspeed_logger.addFilter(DeepSpeedNoise())
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
