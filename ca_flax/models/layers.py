"""The layers both families are built from: convolutions holding their parameters, BatchNorm
with PyTorch's semantics, activations, and `sequential`, which runs a torch-style layer list.

A block lists its layers in the released checkpoint's order as a list attribute in `setup`
(`self.conv = [Conv1x1(...), BatchNorm(), relu6, ...]`); Flax names them by position
(`conv_0`, `conv_1`, `conv_3`, ... with the activations taking an index but no parameters),
so the parameter path `features_2/conv_3/kernel` reads as the key `features.2.conv.3.weight`.
How a convolution is computed is `ca_flax.ops`' business, never a layer's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from ca_flax import ops
from ca_flax.models.initializers import conv_init

Layer = nn.Module | Callable[[jax.Array], jax.Array]


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Nearest multiple of `divisor`, at least `min_value`, never below 90% of `value`."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def relu6(x: jax.Array) -> jax.Array:
    return jnp.clip(x, 0.0, 6.0)


def hard_swish(x: jax.Array) -> jax.Array:
    """h_swish(v) = v * relu6(v + 3) / 6, the activation inside the CA block."""
    return x * relu6(x + 3.0) / 6.0


def sequential(layers: Sequence[Layer], x: jax.Array, train: bool) -> jax.Array:
    """`x` through `layers` in order, like torch's `nn.Sequential`: modules get `(x, train)`,
    parameter-free functions (activations) get `x`."""
    for layer in layers:
        x = layer(x, train) if isinstance(layer, nn.Module) else layer(x)
    return x


class BatchNorm(nn.Module):
    """BatchNorm over all but the channel axis, with torch.nn.BatchNorm2d's exact semantics.

    eps 1e-5, momentum 0.1, and running variance updated with the *unbiased* batch variance,
    so BatchNorm updates match PyTorch. Statistics are computed in at least float32.
    Under `jax.jit` on a mesh the batch axis is global, so statistics span the global batch.
    """

    epsilon: float = 1e-5
    momentum: float = 0.1
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if not train:
            inv_std = jax.lax.rsqrt(ra_var.value + self.epsilon)
            return ops.normalize(x, scale, bias, ra_mean.value, inv_std, self.dtype)
        y, mean, var = ops.batch_norm_train(x, scale, bias, self.epsilon, self.dtype)
        if not self.is_initializing():
            count = math.prod(x.shape[:-1])
            unbiased = var * (count / max(count - 1, 1))
            ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
            ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
        return y


class DepthwiseConv3x3(nn.Module):
    """Depthwise 3x3 conv (groups = channels, padding 1, no bias), PyTorch-compatible."""

    stride: int = 1
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kernel = self.param("kernel", conv_init, (3, 3, 1, x.shape[-1]), jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        return ops.depthwise_conv3x3(x, kernel, self.stride, train)


class Conv1x1(nn.Module):
    """Pointwise convolution. The kernel keeps the convolution layout (1, 1, in, out), so
    parameter trees and checkpoints are the same as for `nn.Conv(features, (1, 1))`."""

    features: int
    use_bias: bool = False
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kernel = self.param("kernel", conv_init, (1, 1, x.shape[-1], self.features), jnp.float32)
        y = ops.conv1x1(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class Conv3x3(nn.Module):
    """Dense 3x3 conv (padding 1, no bias), PyTorch-compatible: the stem of both families.
    Its kernel is (3, 3, in, out) as in `nn.Conv`, so parameter trees and checkpoints match."""

    features: int
    stride: int = 1
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kernel = self.param("kernel", conv_init, (3, 3, x.shape[-1], self.features), jnp.float32)
        return ops.conv3x3(x.astype(self.dtype), kernel.astype(self.dtype), self.stride)


class Dropout(nn.Dropout):
    """`nn.Dropout` taking `(x, train)` like the other layers (active in training only)."""

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:  # type: ignore[override]
        return super().__call__(x, deterministic=not train)


class Linear(nn.Dense):
    """`nn.Dense` taking `(x, train)` like the other layers."""

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:  # type: ignore[override]
        return super().__call__(x)
