"""Random variables for tiny test models, drawn with numpy: no slow jitted `model.init`."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(model: Any, seed: int = 0) -> dict[str, Any]:
    """He-scaled params and non-trivial BatchNorm statistics, so outputs are O(1) and varied."""
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    rng = np.random.default_rng(seed)

    def draw(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            fan_in = math.prod(shape[:-1])
            return rng.normal(0, math.sqrt(2 / fan_in), shape).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        return rng.normal(0, 0.1, shape).astype(np.float32)

    return {k: jax.tree_util.tree_map_with_path(draw, shapes[k]) for k in ("params", "batch_stats")}
