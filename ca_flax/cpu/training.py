"""The CPU backend's training ops: depthwise gradients from ca_flax's kernels.

XLA:CPU computes a depthwise 3x3's kernel gradient as nine reductions, each over a shifted copy
of the input it writes first, and a stride-2 layer's input gradient from nine zero-interleaved
pads; the kernels do each in one pass (docs/cpu_backend.md). The trainer plugs them in through
`training_ops` (`ca_flax.ops.training_depthwise`); the forward is unchanged.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from ca_flax import ops
from ca_flax.cpu import kernels


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv3x3_train(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """`ops.windows_depthwise3x3` whose gradients come from ca_flax's CPU kernels, float32
    only: the kernel gradient in one pass (`kernels.depthwise3x3_kernel_grad`), and at stride 2
    the input gradient (`kernels.depthwise3x3_input_grad_stride2`); at stride 1 that is
    autodiff's, one fused loop. Reverse mode only (a `jax.custom_vjp`)."""
    return ops.windows_depthwise3x3(x, kernel, stride)


def _depthwise_train_fwd(x, kernel, stride):  # noqa: ANN001, ANN202
    return ops.windows_depthwise3x3(x, kernel, stride), (x, kernel)


def _depthwise_train_bwd(stride, residuals, g):  # noqa: ANN001, ANN202
    x, kernel = residuals
    if stride == 2:
        dx = kernels.depthwise3x3_input_grad_stride2(g, kernel, x.shape)
    else:
        _, input_vjp = jax.vjp(lambda x: ops.windows_depthwise3x3(x, kernel, stride), x)
        dx = input_vjp(g)[0]
    return dx, kernels.depthwise3x3_kernel_grad(x, g, stride)


depthwise_conv3x3_train.defvjp(_depthwise_train_fwd, _depthwise_train_bwd)


def _train_depthwise(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """`depthwise_conv3x3_train` where the kernels take the operands (float32, concrete
    shapes), else the plain windows form."""
    concrete = all(isinstance(d, int) for d in x.shape)
    if x.dtype == jnp.float32 and concrete:
        return depthwise_conv3x3_train(x, kernel, stride)
    return ops.windows_depthwise3x3(x, kernel, stride)


def kernels_apply_to_training(devices: int = 1) -> bool:
    """Whether a training step traced now, its batch split over `devices`, can use the gradient
    kernels: on the CPU backend, one device (XLA's SPMD partitioner cannot split a kernel call
    over a sharded batch: it would gather the batch on every device), the kernels built and
    wanted (`kernels.enabled`)."""
    return jax.default_backend() == "cpu" and devices == 1 and kernels.enabled()


@contextlib.contextmanager
def training_ops(devices: int = 1) -> Iterator[None]:
    """Trace a training step (its batch split over `devices`) inside this block to take the
    depthwise gradients from the CPU kernels where they apply (`kernels_apply_to_training`);
    elsewhere it changes nothing."""
    if not kernels_apply_to_training(devices):
        yield
        return
    with ops.training_depthwise(_train_depthwise):
        yield
