"""Logging on rank 0: a progress line, a JSONL metrics file and scalar sinks (TensorBoard, and
Weights & Biases with `logging.wandb=true`) behind one interface.

Values are read from the device only at log intervals. On resume the JSONL file is cut back to
the resumed step, so it always holds one run's curve without the killed run's tail; the rows
cut (a killed run's tail, or a whole log when no checkpoint was left to resume from) are
appended to metrics.superseded.jsonl, never dropped. TensorBoard purges its events after the
resumed step; W&B keeps what it received (charts plot against the training step, so a tail
logged again after a resume overlaps the first one).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from robustmim.config import to_dict
from robustmim.errors import UserError
from robustmim.fileio import atomic_write_text
from robustmim.log import get_logger
from robustmim.pipeline.engine.config import EngineConfig, LoggingConfig

log = get_logger(__name__)

METRICS_FILE = "metrics.jsonl"
SUPERSEDED_FILE = "metrics.superseded.jsonl"


def read_metrics(out_dir: str | Path) -> list[dict]:
    """The logged rows; a last line cut short by a killed writer is left out."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()
    return [json.loads(line) for line in lines]


class Progress:
    """A tqdm bar with a summary beside it on a terminal; a plain line per update where stderr is
    not one (Slurm logs), so logs hold no escape codes."""

    def __init__(self, total: int, initial: int, unit: str, label: str):
        self.total, self.label = total, label
        self.bar = tqdm(total=total, initial=initial, unit=unit, file=sys.stderr, disable=None, dynamic_ncols=True)

    def show(self, position: int, summary: str) -> None:
        if self.bar.disable:
            print(f"{self.label} {position}/{self.total} {summary}", file=sys.stderr, flush=True)
        else:
            self.bar.update(position - self.bar.n)
            self.bar.set_postfix_str(summary, refresh=True)

    def write(self, text: str) -> None:
        (self.bar.write if not self.bar.disable else print)(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


class TensorBoardSink:
    """<out_dir>/tensorboard/, events after `start_step` purged (a resumed run's curve continues
    the checkpoint's, not the killed attempt's tail)."""

    def __init__(self, out_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)

    def add(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run whose id is the robustmim run's (kept in every checkpoint): a
    requeued or re-run job continues it. Every chart's x-axis is the training step (W&B's own
    step counts calls, which a resume would repeat)."""

    def __init__(self, cfg: LoggingConfig, out_dir: Path, run_id: str, stage: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise UserError("logging.wandb=true needs the wandb package: pip install wandb") from None
        mode = os.environ.get("WANDB_MODE") or cfg.wandb_mode.value
        try:
            self.run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity or None, id=run_id,
                                  resume="allow", dir=str(out_dir), mode=mode, name=out_dir.name, job_type=stage,
                                  config=config, settings=wandb.Settings(console="off", quiet=True))
        except Exception as e:  # noqa: BLE001 - W&B's errors (no login, no network) name no key of ours
            raise UserError(f"W&B could not start run {run_id} (mode {mode}): {e}; log in (`wandb login` or "
                            f"WANDB_API_KEY) or set logging.wandb_mode=offline") from None
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        where = self.run.url if mode == "online" else f"{out_dir / 'wandb'} (upload with `wandb sync`)"
        log.info(f"W&B run {run_id} of project {cfg.wandb_project}: {where}")

    def add(self, scalars: dict[str, float], step: int) -> None:
        self.run.log({**scalars, "step": step})

    def close(self) -> None:
        self.run.finish()


def scalar_sinks(cfg: EngineConfig, out_dir: Path, start_step: int, stage: str, run_id: str) -> list:
    """The sinks `cfg.logging` asks for, on the main rank: TensorBoard always, W&B optionally."""
    sinks: list = [TensorBoardSink(out_dir, start_step)]
    if cfg.logging.wandb:
        sinks.append(WandbSink(cfg.logging, out_dir, run_id, stage, to_dict(cfg)))
    return sinks


class MetricsLog:
    def __init__(self, out_dir: str | Path, enabled: bool, start_step: int, total_steps: int, stage: str,
                 sinks: Callable[[], list]):
        """`sinks`: a callable returning the scalar sinks (`scalar_sinks`; called on the main rank only)."""
        self.enabled, self.stage = enabled, stage
        self.path = Path(out_dir) / METRICS_FILE
        self.start_step, self.total_steps = start_step, total_steps
        self.started = time.perf_counter()
        if not enabled:
            return
        rows = read_metrics(out_dir)
        cut = [r for r in rows if r["step"] > start_step]
        if cut:
            with open(Path(out_dir) / SUPERSEDED_FILE, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in cut))
                f.flush()
                os.fsync(f.fileno())
            note = f"{len(cut)} metrics rows after step {start_step} moved to {SUPERSEDED_FILE}"
            if start_step:
                log.info(f"note: {note}")
            else:
                log.warning(note)
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= start_step))
        self.sinks = sinks()
        self.progress = Progress(total_steps, start_step, "step", "step")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {f"{self.stage}/{key}": value for key, value in record.items()
                   if key != "step" and isinstance(value, (int, float))}
        for sink in self.sinks:
            sink.add(scalars, record["step"])
        if "loss" not in record:  # a validation record
            values = " ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step")
            self.progress.write(f"step {record['step']}/{self.total_steps} {values}")
            return
        done = record["step"] - self.start_step
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(done, 1) * (self.total_steps - record["step"])
        summary = (f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['images_per_s']:.0f} img/s "
                   f"mfu {record['mfu']:.1%} data-wait {record['data_wait']:.0%} eta {eta / 60:.1f} min")
        self.progress.show(record["step"], summary)

    def note(self, text: str) -> None:
        if self.enabled:
            self.progress.write(text)

    def close(self) -> None:
        if self.enabled:
            self.progress.close()
            for sink in self.sinks:
                sink.close()


def format_validation(record: dict) -> str:
    """'top-1 0.4310 on 2000 images' (a classifier) or 'recon_mse 0.0071, perplexity 61.2, ...'."""
    samples = f"on {record['val_samples']:.0f} images"
    if "val_top1" in record:
        return f"top-1 {record['val_top1']:.4f} {samples}"
    values = [f"{k[4:]} {v:.4g}" for k, v in record.items() if k.startswith("val_") and k != "val_samples"]
    return f"{', '.join(values)} {samples}"
