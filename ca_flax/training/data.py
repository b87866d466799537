"""What the trainer needs from a dataset: host-local batches for a given step, and eval batches.

Each process gets its own slice of every global batch. Training batches are a pure function of
(seed, step), so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Protocol

import jax
import numpy as np

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a global batch splits over processes: this process's rows are [start, start + local)."""

    global_batch: int
    global_eval_batch: int
    process_index: int
    process_count: int

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.process_count

    @property
    def local_eval_batch(self) -> int:
        return self.global_eval_batch // self.process_count

    @classmethod
    def current(cls, global_batch: int, global_eval_batch: int) -> Layout:
        """The layout of this JAX process."""
        return cls(global_batch, global_eval_batch, jax.process_index(), jax.process_count())


class Dataset(Protocol):
    """Interface of `digits.DigitsDataset` and `imagenet.ImageNetDataset`."""

    num_classes: int
    num_train_examples: int
    num_eval_examples: int
    steps_per_epoch: int

    def train_batches(self, start_step: int) -> Iterator[Batch]:
        """Local batches {'image', 'label'} for steps start_step, start_step + 1, ..."""
        ...

    def eval_batches(self) -> Iterator[Batch]:
        """Local eval batches {'image', 'label', 'mask'}; same count on every process."""
        ...


def num_eval_steps(num_examples: int, layout: Layout) -> int:
    """Eval batches per process so every example is seen once when shards differ by one."""
    per_process = math.ceil(num_examples / layout.process_count)
    return max(1, math.ceil(per_process / layout.local_eval_batch))


def pad_eval_batches(batches: Iterator[Batch], num_steps: int, batch_size: int) -> Iterator[Batch]:
    """Pad (mask 0) the last partial batch and add empty batches up to `num_steps`."""
    template = None
    count = 0
    for batch in batches:
        n = len(batch["label"])
        mask = np.zeros(batch_size, np.float32)
        mask[:n] = 1.0
        padded = {k: _pad_rows(v, batch_size) for k, v in batch.items()}
        padded["mask"] = mask
        template = template or padded
        count += 1
        yield padded
    if template is None:
        raise ValueError("evaluation split is empty on this process")
    for _ in range(num_steps - count):
        yield {k: np.zeros_like(v) for k, v in template.items()}


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    if len(x) == size:
        return x
    pad = [(0, size - len(x))] + [(0, 0)] * (x.ndim - 1)
    return np.pad(x, pad)
