"""Console progress and TensorBoard scalars; only process 0 writes either."""

from __future__ import annotations

import logging as logging_std
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from clu import metric_writers

QUIET_LIBRARIES = ("/orbax/", "/clu/", "/tensorflow_datasets/", "/etils/")


class _LibraryInfoFilter(logging_std.Filter):
    """Drop INFO chatter (e.g. orbax's per-save throughput lines) from libraries."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        quiet = any(lib in record.pathname for lib in QUIET_LIBRARIES)
        return record.levelno >= logging_std.WARNING or not quiet


def quiet_library_logs() -> None:
    """Keep the console to this trainer's progress lines, warnings and errors."""
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())


def create_writer(workdir: str | Path) -> metric_writers.MetricWriter:
    """TensorBoard event files (and log lines) in `workdir` on process 0; silent elsewhere."""
    if jax.process_index() > 0:
        return metric_writers.MultiWriter([])
    return metric_writers.create_default_writer(str(workdir), asynchronous=True)


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


class Progress:
    """Averages step metrics between reports and prints throughput and ETA."""

    def __init__(self, total_steps: int, steps_per_epoch: int, global_batch: int, start: int):
        self.total, self.spe, self.batch = total_steps, steps_per_epoch, global_batch
        self.pending: list[dict[str, Any]] = []
        self.last_step, self.last_time = start, time.perf_counter()
        self.start_time, self.start_step = self.last_time, start
        self.devices = jax.device_count()

    def add(self, metrics: dict[str, Any]) -> None:
        """Keep the step's device metrics without waiting for them."""
        self.pending.append(metrics)

    def images_per_second(self) -> float:
        elapsed = time.perf_counter() - self.start_time
        return (self.last_step - self.start_step) * self.batch / max(elapsed, 1e-9)

    def report(self, step: int, writer: metric_writers.MetricWriter) -> dict[str, float]:
        """Average the pending metrics, log one line, write scalars; returns the averages."""
        fetched = jax.device_get(self.pending)
        self.pending = []
        means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        now = time.perf_counter()
        rate = (step - self.last_step) * self.batch / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        eta = (self.total - step) * self.batch / max(rate, 1e-9)
        if jax.process_index() == 0:
            logging.info(
                "step %d/%d epoch %.2f loss %.4f acc %.4f lr %.5f | %.1f img/s (%.1f/device) ETA %s",
                step, self.total, step / self.spe, means["loss"], means["accuracy"],
                means["lr"], rate, rate / self.devices, _eta(eta),
            )  # fmt: skip
        scalars = {f"train/{k}": v for k, v in means.items()}
        scalars["train/images_per_second"] = rate
        writer.write_scalars(step, scalars)
        return means
