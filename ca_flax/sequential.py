"""`Sequential`: builds a block's layers in order under the released checkpoints' names, and
in float32 CPU inference hands runs of them to ca_flax's fused kernels (`cpu_kernels`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from ca_flax.image_slice import ImageSlice
from ca_flax.layers import (
    Array,
    BatchNorm,
    Conv1x1,
    Conv3x3,
    DepthwiseConv3x3,
    Dtype,
    conv1x1,
    cpu_kernel_inference,
    relu6,
)

# The 1x1 conv goes into the depthwise kernel (`Sequential.expand_depthwise_bn`) on images of at
# least 28x28, where its wide output leaves the 2 MB L2 of the Xeon measured: spread inference
# +12-14% (mobilenetv2_ca, mobilenext). On 14x14 and 7x7 XLA's matmul (YNNPACK) is as fast: fusing
# from 14x14 or at every size ran level with this, and slower before the kernel's 32-channel groups.
FUSED_EXPAND_MIN_PIXELS = 28 * 28


def may_fuse(module: nn.Module) -> bool:
    """False while `module` collects intermediates (`capture_intermediates`, sown maps): each
    layer's output must then come from its own module call, so nothing is fused."""
    return not module.is_mutable_collection("intermediates")


class Pooled(NamedTuple):
    """A layer's output with its means over each row, (N, H, 1, C), and each column,
    (N, 1, W, C): Coordinate Attention's pooling, summed by the depthwise kernel as it writes
    the output (`Sequential.depthwise_bn(..., pooled=True)`), where XLA:CPU's two reductions
    took 4.5 ms of a 25 ms device-step of mobilenetv2_ca's inference on the Xeon measured."""

    value: Array
    row_means: Array
    col_means: Array


