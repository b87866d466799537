"""Coordinate Attention gates of a model, read from what `CoordAttention` sows.

The maps come from the model's own forward pass (`mutable=['intermediates']`), so they are
exactly the gates that multiplied the features; nothing here recomputes attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import numpy as np

DEFAULT_COUNT = 4


class AttentionMapError(ValueError):
    """A model without Coordinate Attention, or a block name it does not have."""


@dataclass(frozen=True)
class BlockMaps:
    """The two CA gates of one block for one image: `a_h` (H, C) and `a_w` (W, C)."""

    path: str
    a_h: np.ndarray
    a_w: np.ndarray

    @property
    def block(self) -> str:
        """The network block holding the CA module, e.g. `features_2`."""
        return self.path.split("/")[0]

    def height(self) -> np.ndarray:
        """Channel-mean height gate as an (H, 1) map."""
        return self.a_h.mean(axis=-1)[:, None]

    def width(self) -> np.ndarray:
        """Channel-mean width gate as a (1, W) map."""
        return self.a_w.mean(axis=-1)[None, :]

    def product(self) -> np.ndarray:
        """Channel-mean of the full gate a_h * a_w as an (H, W) map: what scales each pixel."""
        return np.einsum("hc,wc->hw", self.a_h, self.a_w) / self.a_h.shape[-1]


def forward_with_gates(
    model: nn.Module, variables: dict[str, Any], images: jax.Array
) -> tuple[jax.Array, dict[str, Any]]:
    """Run the model in inference mode: its logits and its 'intermediates' collection."""
    variables = {k: v for k, v in variables.items() if k != "intermediates"}
    logits, state = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))(
        variables, images
    )
    return logits, state.get("intermediates", {})


def sown_gates(model: nn.Module, variables: dict[str, Any], images: jax.Array) -> dict[str, Any]:
    """Run the model in inference mode and return its 'intermediates' collection."""
    return forward_with_gates(model, variables, images)[1]


def _find_gates(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    found = {}
    if "a_h" in tree and "a_w" in tree:
        found["/".join(prefix)] = tree
    for key, value in tree.items():
        if isinstance(value, dict):
            found.update(_find_gates(value, prefix + (key,)))
    return found


def _block_order(path: str) -> tuple[int, str]:
    head = path.split("/")[0]
    index = head.rsplit("_", 1)[-1]
    return (int(index) if index.isdigit() else 1 << 30, path)


def _maps_of(model: nn.Module, intermediates: dict[str, Any], index: int) -> list[BlockMaps]:
    gates = _find_gates(intermediates)
    if not gates:
        raise AttentionMapError(
            f"model {type(model).__name__} (attention={getattr(model, 'attention', None)!r}) "
            "has no Coordinate Attention blocks; use a *_ca model"
        )
    maps = []
    for path in sorted(gates, key=_block_order):
        a_h, a_w = gates[path]["a_h"][-1], gates[path]["a_w"][-1]
        maps.append(BlockMaps(path, np.asarray(a_h[index, :, 0]), np.asarray(a_w[index, 0])))
    return maps


def ca_maps(
    model: nn.Module, variables: dict[str, Any], images: jax.Array, index: int = 0
) -> list[BlockMaps]:
    """Gates of every CA block for image `index` of an NHWC batch, in network order."""
    return _maps_of(model, sown_gates(model, variables, images), index)


def batch_ca_maps(
    model: nn.Module, variables: dict[str, Any], images: jax.Array
) -> tuple[np.ndarray, list[list[BlockMaps]]]:
    """One forward pass over an NHWC batch: the logits and, per image, `ca_maps`' list."""
    logits, intermediates = forward_with_gates(model, variables, images)
    maps = [_maps_of(model, intermediates, i) for i in range(len(images))]
    return np.asarray(logits), maps


def select_blocks(maps: Sequence[BlockMaps], blocks: Sequence[str] | None) -> list[BlockMaps]:
    """Pick blocks by name (`features_9`), index (`9`) or path; by default a few spread evenly
    over the blocks whose gates are larger than 1x1 (a 1x1 map is one number: small inputs,
    such as 32x32 digits, shrink the last blocks to that)."""
    if not blocks:
        shaped = [m for m in maps if m.a_h.shape[0] * m.a_w.shape[0] > 1] or list(maps)
        picks = np.linspace(0, len(shaped) - 1, min(DEFAULT_COUNT, len(shaped))).round()
        return [shaped[int(i)] for i in dict.fromkeys(picks)]
    by_name = {}
    for m in maps:
        by_name.update({m.path: m, m.block: m, m.block.rsplit("_", 1)[-1]: m})
    unknown = [b for b in blocks if b not in by_name]
    if unknown:
        valid = ", ".join(m.block for m in maps)
        raise AttentionMapError(f"no CA block {', '.join(unknown)}; blocks with CA: {valid}")
    return [by_name[b] for b in blocks]
