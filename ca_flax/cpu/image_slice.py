"""A chunk of a batch of images, named rather than copied out (see `ImageSlice`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class ImageSlice:
    """Images `[first, first + count)` of `source`, not copied out: how the blocked loops hand
    the network's input to a first layer that reads it in place (`reads_image_slices`, the stem's
    CPU kernel), where XLA would copy each loop level's chunk of 3-channel images out of the
    batch first (docs/cpu_backend.md)."""

    source: jax.Array
    first: jax.Array  # int32 scalar
    count: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.count, *self.source.shape[1:])

    @property
    def dtype(self) -> Any:
        return self.source.dtype

    def part(self, index: jax.Array, chunk: int) -> ImageSlice:
        """Chunk `index` of `chunk` images within this slice."""
        return ImageSlice(self.source, self.first + index * chunk, chunk)

    def take(self) -> jax.Array:
        """The images as an array of their own (a copy)."""
        return jax.lax.dynamic_slice_in_dim(self.source, self.first, self.count)


def as_array(x: jax.Array | ImageSlice) -> jax.Array:
    """`x`, its images copied out if it is an `ImageSlice`."""
    return x.take() if isinstance(x, ImageSlice) else x
