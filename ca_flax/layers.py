"""Building blocks shared by both model families: convolutions, BatchNorm, activations.

Module names follow the PyTorch `nn.Sequential` indices of the released checkpoints, so a
parameter path such as ``features_2/conv_3/kernel`` reads as the key ``features.2.conv.3.weight``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ca_flax import cpu_kernels
from ca_flax.convolutions import (
    accum_dtype,
    conv3x3_im2col,
    depthwise_conv3x3,
    depthwise_conv3x3_train,
    xla_conv,
)
from ca_flax.image_slice import ImageSlice, as_array
from ca_flax.initializers import conv_init

Dtype = Any
Array = jax.Array


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Nearest multiple of `divisor`, at least `min_value`, never below 90% of `value`."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def relu6(x: Array) -> Array:
    return jnp.clip(x, 0.0, 6.0)


def hard_swish(x: Array) -> Array:
    """h_swish(v) = v * relu6(v + 3) / 6, the activation inside the CA block."""
    return x * relu6(x + 3.0) / 6.0


# How the 3x3 and 1x1 convolutions are written. 'windows': nine shifted multiplies (depthwise),
# nine windows as one matmul (stem), a matmul over channels (1x1): the fastest form on CPU.
# 'xla': lax convolutions (cuDNN on GPU, TFLite's native ops on export). Same parameters.
# On an H200 the bf16 train step ran 1.28x (mobilenetv2_ca) / 1.43x (mobilenext) faster as
# 'xla': the windows' depthwise kernel gradient is nine reductions per layer there.
# The formulation also picks train-mode BatchNorm's gradient (see `BatchNorm`).
# TPU (unmeasured) takes 'xla', its native convolutions.
CONV_FORMULATIONS = ("windows", "xla")
BACKEND_CONV_FORMULATION = {"cpu": "windows", "gpu": "xla", "tpu": "xla"}
_conv_formulation: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "ca_flax_conv_formulation", default=None
)


@contextlib.contextmanager
def conv_formulation(name: str) -> Iterator[None]:
    """Trace the convolutions of any ca_flax model as `name` ('windows' or 'xla') in this block.

    It applies when a function is traced, so jit a fresh function inside the block.
    Outside any block, each backend uses its fastest form (`active_conv_formulation`).
    """
    if name not in CONV_FORMULATIONS:
        raise ValueError(f"unknown conv formulation {name!r}; choose one of {CONV_FORMULATIONS}")
    token = _conv_formulation.set(name)
    try:
        yield
    finally:
        _conv_formulation.reset(token)


def active_conv_formulation() -> str:
    """The formulation set by `conv_formulation`, else the default backend's fastest."""
    chosen = _conv_formulation.get()
    if chosen is not None:
        return chosen
    return BACKEND_CONV_FORMULATION.get(jax.default_backend(), "windows")


def batch_moments(xs: Array) -> tuple[Array, Array]:
    """Per-channel mean and (biased) variance in two passes: the mean, then the spread around it."""
    axes = tuple(range(xs.ndim - 1))
    mean = jnp.mean(xs, axes)
    return mean, jnp.mean(jnp.square(xs - mean), axes)


def shifted_moments(xs: Array) -> tuple[Array, Array]:
    """Per-channel mean and variance from two sums that read `xs` together (one multi-output
    reduction kernel on GPU), taken around the first image's mean.

    Shifting keeps E[d^2] - E[d]^2 from cancelling when the mean is far from zero; around one
    sample instead, fp32 losses of random networks strayed 1e-5 from float64, 3x two passes.
    """
    axes = tuple(range(xs.ndim - 1))
    shift = jnp.mean(xs[0], axes[:-1])
    centered = xs - shift
    offset, square = jnp.mean(centered, axes), jnp.mean(jnp.square(centered), axes)
    return shift + offset, jnp.maximum(square - jnp.square(offset), 0.0)


def affine(scale: Array, bias: Array, mean: Array, inv_std: Array) -> tuple[Array, Array]:
    """BatchNorm's (x - mean) * inv_std * scale + bias as per-channel `x * mul + add`."""
    mul = scale * inv_std
    return mul, bias - mean * mul


