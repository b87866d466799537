"""BatchNorm's arithmetic: batch moments, the per-channel affine, and the train-mode forms."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from ca_flax.ops.conv import accum_dtype
from ca_flax.ops.formulation import active_formulation


def batch_moments(xs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and (biased) variance in two passes: the mean, then the spread around it."""
    axes = tuple(range(xs.ndim - 1))
    mean = jnp.mean(xs, axes)
    return mean, jnp.mean(jnp.square(xs - mean), axes)


def shifted_moments(xs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and variance from two sums that read `xs` together (one multi-output
    reduction kernel on GPU), taken around the first image's mean.

    Shifting keeps E[d^2] - E[d]^2 from cancelling when the mean is far from zero; around one
    sample instead, fp32 losses of random networks strayed further from float64 than with two
    passes (docs/exactness.md#batchnorm).
    """
    axes = tuple(range(xs.ndim - 1))
    shift = jnp.mean(xs[0], axes[:-1])
    centered = xs - shift
    offset, square = jnp.mean(centered, axes), jnp.mean(jnp.square(centered), axes)
    return shift + offset, jnp.maximum(square - jnp.square(offset), 0.0)


def affine(
    scale: jax.Array, bias: jax.Array, mean: jax.Array, inv_std: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """BatchNorm's (x - mean) * inv_std * scale + bias as per-channel `x * mul + add`."""
    mul = scale * inv_std
    return mul, bias - mean * mul


def inference_affine(
    scale: jax.Array, bias: jax.Array, mean: jax.Array, var: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array]:
    """`affine` of inference-mode BatchNorm from its running statistics."""
    return affine(scale, bias, mean, jax.lax.rsqrt(var + epsilon))


def normalize(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    mean: jax.Array,
    inv_std: jax.Array,
    dtype: DTypeLike,
) -> jax.Array:
    """(x - mean) * inv_std * scale + bias as one multiply-add per element, cast to `dtype`.

    The multiply-add runs in float32 (at least) so that autodiff sums the scale and bias
    gradients in float32: summed in bf16 over a whole layer they came out far off
    (docs/exactness.md#bfloat16).
    """
    mul, add = affine(scale, bias, mean, inv_std)
    out_dtype = jnp.promote_types(x.dtype, dtype)
    return (x.astype(mul.dtype) * mul + add).astype(out_dtype)


def batch_norm_train(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: DTypeLike
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Train-mode BatchNorm of `x` over all but its channel axis: `(y, mean, var)`, the
    statistics in at least float32 and with no gradient of their own beyond `y`'s.

    'lax_conv' writes the gradient out (`fused_batch_norm`); 'shifted_windows' leaves it to
    autodiff, which XLA:CPU fuses into the depthwise loops (faster there).
    """
    xs = x.astype(accum_dtype(x.dtype))
    if active_formulation() == "lax_conv":
        y = fused_batch_norm(x, scale, bias, epsilon, dtype)
        # The same sums as inside fused_batch_norm: XLA computes them once.
        mean, var = jax.lax.stop_gradient(shifted_moments(xs))
        return y, mean, var
    mean, var = batch_moments(xs)
    return normalize(x, scale, bias, mean, jax.lax.rsqrt(var + epsilon), dtype), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fused_batch_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: DTypeLike
) -> jax.Array:
    """Train-mode BatchNorm whose gradient is written out: two sums and one elementwise pass.

    Autodiff of the statistics adds reductions (through the mean inside the variance, for one);
    here the backward is one multi-output reduction plus one fused kernel, so the GPU train
    step runs fewer reduction kernels (docs/performance.md).
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
