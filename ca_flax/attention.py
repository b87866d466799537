"""Attention blocks compared in the paper: Coordinate Attention, Squeeze-and-Excitation, CBAM.

Each is a linen module taking `(x, train)` on NHWC input and returning a tensor of the same
shape, so it drops into any network. Parameter names follow the released CA checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ca_flax import cpu_kernels
from ca_flax.initializers import conv_init
from ca_flax.layers import (
    Array,
    BatchNorm,
    Dtype,
    active_conv_formulation,
    conv1x1,
    cpu_kernel_inference,
    hard_swish,
)
from ca_flax.sequential import Pooled

ATTENTIONS = ("ca", "se", "cbam")


def apply_gates(x: Array, gates: tuple[Array, ...], train: bool) -> Array:
    """`x` times each of `gates` (broadcasting): the last step of every attention block.

    For CPU inference (CPU backend, 'windows' convolutions) the product is its own XLA
    computation (a `lax.cond` with the same function in both branches; on a GPU its predicate
    would cost a sync), so it reads `x` as already written.
    Otherwise XLA:CPU fuses a second run of the nine-tap depthwise that made `x` into the
    multiply: 102 against 42 us in a 56x56x144 CA block; inference +10% (mobilenetv2_ca, _se),
    +5% (mobilenext_ca), +22% (mobilenetv2_cbam). Training keeps the plain product (no gain).
    (`optimization_barrier` does not do this: XLA:CPU drops barriers before fusion.)
    """

    def product(x: Array, *gates: Array) -> Array:
        for g in gates:
            x = x * g
        return x

    cpu_inference = active_conv_formulation() == "windows" and jax.default_backend() == "cpu"
    if train or not cpu_inference or x.size == 0:
        return product(x, *gates)
    first = gates[0].reshape(-1)[0]
    return jax.lax.cond(first == first, product, product, x, *gates)  # NaN takes the same path


class CoordAttention(nn.Module):
    """Coordinate Attention (Hou et al., CVPR 2021): attention factorised along H and W.

    Pools along each spatial direction, mixes both strips through a shared 1x1 conv + BN +
    h_swish, then gates the input by sigmoid(height) * sigmoid(width); the pooled strips come
    with the input where the depthwise kernel before it summed them (`Pooled`, in float32 CPU
    inference: +7.6% mobilenetv2_ca). The two gates are sown into the 'intermediates'
    collection as `a_h` (N, H, 1, C) and `a_w` (N, 1, W, C). In
    float32 CPU inference the gating is ca_flax's kernel (`cpu_kernels.coordinate_gate`),
    which writes over the input in cache where XLA:CPU's loop writes a second tensor (the
    same numbers, bitwise).
    """

    reduction: int = 32
    min_mip: int = 8
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array | Pooled, train: bool = False) -> Array:
        """`x` gated; given `Pooled`, its means come with it (the depthwise kernel's)."""
        if isinstance(x, Pooled):
            x, x_h, x_w = x
        else:
            x_h = jnp.mean(x, axis=2, keepdims=True)  # (N, H, 1, C)
            x_w = jnp.mean(x, axis=1, keepdims=True)  # (N, 1, W, C)
        _, h, w, c = x.shape
        mip = max(self.min_mip, c // self.reduction)
        y = jnp.concatenate([x_h, x_w.transpose(0, 2, 1, 3)], axis=1)  # (N, H + W, 1, C)
        y = conv1x1(mip, "conv1", self.dtype, use_bias=True)(y)
        y = hard_swish(BatchNorm(dtype=self.dtype, name="bn1")(y, train))
        y_h, y_w = y[:, :h], y[:, h:].transpose(0, 2, 1, 3)
        a_h = jax.nn.sigmoid(conv1x1(c, "conv2", self.dtype, use_bias=True)(y_h))
        a_w = jax.nn.sigmoid(conv1x1(c, "conv3", self.dtype, use_bias=True)(y_w))
        self.sow("intermediates", "a_h", a_h)
        self.sow("intermediates", "a_w", a_w)
        if cpu_kernel_inference(x, train, self.dtype):
            return cpu_kernels.coordinate_gate(x, a_h, a_w)  # in place: +5% mobilenetv2_ca
        return apply_gates(x, (a_h, a_w), train)


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation (Hu et al.): global pool, 1x1 reduce + ReLU, 1x1 expand, sigmoid."""

    squeeze: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.relu(conv1x1(self.squeeze, "fc1", self.dtype, use_bias=True)(s))
        s = jax.nn.sigmoid(conv1x1(x.shape[-1], "fc2", self.dtype, use_bias=True)(s))
        return apply_gates(x, (s,), train)


class CBAM(nn.Module):
    """CBAM (Woo et al.): channel gate from avg+max pooled shared MLP, then a 7x7 spatial gate."""

    squeeze: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        fc1 = conv1x1(self.squeeze, "fc1", self.dtype, use_bias=True)
        fc2 = conv1x1(x.shape[-1], "fc2", self.dtype, use_bias=True)

        def mlp(v: Array) -> Array:
            return fc2(nn.relu(fc1(v)))

        avg = jnp.mean(x, axis=(1, 2), keepdims=True)
        peak = jnp.max(x, axis=(1, 2), keepdims=True)
        x = apply_gates(x, (jax.nn.sigmoid(mlp(avg) + mlp(peak)),), train)
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
        return apply_gates(x, (jax.nn.sigmoid(s),), train)


def attention_factory(
    kind: str | None, bottleneck: int, dtype: Dtype
) -> Callable[[str], nn.Module] | None:
    """Module constructor (by name) for attention `kind`, or None for no attention.

    SE and CBAM squeeze to a quarter of the block's narrowest width (`bottleneck`): the input
    of a MobileNetV2 block, the reduced middle of a sandglass block. That reproduces the
    paper's parameter counts (3,888,208 for MobileNetV2 + SE).
    """
    if kind is None:
        return None
    if kind == "ca":
        return lambda name: CoordAttention(dtype=dtype, name=name)
    squeeze = max(1, bottleneck // 4)
    if kind == "se":
        return lambda name: SqueezeExcite(squeeze, dtype=dtype, name=name)
    if kind == "cbam":
        return lambda name: CBAM(squeeze, dtype=dtype, name=name)
    raise ValueError(f"unknown attention {kind!r}; choose one of {ATTENTIONS} or None")
