"""The classifier both families share: feature layers, global pooling, dropout, linear.

A family supplies `feature_layers` (its stem and blocks, named like the released checkpoint,
each able to say its widest activation per image); this class runs them, cache-blocked at
inference (`ca_flax.blocking`), then the `classifier_1` head.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from ca_flax.blocking import CPU_BLOCK_MB, block_budget_mb, run_layers
from ca_flax.convolutions import accum_dtype
from ca_flax.initializers import dense_init
from ca_flax.layers import Array, Dtype


class ClassifierNet(nn.Module):
    """Base of MobileNetV2 and MobileNeXt; `attention` is None, 'se', 'cbam' or 'ca'. NHWC.

    `inference_block_mb` is the cache-blocking budget: None picks the backend's default
    (on for CPU), 0 turns it off. It never changes results, only speed.
    """

    num_classes: int = 1000
    width_mult: float = 1.0
    attention: str | None = None
    dropout_rate: float = 0.1
    dtype: Dtype = jnp.float32
    inference_block_mb: float | None = None
    cpu_block_mb: ClassVar[float] = CPU_BLOCK_MB  # the family's CPU default budget

    def feature_layers(self) -> list[nn.Module]:
        """The layers before pooling, each with `stride` and `widest_activation(h, w)`."""
        raise NotImplementedError

    def block_budget(self) -> float:
        """Cache-blocking budget for this call; 0 when blocking must be off."""
        if self.is_initializing() or self.is_mutable_collection("intermediates"):
            return 0.0  # sown attention maps must keep their (N, ...) shape
        return block_budget_mb(self.inference_block_mb, self.cpu_block_mb)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = x.astype(self.dtype)
        x = run_layers(self.feature_layers(), x, train, self.block_budget())
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(
            self.num_classes, dtype=self.dtype, kernel_init=dense_init, name="classifier_1"
        )(x)
        return x.astype(accum_dtype(self.dtype))
