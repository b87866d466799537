"""The convolutions' two written forms: lax convolutions ('xla') and the shifted windows
('windows', the CPU's fastest), plus the shape and dtype rules they share. The modules in
`ca_flax.layers` pick one by `active_conv_formulation`."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from ca_flax import cpu_kernels

Dtype = Any
Array = jax.Array


def accum_dtype(dtype: Dtype) -> Dtype:
    """Dtype for statistics and sums: float32 for bf16/fp32 compute, float64 under x64."""
    return jnp.promote_types(dtype, jnp.float32)


def strided(size: int, stride: int) -> int:
    """Output length of a kernel-3, padding-1 (or 1x1) convolution along one axis."""
    return (size - 1) // stride + 1


def xla_conv(x: Array, kernel: Array, stride: int = 1, depthwise: bool = False) -> Array:
    """The lax convolution of a (k, k, in/groups, out) HWIO kernel, padding k // 2, NHWC."""
    pad = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1] if depthwise else 1,
    )


def shifted_windows(x: Array, stride: int) -> list[Array]:
    """The nine (i, j) windows of x padded by 1 that a 3x3 kernel at `stride` multiplies,
    each shaped like the output (N, H_out, W_out, C), in row-major tap order."""
    n, h, w, c = x.shape
    h_out, w_out = strided(h, stride), strided(w, stride)
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return [
        jax.lax.slice(
            padded,
            (0, i, j, 0),
            (n, i + stride * (h_out - 1) + 1, j + stride * (w_out - 1) + 1, c),
            (1, stride, stride, 1),
        )
        for i in range(3)
        for j in range(3)
    ]


def depthwise_conv3x3(x: Array, kernel: Array, stride: int) -> Array:
    """Depthwise 3x3 convolution, padding 1, as a sum of nine shifted multiplies.

    XLA's grouped convolution is 5-35x slower than this on CPU for these shapes; nine strided
    slices of the padded input fuse into a single elementwise loop forward and backward.
    (On GPU cuDNN's depthwise kernels win: see CONV_FORMULATIONS.) `kernel` is (3, 3, 1, C).
    """
    acc = accum_dtype(x.dtype)
    taps = kernel.reshape(9, x.shape[-1]).astype(acc)
    out = None
    for tap, window in zip(taps, shifted_windows(x, stride), strict=True):
        term = window.astype(acc) * tap
        out = term if out is None else out + term
    return out.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv3x3_train(x: Array, kernel: Array, stride: int) -> Array:
    """`depthwise_conv3x3` whose gradients come from ca_flax's CPU kernels, float32 only: the
    kernel gradient in one pass (`cpu_kernels.depthwise3x3_kernel_grad`) instead of autodiff's
    nine reductions over shifted copies of `x` (16x the layer's forward time), and at stride 2
    the input gradient (`cpu_kernels.depthwise3x3_input_grad_stride2`); at stride 1 that is
    autodiff's, one fused loop. Reverse mode only (a `jax.custom_vjp`): training uses it."""
    return depthwise_conv3x3(x, kernel, stride)


def _depthwise_train_fwd(x, kernel, stride):  # noqa: ANN001, ANN202
    return depthwise_conv3x3(x, kernel, stride), (x, kernel)


def _depthwise_train_bwd(stride, residuals, g):  # noqa: ANN001, ANN202
    x, kernel = residuals
    if stride == 2:
        dx = cpu_kernels.depthwise3x3_input_grad_stride2(g, kernel, x.shape)
    else:
        _, input_vjp = jax.vjp(lambda x: depthwise_conv3x3(x, kernel, stride), x)
        dx = input_vjp(g)[0]
    return dx, cpu_kernels.depthwise3x3_kernel_grad(x, g, stride)


depthwise_conv3x3_train.defvjp(_depthwise_train_fwd, _depthwise_train_bwd)


def conv3x3_im2col(x: Array, kernel: Array, stride: int) -> Array:
    """Dense 3x3 convolution, padding 1, as one matmul over the nine windows' channels.

    For the 3-channel stem this is 1.8x XLA's CPU convolution on a cache-sized chunk of
    images (0.57 vs 1.03 ms per 224x224 image); `kernel` is (3, 3, C_in, C_out) (HWIO).
    """
    patches = jnp.concatenate(shifted_windows(x, stride), axis=-1)
    return jnp.dot(patches, kernel.reshape(-1, kernel.shape[-1]))