def normalize(
    x: Array, scale: Array, bias: Array, mean: Array, inv_std: Array, dtype: Dtype
) -> Array:
    """(x - mean) * inv_std * scale + bias as one multiply-add per element, cast to `dtype`.

    The multiply-add runs in float32 (at least) so that autodiff sums the scale and bias
    gradients in float32: in bf16 they came out 49% / 20% off at a (32, 56, 56, 144) layer.
    """
    mul, add = affine(scale, bias, mean, inv_std)
    out_dtype = jnp.promote_types(x.dtype, dtype)
    return (x.astype(mul.dtype) * mul + add).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fused_batch_norm(x: Array, scale: Array, bias: Array, epsilon: float, dtype: Dtype) -> Array:
    """Train-mode BatchNorm whose gradient is written out: two sums and one elementwise pass.

    Autodiff of the statistics adds reductions (through the mean inside the variance, for one);
    here the backward is one multi-output reduction plus one fused kernel. On an H200 this took
    the MobileNetV2+CA bf16 train step from 634 to 436 reduction kernels and from 8,835 to 9,485
    images/s (measured with `shifted_moments` around one sample rather than the image mean).
    """
    return _fused_batch_norm_fwd(x, scale, bias, epsilon, dtype)[0]


def _fused_batch_norm_fwd(x, scale, bias, epsilon, dtype):  # noqa: ANN001, ANN202
    mean, var = shifted_moments(x.astype(accum_dtype(x.dtype)))
    inv_std = jax.lax.rsqrt(var + epsilon)
    return normalize(x, scale, bias, mean, inv_std, dtype), (x, scale, mean, inv_std)


def _fused_batch_norm_bwd(epsilon, dtype, residuals, dy):  # noqa: ANN001, ANN202
    x, scale, mean, inv_std = residuals
    axes = tuple(range(x.ndim - 1))
    count = math.prod(x.shape[:-1])
    dy, centered = dy.astype(mean.dtype), x.astype(mean.dtype) - mean
    sum_dy, sum_dy_centered = jnp.sum(dy, axes), jnp.sum(dy * centered, axes)
    gain = scale * inv_std
    # dx = gain * (dy - mean(dy) - x_hat * mean(dy * x_hat)), with x_hat = centered * inv_std.
    centered_gain = gain * sum_dy_centered * jnp.square(inv_std) / count
    dx = gain * dy - centered * centered_gain - gain * sum_dy / count
    return dx.astype(x.dtype), sum_dy_centered * inv_std, sum_dy


fused_batch_norm.defvjp(_fused_batch_norm_fwd, _fused_batch_norm_bwd)


class BatchNorm(nn.Module):
    """BatchNorm over all but the channel axis, with torch.nn.BatchNorm2d's exact semantics.

    eps 1e-5, momentum 0.1, and running variance updated with the *unbiased* batch variance,
    so BatchNorm updates match PyTorch. Statistics are computed in at least float32.
    Under `jax.jit` on a mesh the batch axis is global, so statistics span the global batch.
    Train mode follows the formulation: 'xla' uses `fused_batch_norm`; 'windows' leaves the
    gradient to autodiff, which XLA's CPU backend fuses into the depthwise loops (faster there).
    In inference, `as_affine=True` returns the per-channel `(mul, add)` it would apply instead,
    for a kernel that applies them itself (`Sequential.depthwise_bn`, `conv3x3_bn_relu6`).
    """

    epsilon: float = 1e-5
    momentum: float = 0.1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool, as_affine: bool = False) -> Any:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if not train:
            inv_std = jax.lax.rsqrt(ra_var.value + self.epsilon)
            if as_affine:
                return affine(scale, bias, ra_mean.value, inv_std)
            return normalize(x, scale, bias, ra_mean.value, inv_std, self.dtype)
        xs = x.astype(accum_dtype(x.dtype))
        if active_conv_formulation() == "xla":
            y = fused_batch_norm(x, scale, bias, self.epsilon, self.dtype)
            # The same sums as inside fused_batch_norm: XLA computes them once.
            mean, var = jax.lax.stop_gradient(shifted_moments(xs))
        else:
            mean, var = batch_moments(xs)
            y = normalize(x, scale, bias, mean, jax.lax.rsqrt(var + self.epsilon), self.dtype)
        if not self.is_initializing():
            count = math.prod(x.shape[:-1])
            unbiased = var * (count / max(count - 1, 1))
            ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
            ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
        return y


def cpu_kernel_inference(x: Array, train: bool, dtype: Dtype) -> bool:
    """Whether a layer on `x` runs as ca_flax's own CPU kernel: float32 inference on the CPU
    backend with 'windows' convolutions, where the kernels are built and wanted
    (`cpu_kernels.enabled`).

    Not for symbolic shapes: `jax.export` refuses custom calls, so a shape-polymorphic export
    keeps XLA's loops (export with concrete shapes under `cpu_kernels.use_kernels(False)`, or
    under the 'xla' formulation as `ca_flax.export` does).
    """
    return not train and cpu_kernels_run(x, dtype)


