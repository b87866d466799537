"""scikit-learn's handwritten digits (ships with the package, no download) as a small image task.

8x8 grey digits (0..16) are upscaled bilinearly to `image_size`, copied to RGB and normalised
like ImageNet. 360 images, a fixed seeded draw, are held out for validation. Training batches
are a pure function of (seed, step): one seeded permutation per epoch, seeded shifts per step.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

from ca_flax.models.inputs import normalize
from ca_flax.training.config_check import ConfigError
from ca_flax.training.data import Batch, Layout, num_eval_steps, pad_eval_batches

NUM_VALIDATION = 360
MAX_SHIFT = 2


def _load(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as (N, S, S, 3) normalised float32 images and int32 labels."""
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    big = jax.image.resize(jnp.asarray(images), (len(images), image_size, image_size), "bilinear")
    rgb = np.repeat(np.asarray(big)[..., None], 3, axis=-1)
    return normalize(np.clip(rgb, 0.0, 1.0).astype(np.float32)), digits.target.astype(np.int32)


class DigitsDataset:
    """In-memory digits; every process slices its rows out of the same global batches."""

    num_classes = 10

    def __init__(self, image_size: int, layout: Layout, seed: int, max_train_examples: int = -1):
        images, labels = _load(image_size)
        order = np.random.default_rng(1234).permutation(len(labels))
        val, train = order[:NUM_VALIDATION], order[NUM_VALIDATION:]
        if max_train_examples > 0:
            train = train[:max_train_examples]
        self.train_images, self.train_labels = images[train], labels[train]
        self.eval_images, self.eval_labels = images[val], labels[val]
        self.layout, self.seed = layout, seed
        self.num_train_examples, self.num_eval_examples = len(train), len(val)
        self.steps_per_epoch = self.num_train_examples // layout.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"config.batch_size={layout.global_batch} exceeds the "
                f"{self.num_train_examples} digits training images"
            )

    def global_indices(self, step: int) -> np.ndarray:
        """Example indices of the global batch at `step`: a function of (seed, step) only."""
        epoch, within = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_train_examples)
        size = self.layout.global_batch
        return perm[within * size : (within + 1) * size]

    def _local_rows(self, size: int) -> slice:
        local = size // self.layout.process_count
        return slice(self.layout.process_index * local, (self.layout.process_index + 1) * local)

    def train_batches(self, start_step: int) -> Iterator[Batch]:
        """This process's rows of the global batch at each step, randomly shifted by <= 2 px."""
        rows = self._local_rows(self.layout.global_batch)
        step = start_step
        while True:
            idx = self.global_indices(step)[rows]
            shifts = np.random.default_rng([self.seed, step, 1]).integers(
                -MAX_SHIFT, MAX_SHIFT + 1, size=(self.layout.global_batch, 2)
            )[rows]
            images = np.stack(
                [
                    _shift(self.train_images[i], dy, dx)
                    for i, (dy, dx) in zip(idx, shifts, strict=True)
                ]
            )
            yield {"image": images, "label": self.train_labels[idx], "index": idx}
            step += 1

    def eval_batches(self) -> Iterator[Batch]:
        """This process's rows of each global eval batch; padding rows are masked out."""
        size = self.layout.global_eval_batch
        rows = self._local_rows(size)
        steps = -(-self.num_eval_examples // size)

        def batches() -> Iterator[Batch]:
            for start in range(0, steps * size, size):
                sel = np.arange(start, start + size)[rows]
                sel = sel[sel < self.num_eval_examples]
                if len(sel):
                    yield {"image": self.eval_images[sel], "label": self.eval_labels[sel]}

        total = max(steps, num_eval_steps(self.num_eval_examples, self.layout))
        return pad_eval_batches(batches(), total, self.layout.local_eval_batch)


def _shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate by (dy, dx) pixels, filling with the normalised background (edge values)."""
    m = MAX_SHIFT
    padded = np.pad(image, ((m, m), (m, m), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    return padded[m + dy : m + dy + h, m + dx : m + dx + w]
