"""Cache-blocked inference: run the network a few images at a time where activations are big.

On CPU these networks are memory-bound: an expanded 112x112x96 activation of a batch of 16 is
77 MB, written and read from DRAM at every layer. Running a run of consecutive layers over a
small chunk of the batch (a `lax.scan` over chunks) keeps those activations in cache. The
result is exactly the same computation per image, so only speed changes. Training is never
blocked: BatchNorm statistics must span the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from ca_flax.layers import Array, strided

# Chunk working sets up to this size ran best on the 2-core CPU measured (2 MB L2 per core).
CPU_BLOCK_MB = 3.0


class Chain(nn.Module):
    """Calls `layers` in order. Owns no variables, so parameter paths stay the layers' own."""

    layers: tuple[nn.Module, ...]

    def __call__(self, x: Array, train: bool) -> Array:
        for layer in self.layers:
            x = layer(x, train)
        return x


def block_budget_mb(configured: float | None = None) -> float:
    """The chunk working-set budget in effect: `configured`, or when None the default backend's
    (blocking pays off on CPU only). 0 means unblocked."""
    if configured is not None:
        return configured
    return CPU_BLOCK_MB if jax.default_backend() == "cpu" else 0.0


def chunk_size(batch: int, bytes_per_image: int, budget_mb: float) -> int:
    """Largest divisor of `batch` whose working set fits in `budget_mb` (at least 1)."""
    fits = [
        d
        for d in range(1, batch + 1)
        if batch % d == 0 and d * bytes_per_image <= budget_mb * 2**20
    ]
    return max(fits, default=1)


def run_chunked(chain: Chain, x: Array, chunk: int) -> Array:
    """`chain(x, train=False)` computed `chunk` images at a time, sequentially."""
    n = x.shape[0]
    if chunk >= n:
        return chain(x, False)

    def body(module: Chain, carry: None, xs: Array) -> tuple[None, Array]:
        return carry, module(xs, False)

    scan = nn.scan(
        body,
        variable_broadcast=["params", "batch_stats"],
        split_rngs={"params": False, "dropout": False},
    )
    _, y = scan(chain, None, x.reshape(n // chunk, chunk, *x.shape[1:]))
    return y.reshape(n, *y.shape[2:])


def bytes_per_image(layers: Sequence[nn.Module], x: Array) -> list[int]:
    """Each layer's widest activation per image in bytes, walking the input size through
    the layers' strides (`layer.stride`, `layer.widest_activation(height, width)`)."""
    height, width = x.shape[1], x.shape[2]
    sizes = []
    for layer in layers:
        sizes.append(layer.widest_activation(height, width) * x.dtype.itemsize)
        height, width = strided(height, layer.stride), strided(width, layer.stride)
    return sizes


def run_layers(layers: Sequence[nn.Module], x: Array, train: bool, budget_mb: float) -> Array:
    """Apply `layers` in order; at inference, consecutive layers whose working sets (see
    `bytes_per_image`) give the same chunk size run together, chunk by chunk.
    `budget_mb` 0 turns blocking off."""
    if train or budget_mb <= 0:
        return Chain(tuple(layers))(x, train)
    chunks = [chunk_size(x.shape[0], b, budget_mb) for b in bytes_per_image(layers, x)]
    start = 0
    for stop in range(1, len(layers) + 1):
        if stop == len(layers) or chunks[stop] != chunks[start]:
            x = run_chunked(Chain(tuple(layers[start:stop])), x, chunks[start])
            start = stop
    return x
