"""The convolutions in their two written forms (`formulation`), and the shape and dtype rules
they share. The layers in `ca_flax.models.layers` call these with their parameters.

A backend may trace training-mode depthwise convolutions through a function of its own
(`training_depthwise`): same forward, other gradients (the CPU backend's gradient kernels).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from ca_flax.ops.formulation import active_formulation

DepthwiseFn = Callable[[jax.Array, jax.Array, int], jax.Array]
_training_depthwise: contextvars.ContextVar[DepthwiseFn | None] = contextvars.ContextVar(
    "ca_flax_training_depthwise", default=None
)


def accum_dtype(dtype: DTypeLike) -> DTypeLike:
    """Dtype for statistics and sums: float32 for bf16/fp32 compute, float64 under x64."""
    return jnp.promote_types(dtype, jnp.float32)


def strided(size: int, stride: int) -> int:
    """Output length of a kernel-3, padding-1 (or 1x1) convolution along one axis."""
    return (size - 1) // stride + 1


@contextlib.contextmanager
def training_depthwise(fn: DepthwiseFn) -> Iterator[None]:
    """Trace train-mode 'shifted_windows' depthwise 3x3 convolutions as `fn(x, kernel, stride)`
    in this block: `fn` must compute `windows_depthwise3x3` (only its gradients may differ)."""
    token = _training_depthwise.set(fn)
    try:
        yield
    finally:
        _training_depthwise.reset(token)


def lax_conv(
    x: jax.Array, kernel: jax.Array, stride: int = 1, depthwise: bool = False
) -> jax.Array:
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


def shifted_windows(x: jax.Array, stride: int) -> list[jax.Array]:
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


def windows_depthwise3x3(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Depthwise 3x3 convolution, padding 1, as a sum of nine shifted multiplies.

    XLA's grouped convolution is slower than this on CPU for these shapes (docs/cpu_backend.md);
    nine strided slices of the padded input fuse into a single elementwise loop forward and
    backward.
    `kernel` is (3, 3, 1, C).
    """
    acc = accum_dtype(x.dtype)
    taps = kernel.reshape(9, x.shape[-1]).astype(acc)
    out = None
    for tap, window in zip(taps, shifted_windows(x, stride), strict=True):
        term = window.astype(acc) * tap
        out = term if out is None else out + term
    return out.astype(x.dtype)


def im2col_conv3x3(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Dense 3x3 convolution, padding 1, as one matmul over the nine windows' channels (faster
    than XLA's CPU convolution for the 3-channel stem: docs/cpu_backend.md); `kernel` is
    (3, 3, C_in, C_out) (HWIO)."""
    patches = jnp.concatenate(shifted_windows(x, stride), axis=-1)
    return jnp.dot(patches, kernel.reshape(-1, kernel.shape[-1]))


def depthwise_conv3x3(
    x: jax.Array, kernel: jax.Array, stride: int, train: bool = False
) -> jax.Array:
    """Depthwise 3x3 convolution (groups = channels, padding 1) of NHWC `x`, (3, 3, 1, C)."""
    if active_formulation() == "lax_conv":
        return lax_conv(x, kernel, stride, depthwise=True)
    custom = _training_depthwise.get()
    if train and custom is not None:
        return custom(x, kernel, stride)
    return windows_depthwise3x3(x, kernel, stride)


def conv1x1(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Pointwise convolution of NHWC `x` with a (1, 1, C_in, C_out) kernel."""
    if active_formulation() == "lax_conv":
        return lax_conv(x, kernel)
    # A matmul over the pixels as rows: its kernel gradient then contracts one axis.
    # Contracting (N, H, W), XLA:CPU wrote the incoming gradient out transposed first.
    y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel[0, 0])
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


def conv3x3(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Dense 3x3 convolution, padding 1, of NHWC `x` with a (3, 3, C_in, C_out) kernel."""
    if active_formulation() == "lax_conv":
        return lax_conv(x, kernel, stride)
    return im2col_conv3x3(x, kernel, stride)