def cpu_kernels_run(x: Array, dtype: Dtype) -> bool:
    """Whether ca_flax's CPU kernels run on `x` (in inference or training): float32 on the CPU
    backend with 'windows' convolutions and concrete shapes, the kernels built and wanted."""
    if jnp.dtype(dtype) != jnp.float32 or active_conv_formulation() != "windows":
        return False
    if not all(isinstance(d, int) for d in x.shape):
        return False
    return jax.default_backend() == "cpu" and cpu_kernels.enabled()


class DepthwiseConv3x3(nn.Module):
    """Depthwise 3x3 conv (groups = channels, padding 1, no bias), PyTorch-compatible; nine
    shifted multiplies or cuDNN's grouped conv, by `active_conv_formulation`.

    Given `fused` (the keywords of `cpu_kernels.depthwise3x3_affine`: the BatchNorms, ReLU6s
    and residual around it) it runs as that one CPU kernel instead; see `Sequential.depthwise_bn`.
    """

    stride: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Array,
        fused: dict[str, Any] | None = None,
        channels: int | None = None,
        train: bool = False,
    ) -> Array | tuple[Array, Array, Array]:
        """The conv of `x`; `channels` (default: `x`'s) when `fused` expands `x` first; with the
        row and column sums when `fused` asks for `sums`. In `train`ing on the CPU its gradients
        come from ca_flax's kernels (`depthwise_conv3x3_train`)."""
        kernel = self.param("kernel", conv_init, (3, 3, 1, channels or x.shape[-1]), jnp.float32)
        if fused is not None:
            return cpu_kernels.depthwise3x3_affine(x, kernel, stride=self.stride, **fused)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if active_conv_formulation() == "xla":
            return xla_conv(x, kernel, self.stride, depthwise=True)
        if train and cpu_kernels_run(x, self.dtype):
            return depthwise_conv3x3_train(x, kernel, self.stride)
        return depthwise_conv3x3(x, kernel, self.stride)


class Conv1x1(nn.Module):
    """Pointwise convolution: a matmul over channels (XLA's CPU dot is ~2x its 1x1 conv), or a
    lax convolution under the 'xla' formulation.

    The kernel keeps the convolution layout (1, 1, in, out), so parameter trees, checkpoints
    and converted weights are the same as for `nn.Conv(features, (1, 1))`.
    """

    features: int
    use_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, as_matrix: bool = False) -> Array:
        """`x` through the conv; or, `as_matrix`, the (in, out) weight matrix alone (for a
        kernel that applies it itself; `x` is then read for its channel count only)."""
        kernel = self.param("kernel", conv_init, (1, 1, x.shape[-1], self.features), jnp.float32)
        if as_matrix:
            return kernel[0, 0]
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if active_conv_formulation() == "xla":
            y = xla_conv(x, kernel)
        else:
            # A matmul over the pixels as rows: its kernel gradient then contracts one axis.
            # Contracting (N, H, W), XLA:CPU wrote the incoming gradient out transposed (114 ms
            # of 1.2 s in a mobilenetv2_ca train step, batch 16, for one layer).
            y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel[0, 0])
            y = y.reshape(*x.shape[:-1], self.features)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


def conv1x1(features: int, name: str, dtype: Dtype, use_bias: bool = False) -> Conv1x1:
    """Pointwise convolution (a matmul over channels)."""
    return Conv1x1(features, use_bias, dtype, name=name)


class Conv3x3(nn.Module):
    """Dense 3x3 conv (padding 1, no bias), PyTorch-compatible; the stem of both families.
    im2col and one matmul, or a lax convolution under the 'xla' formulation.

    Its kernel is (3, 3, in, out) as in `nn.Conv`, so parameter trees and checkpoints match.
    Given `fused` (the keywords of `cpu_kernels.conv3x3_affine`: its BatchNorm and ReLU6) it
    runs as that one CPU kernel instead; see `Sequential.conv3x3_bn_relu6`.
    """

    features: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array | ImageSlice, fused: dict[str, Any] | None = None) -> Array:
        """The conv of `x`; the kernel reads an `ImageSlice` in place, the others copy it out."""
        kernel = self.param("kernel", conv_init, (3, 3, x.shape[-1], self.features), jnp.float32)
        if fused is not None and isinstance(x, ImageSlice):
            return cpu_kernels.conv3x3_affine(
                x.source, kernel, stride=self.stride, first=x.first, count=x.count, **fused
            )
        if fused is not None:
            return cpu_kernels.conv3x3_affine(x, kernel, stride=self.stride, **fused)
        x, kernel = as_array(x).astype(self.dtype), kernel.astype(self.dtype)
        if active_conv_formulation() == "xla":
            return xla_conv(x, kernel, self.stride)
        return conv3x3_im2col(x, kernel, self.stride)
