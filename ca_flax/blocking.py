"""Cache-blocked inference: run the network a few images at a time where activations are big.

On CPU these networks are memory-bound: an expanded 112x112x96 activation of a batch of 16 is
77 MB, written and read from DRAM at every layer. Running a run of consecutive layers over a
small chunk of the batch (a `lax.scan` over chunks) keeps those activations in cache; runs
that need smaller chunks nest inside runs that take bigger ones. The result is exactly the same
computation per image, so only speed changes. Training is never blocked: BatchNorm statistics
must span the whole batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ca_flax import cpu_kernels
from ca_flax.convolutions import strided
from ca_flax.image_slice import ImageSlice
from ca_flax.layers import Array, cpu_kernel_inference

# Chunk working sets up to this size ran best on the 2-core CPU measured (2 MB L2 per core).
CPU_BLOCK_MB = 3.0


class Chain(nn.Module):
    """Calls `layers` in order. Owns no variables, so parameter paths stay the layers' own."""

    layers: tuple[nn.Module, ...]

    def __call__(self, x: Array | ImageSlice, train: bool) -> Array:
        for layer in self.layers:
            x = layer(x, train)
        return x


def block_budget_mb(configured: float | None = None, cpu_mb: float = CPU_BLOCK_MB) -> float:
    """The chunk working-set budget in effect: `configured`, or when None the default backend's
    (`cpu_mb` on CPU, where blocking pays off; else 0). 0 means unblocked."""
    if configured is not None:
        return configured
    return cpu_mb if jax.default_backend() == "cpu" else 0.0


def chunk_size(batch: int, bytes_per_image: int, budget_mb: float) -> int:
    """Largest divisor of `batch` whose working set fits in `budget_mb` (at least 1)."""
    fits = [
        d
        for d in range(1, batch + 1)
        if batch % d == 0 and d * bytes_per_image <= budget_mb * 2**20
    ]
    return max(fits, default=1)


def run_chunked(
    module: nn.Module, x: Array | ImageSlice, chunk: int, out_shape: tuple[int, ...]
) -> Array:
    """`module(x, train=False)` computed `chunk` images at a time, sequentially, each chunk
    written into the output (`out_shape` per image) as it is done. An `ImageSlice` is handed
    down as slices of itself. Where ca_flax's CPU kernels run the output starts uninitialized
    (every value is written before it is read): XLA's zeros cost a pass over it per call."""
    n = x.shape[0]
    indices = jnp.arange(n // chunk, dtype=jnp.int32)
    sliced = isinstance(x, ImageSlice)

    def body(module: nn.Module, out: Array, xs: tuple[Array, Array]) -> tuple[Array, None]:
        index, images = xs
        y = module(x.part(index, chunk) if sliced else images, False)
        return jax.lax.dynamic_update_slice_in_dim(out, y, index * chunk, 0), None

    scan = nn.scan(
        body,
        variable_broadcast=["params", "batch_stats"],
        split_rngs={"params": False, "dropout": False},
    )
    chunks = indices if sliced else x.reshape(n // chunk, chunk, *x.shape[1:])
    if cpu_kernel_inference(x, False, x.dtype):  # the kernels' own backend, dtype, form
        out = cpu_kernels.uninitialized((n, *out_shape), x.dtype, x.first if sliced else x)
    else:
        # Like `x` (so, in a shard_map, varying over the same mesh axes, as a carry must be).
        out = jnp.zeros_like(x.source if sliced else x, shape=(n, *out_shape))
    out, _ = scan(module, out, (indices, chunks))
    return out


def image_shape_after(layers: Sequence[nn.Module], x: Array | ImageSlice) -> tuple[int, ...]:
    """The per-image shape `layers` turn `x`'s images into, from their strides and the last
    one's `out_channels`."""
    height, width = x.shape[1], x.shape[2]
    for layer in layers:
        height, width = strided(height, layer.stride), strided(width, layer.stride)
    return (height, width, layers[-1].out_channels)


def bytes_per_image(layers: Sequence[nn.Module], x: Array | ImageSlice) -> list[int]:
    """Each layer's widest activation per image in bytes, walking the input size through
    the layers' strides (`layer.stride`, `layer.widest_activation(height, width)`)."""
    height, width = x.shape[1], x.shape[2]
    sizes = []
    for layer in layers:
        sizes.append(layer.widest_activation(height, width) * x.dtype.itemsize)
        height, width = strided(height, layer.stride), strided(width, layer.stride)
    return sizes


class Blocked(nn.Module):
    """`run_blocked` as a module, so that it can be scanned. Owns no variables."""

    layers: tuple[nn.Module, ...]
    image_bytes: tuple[int, ...]
    budget_mb: float

    @nn.compact
    def __call__(self, x: Array | ImageSlice, train: bool) -> Array:
        return run_blocked(self.layers, self.image_bytes, x, self.budget_mb)


def run_blocked(
    layers: Sequence[nn.Module],
    image_bytes: Sequence[int],
    x: Array | ImageSlice,
    budget_mb: float,
) -> Array:
    """Inference through `layers` (working sets per image `image_bytes`), blocked in cache.

    If no layer takes the whole batch, scan over the largest chunk any layer takes and block
    again within it. Otherwise the layers that take the whole batch run as they are and each
    run of the others is blocked within the batch. So each run's output is written out only
    for the chunk that encloses it, never for the whole batch (on MobileNeXt that halves
    the temporary memory and gains 6-13% over running each run over the whole batch).
    """
    n = x.shape[0]
    chunks = [chunk_size(n, size, budget_mb) for size in image_bytes]
    if max(chunks) < n:
        blocked = Blocked(tuple(layers), tuple(image_bytes), budget_mb)
        return run_chunked(blocked, x, max(chunks), image_shape_after(layers, x))
    for whole, group in itertools.groupby(range(len(layers)), lambda i: chunks[i] == n):
        indices = list(group)
        run = slice(indices[0], indices[-1] + 1)
        if whole:
            x = Chain(tuple(layers[run]))(x, False)
        else:
            x = run_blocked(layers[run], image_bytes[run], x, budget_mb)
    return x


def run_layers(layers: Sequence[nn.Module], x: Array, train: bool, budget_mb: float) -> Array:
    """Apply `layers` in order; at inference cache-blocked (`run_blocked`) with working sets
    from `bytes_per_image`, the input handed down as an `ImageSlice` where the first layer
    `reads_image_slices()` (only the first layer ever sees one). `budget_mb` 0 turns blocking
    off; an empty batch has nothing to block, and a symbolic batch (`jax.export` shape
    polymorphism) no chunk size to divide."""
    if train or budget_mb <= 0 or not isinstance(x.shape[0], int) or x.shape[0] == 0:
        return Chain(tuple(layers))(x, train)
    sizes = bytes_per_image(layers, x)
    if layers[0].reads_image_slices():
        x = ImageSlice(x, jnp.int32(0), x.shape[0])
    return run_blocked(layers, sizes, x, budget_mb)
