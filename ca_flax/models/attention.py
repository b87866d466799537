"""Attention blocks compared in the paper: Coordinate Attention, Squeeze-and-Excitation, CBAM.

Each is a linen module taking `(x, train)` on NHWC input and returning a tensor of the same
shape, so it drops into any network. Parameter names follow the released CA checkpoint.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from ca_flax.models.initializers import conv_init
from ca_flax.models.layers import BatchNorm, Conv1x1, hard_swish

ATTENTIONS = ("ca", "se", "cbam")


def coordinate_pool(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Means over each row, (N, H, 1, C), and each column, (N, 1, W, C): CA's pooling."""
    return jnp.mean(x, axis=2, keepdims=True), jnp.mean(x, axis=1, keepdims=True)


class CoordAttention(nn.Module):
    """Coordinate Attention (Hou et al., CVPR 2021): attention factorised along H and W.

    Coordinate information embedding: pool along each spatial direction. Coordinate attention
    generation (`gates`): both strips through a shared 1x1 conv + BN + h_swish, split, one
    1x1 conv + sigmoid each. Then `x * a_h * a_w`. The gates are sown into 'intermediates' as
    `a_h` (N, H, 1, C) and `a_w` (N, 1, W, C).
    """

    reduction: int = 32
    min_mip: int = 8
    dtype: DTypeLike = jnp.float32

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x_h, x_w = coordinate_pool(x)
        a_h, a_w = self.gates(x_h, x_w, train)
        return x * a_h * a_w

    @nn.compact
    def gates(
        self, x_h: jax.Array, x_w: jax.Array, train: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """`(a_h, a_w)` from the pooled strips `x_h` (N, H, 1, C) and `x_w` (N, 1, W, C)."""
        h, c = x_h.shape[1], x_h.shape[-1]
        mip = max(self.min_mip, c // self.reduction)
        y = jnp.concatenate([x_h, x_w.transpose(0, 2, 1, 3)], axis=1)  # (N, H + W, 1, C)
        y = Conv1x1(mip, use_bias=True, dtype=self.dtype, name="conv1")(y)
        y = hard_swish(BatchNorm(dtype=self.dtype, name="bn1")(y, train))
        y_h, y_w = y[:, :h], y[:, h:].transpose(0, 2, 1, 3)
        a_h = jax.nn.sigmoid(Conv1x1(c, use_bias=True, dtype=self.dtype, name="conv2")(y_h))
        a_w = jax.nn.sigmoid(Conv1x1(c, use_bias=True, dtype=self.dtype, name="conv3")(y_w))
        self.sow("intermediates", "a_h", a_h)
        self.sow("intermediates", "a_w", a_w)
        return a_h, a_w


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation (Hu et al.): global pool, 1x1 reduce + ReLU, 1x1 expand, sigmoid."""

    squeeze: int
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.relu(Conv1x1(self.squeeze, use_bias=True, dtype=self.dtype, name="fc1")(s))
        s = jax.nn.sigmoid(Conv1x1(x.shape[-1], use_bias=True, dtype=self.dtype, name="fc2")(s))
        return x * s


class CBAM(nn.Module):
    """CBAM (Woo et al.): channel gate from avg+max pooled shared MLP, then a 7x7 spatial gate."""

    squeeze: int
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        fc1 = Conv1x1(self.squeeze, use_bias=True, dtype=self.dtype, name="fc1")
        fc2 = Conv1x1(x.shape[-1], use_bias=True, dtype=self.dtype, name="fc2")

        def mlp(v: jax.Array) -> jax.Array:
            return fc2(nn.relu(fc1(v)))

        avg = jnp.mean(x, axis=(1, 2), keepdims=True)
        peak = jnp.max(x, axis=(1, 2), keepdims=True)
        x = x * jax.nn.sigmoid(mlp(avg) + mlp(peak))
        pooled = jnp.concatenate(
            [jnp.max(x, axis=-1, keepdims=True), jnp.mean(x, axis=-1, keepdims=True)], axis=-1
        )
        s = nn.Conv(
            1,
            (7, 7),
            padding=((3, 3), (3, 3)),
            use_bias=False,
            dtype=self.dtype,
            kernel_init=conv_init,
            name="spatial_conv",
        )(pooled)
        s = BatchNorm(dtype=self.dtype, name="spatial_bn")(s, train)
        return x * jax.nn.sigmoid(s)


def attention_block(kind: str | None, bottleneck: int, dtype: DTypeLike) -> list[nn.Module]:
    """The attention layer for `kind` ('ca', 'se', 'cbam'), as a list of one; [] for None.

    SE and CBAM squeeze to a quarter of the block's narrowest width (`bottleneck`): the input
    of a MobileNetV2 block, the reduced middle of a sandglass block. That reproduces the
    paper's parameter counts (3,888,208 for MobileNetV2 + SE).
    """
    if kind is None:
        return []
    if kind == "ca":
        return [CoordAttention(dtype=dtype)]
    squeeze = max(1, bottleneck // 4)
    if kind == "se":
        return [SqueezeExcite(squeeze, dtype=dtype)]
    if kind == "cbam":
        return [CBAM(squeeze, dtype=dtype)]
    raise ValueError(f"unknown attention {kind!r}; choose one of {ATTENTIONS} or None")