class Sequential:
    """Names layers like a torch `nn.Sequential`: `prefix_0`, `prefix_1`, ... in call order.

    Activations take an index without holding parameters, exactly as in the released code,
    so the parameter paths line up with the checkpoint keys. Use inside a compact method.
    `fuse=False` keeps every layer a module call of its own, as `capture_intermediates` needs
    (see `depthwise_bn`).
    """

    def __init__(self, prefix: str, train: bool, dtype: Dtype, fuse: bool = True):
        self.prefix, self.train, self.dtype, self.index = prefix, train, dtype, 0
        self.fuse = fuse

    def _name(self) -> str:
        name = f"{self.prefix}_{self.index}" if self.prefix else str(self.index)
        self.index += 1
        return name

    def pointwise(self, x: Array, features: int) -> Array:
        return conv1x1(features, self._name(), self.dtype)(x)

    def depthwise(self, x: Array, stride: int = 1) -> Array:
        return DepthwiseConv3x3(stride, self.dtype, name=self._name())(x, train=self.train)

    def depthwise_bn(
        self,
        x: Array,
        stride: int = 1,
        relu6: bool = True,
        input_bn_relu6: bool = False,
        residual: Array | None = None,
        pooled: bool = False,
    ) -> Array | Pooled:
        """[BatchNorm -> ReLU6 ->] depthwise 3x3 -> BatchNorm [-> ReLU6] [+ residual].

        `input_bn_relu6` takes `x` straight from a 1x1 conv and applies its BatchNorm and ReLU6
        first. In float32 CPU inference one kernel does it all in a single pass
        (`cpu_kernel_inference`); the parameters and their names are the same either way. With
        `pooled` (ReLU6, no residual) that kernel also returns the output's row and column means,
        as `Pooled`, for Coordinate Attention; XLA's layers return the output alone.
        """
        if not self._runs_kernel(x):
            if input_bn_relu6:
                x = self.act(self.bn(x))
            y = self.bn(self.depthwise(x, stride))
            y = self.act(y) if relu6 else y
            return y if residual is None else residual + y
        channels = x.shape[-1]
        return self._fused_depthwise(
            x, channels, stride, relu6, input_bn_relu6, residual, pooled=pooled
        )

    def expand_depthwise_bn(
        self,
        x: Array,
        features: int,
        stride: int = 1,
        relu6: bool = True,
        residual: Array | None = None,
        pooled: bool = False,
    ) -> Array | Pooled:
        """1x1 conv to `features` -> BatchNorm -> ReLU6 -> depthwise 3x3 -> BatchNorm [-> ReLU6]
        [+ residual]: the wide half of an inverted-residual or sandglass block.

        In float32 CPU inference on images of at least `FUSED_EXPAND_MIN_PIXELS` one kernel does
        it all, the 1x1 conv included, so the `features`-wide tensor is never written
        (`cpu_kernels.depthwise3x3_affine`'s `expand`); smaller ones fuse from the BatchNorm on
        (`depthwise_bn`, as is `pooled`). The parameters and their names are the same either way.
        """
        if not self._fuses_expand(x):
            y = self.pointwise(x, features)
            return self.depthwise_bn(y, stride, relu6, True, residual, pooled)
        expand = Conv1x1(features, dtype=self.dtype, name=self._name())(x, as_matrix=True)
        return self._fused_depthwise(
            x, features, stride, relu6, True, residual, expand, pooled=pooled
        )

    def reduce_expand_depthwise_bn(
        self,
        x: Array,
        hidden: int,
        features: int,
        stride: int = 1,
        relu6: bool = True,
        residual: Array | None = None,
    ) -> Array:
        """1x1 conv to `hidden` -> BatchNorm (linear) -> `expand_depthwise_bn` to `features`:
        a sandglass block from its narrow bottleneck on.

        Where the second 1x1 conv goes into the depthwise kernel, the linear BatchNorm goes
        with it, through that conv's weights (scale) and the kernel's input BatchNorm (shift):
        no pass over the bottleneck of its own, +1-2% on MobileNeXt's spread inference. (Folding
        the scale into the first conv's weights instead costs a pass over the large weights of
        the 7x7 blocks each call.) The parameters and their names are the same either way.
        """
        y = self.pointwise(x, hidden)
        if not self._fuses_expand(x):
            return self.expand_depthwise_bn(self.bn(y), features, stride, relu6, residual)
        mul, shift = self.bn_affine(hidden)
        expand = Conv1x1(features, dtype=self.dtype, name=self._name())(y, as_matrix=True)
        scaled = mul[:, None] * expand
        return self._fused_depthwise(
            y, features, stride, relu6, True, residual, scaled, shift @ expand
        )

    def _fuses_expand(self, x: Array) -> bool:
        """Whether a 1x1 conv of `x` goes into the depthwise kernel after it."""
        small = math.prod(x.shape[1:-1]) < FUSED_EXPAND_MIN_PIXELS
        return not small and self._runs_kernel(x)

    def _runs_kernel(self, x: Array | ImageSlice) -> bool:
        """Whether the layers on `x` run as one of ca_flax's CPU kernels: float32 CPU inference
        (`cpu_kernel_inference`) with fusing allowed (`may_fuse`)."""
        return self.fuse and cpu_kernel_inference(x, self.train, self.dtype)

    def _fused_depthwise(
        self,
        x: Array,
        channels: int,
        stride: int,
        relu6: bool,
        input_bn_relu6: bool,
        residual: Array | None,
        expand: Array | None = None,
        input_offset: Array | None = None,
        pooled: bool = False,
    ) -> Array | Pooled:
        """`depthwise_bn` on `channels` channels as one kernel call on `x`, or on `x @ expand`
        given the 1x1 conv's `expand` matrix; `input_offset` is added to the kernel's input
        before its input BatchNorm (a shift the layers before it left unapplied)."""
        input_affine = None
        if input_bn_relu6:
            in_mul, in_add = self.bn_affine(channels)
            if input_offset is not None:
                in_add = in_add + input_offset * in_mul
            input_affine = (in_mul, in_add)
            self.index += 1  # its ReLU6
        conv = DepthwiseConv3x3(stride, self.dtype, name=self._name())
        mul, add = self.bn_affine(channels)
        if relu6:
            self.index += 1
        fused = {"mul": mul, "add": add, "relu6": relu6, "input_affine": input_affine,
                 "residual": residual, "expand": expand, "sums": pooled}  # fmt: skip
        if not pooled:
            return conv(x, fused, channels=channels)
        y, row_sums, col_sums = conv(x, fused, channels=channels)
        n, h, w, c = y.shape
        return Pooled(y, (row_sums / w).reshape(n, h, 1, c), (col_sums / h).reshape(n, 1, w, c))

    def bn_affine(self, channels: int) -> tuple[Array, Array]:
        """The next BatchNorm's inference `(mul, add)` for `channels`, left to a kernel."""
        channels_only = jnp.zeros((0, channels), jnp.float32)  # the only thing it reads
        return BatchNorm(dtype=self.dtype, name=self._name())(channels_only, False, as_affine=True)

    def conv3x3(self, x: Array, features: int, stride: int) -> Array:
        return Conv3x3(features, stride, self.dtype, name=self._name())(x)

    def conv3x3_bn_relu6(self, x: Array | ImageSlice, features: int, stride: int) -> Array:
        """Dense 3x3 conv -> BatchNorm -> ReLU6 (the stem). In float32 CPU inference one kernel
        does all three (`cpu_kernel_inference`), reading an `ImageSlice` in place; the
        parameters and names are the same."""
        if not self._runs_kernel(x):
            return self.act(self.bn(self.conv3x3(x, features, stride)))
        conv = Conv3x3(features, stride, self.dtype, name=self._name())
        mul, add = self.bn_affine(features)
        self.index += 1  # the ReLU6
        return conv(x, {"mul": mul, "add": add, "relu6": True})

    def bn(self, x: Array) -> Array:
        return BatchNorm(dtype=self.dtype, name=self._name())(x, self.train)

    def act(self, x: Array, fn: Callable[[Array], Array] = relu6) -> Array:
        self.index += 1
        return fn(x)

    def module(self, factory: Callable[[str], nn.Module], x: Array) -> Array:
        """A module taking `(x, train)`, such as an attention block, at the next index."""
        return factory(self._name())(x, self.train)
