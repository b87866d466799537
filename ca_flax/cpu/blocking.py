"""Cache-blocked inference: run the network a few images at a time where activations are big.

On CPU these networks are memory-bound: an expanded 112x112x96 activation of a batch of 16 is
77 MB, written and read from DRAM at every layer. Running a run of consecutive stages over a
small chunk of the batch (a `lax.scan` over chunks) keeps those activations in cache; runs
that need smaller chunks nest inside runs that take bigger ones. It is the same computation
per image, so only speed changes. Inference only: BatchNorm statistics in training must span
the whole batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ca_flax import ops
from ca_flax.cpu import kernels
from ca_flax.cpu.fusion import Stage
from ca_flax.cpu.image_slice import ImageSlice

# Chunk working sets up to this size: the budget that ran best in a sweep over budgets
# (docs/cpu_backend.md, docs/performance.md).
CPU_BLOCK_MB = 3.0


def chunk_size(batch: int, bytes_per_image: int, budget_mb: float) -> int:
    """Largest divisor of `batch` whose working set fits in `budget_mb` (at least 1)."""
    fits = [
        d
        for d in range(1, batch + 1)
        if batch % d == 0 and d * bytes_per_image <= budget_mb * 2**20
    ]
    return max(fits, default=1)


def image_shape_after(stages: Sequence[Stage], x: Any) -> tuple[int, ...]:
    """The per-image shape `stages` turn `x`'s images into."""
    height, width = x.shape[1], x.shape[2]
    for stage in stages:
        height, width = ops.strided(height, stage.stride), ops.strided(width, stage.stride)
    return (height, width, stages[-1].out_channels)


def bytes_per_image(stages: Sequence[Stage], x: Any) -> list[int]:
    """Each stage's widest activation per image in bytes, walking `x`'s size through them."""
    height, width, channels = x.shape[1:]
    sizes = []
    for stage in stages:
        sizes.append(stage.widest(height, width, channels) * x.dtype.itemsize)
        height, width = ops.strided(height, stage.stride), ops.strided(width, stage.stride)
        channels = stage.out_channels
    return sizes


class Blocked:
    """Runs stages over a batch, blocked in cache; `use_kernels` lets loop outputs start
    uninitialized (ca_flax's kernel) rather than zeroed."""

    def __init__(self, stages: Sequence[Stage], budget_mb: float, use_kernels: bool) -> None:
        self.stages, self.budget_mb, self.use_kernels = tuple(stages), budget_mb, use_kernels

    def __call__(self, variables: Sequence[Any], x: jax.Array) -> jax.Array:
        """`x` through every stage (`variables[i]` the i-th stage's). The budget 0 turns
        blocking off; an empty batch has nothing to block."""
        if self.budget_mb <= 0 or x.shape[0] == 0:
            return self._chain(range(len(self.stages)), variables, x)
        sizes = bytes_per_image(self.stages, x)
        if self.stages[0].reads_image_slices:
            x = ImageSlice(x, jnp.int32(0), x.shape[0])
        return self._blocked(range(len(self.stages)), variables, sizes, x)

    def _chain(self, indices: Sequence[int], variables: Sequence[Any], x: Any) -> jax.Array:
        for i in indices:
            x = self.stages[i].fn(variables[i], x)
        return x

    def _blocked(
        self, indices: Sequence[int], variables: Sequence[Any], sizes: Sequence[int], x: Any
    ) -> jax.Array:
        """If no stage takes the whole batch, scan over the largest chunk any stage takes and
        block again within it. Otherwise the stages that take the whole batch run as they are
        and each run of the others is blocked within the batch. So each run's output is written
        out only for the chunk that encloses it, never for the whole batch."""
        n = x.shape[0]
        chunks = [chunk_size(n, sizes[i], self.budget_mb) for i in indices]
        if max(chunks) < n:
            out_shape = image_shape_after([self.stages[i] for i in indices], x)

            def inner(part: Any) -> jax.Array:
                return self._blocked(indices, variables, sizes, part)

            return self._chunked(inner, x, max(chunks), out_shape)
        whole_batch = dict(zip(indices, (c == n for c in chunks), strict=True))
        for whole, group in itertools.groupby(indices, whole_batch.__getitem__):
            run = list(group)
            x = self._chain(run, variables, x) if whole else self._blocked(run, variables, sizes, x)
        return x

    def _chunked(
        self, fn: Callable[[Any], jax.Array], x: Any, chunk: int, out_shape: tuple[int, ...]
    ) -> jax.Array:
        """`fn(x)` computed `chunk` images at a time, sequentially, each chunk written into the
        output as it is done. An `ImageSlice` is handed down as slices of itself. With the
        kernels the output starts uninitialized (every value is written before it is read):
        XLA's zeros cost a pass over it per call."""
        n = x.shape[0]
        indices = jnp.arange(n // chunk, dtype=jnp.int32)
        sliced = isinstance(x, ImageSlice)

        def body(out: jax.Array, xs: tuple[jax.Array, Any]) -> tuple[jax.Array, None]:
            index, images = xs
            y = fn(x.part(index, chunk) if sliced else images)
            return jax.lax.dynamic_update_slice_in_dim(out, y, index * chunk, 0), None

        chunks = indices if sliced else x.reshape(n // chunk, chunk, *x.shape[1:])
        if self.use_kernels:
            out = kernels.uninitialized((n, *out_shape), x.dtype, x.first if sliced else x)
        else:
            # Like `x` (so, in a shard_map, varying over the same mesh axes, as a carry must be).
            out = jnp.zeros_like(x.source if sliced else x, shape=(n, *out_shape))
        out, _ = jax.lax.scan(body, out, (indices, chunks))
        return out
