"""The fusion plan: a block's layer list, read in order, turned into calls of ca_flax's kernels.

A block lists its layers as the released checkpoint does (`block.conv`, see
`ca_flax.models.layers`). Runs of them become one kernel pass each:

- 1x1 conv -> BN -> ReLU6 -> dw 3x3 -> BN [-> ReLU6]: one pass of the depthwise kernel, which
  applies the first BatchNorm and ReLU6 to its input, and on images of at least
  `FUSED_EXPAND_MIN_PIXELS` the 1x1 conv too, so the wide tensor is never written;
- 1x1 conv -> BN (linear) -> that run (MobileNeXt's bottleneck): the linear BatchNorm goes
  into the second 1x1 conv's weights (scale) and the kernel's input BatchNorm (shift);
- dw 3x3 -> BN [-> ReLU6]: one pass; a block's residual goes into its last such pass;
- a depthwise pass that feeds Coordinate Attention also sums its output over each row and
  column as it writes it (CA's pooling), and CA's gate multiplies in place (`coordinate_gate`);
- SE and CBAM run as their own computation (a `lax.cond`), so XLA:CPU reads the activation
  as written instead of re-running the depthwise loop that made it inside the product;
- the 3-channel stem (3x3 conv -> BN -> ReLU6) is one pass of the stem kernel, which reads a
  chunk of the batch in place (`ImageSlice`).

Everything else runs as the model's own layers. BatchNorm is folded from the variables passed
at each call, so the same plan serves any weights of the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ca_flax import ops
from ca_flax.cpu import kernels
from ca_flax.cpu.image_slice import ImageSlice, as_array
from ca_flax.models.attention import CBAM, CoordAttention, SqueezeExcite, coordinate_pool
from ca_flax.models.layers import BatchNorm, Conv1x1, DepthwiseConv3x3, relu6
from ca_flax.models.mobilenetv2 import ConvBNReLU

# The 1x1 conv goes into the depthwise kernel on images of at least 28x28, where its wide output
# leaves a 2 MB L2; on 14x14 and 7x7 XLA's matmul is as fast (docs/cpu_backend.md).
FUSED_EXPAND_MIN_PIXELS = 28 * 28

Variables = dict[str, Any]
StageFn = Callable[[Variables, Any], jax.Array]


@dataclass(frozen=True)
class Stage:
    """One block of the network's body, as the blocked loops see it: `fn(variables, x)`, its
    stride and output channels, the elements per image of the widest tensor it holds at a
    given input size, and whether it reads an `ImageSlice` in place."""

    name: str
    fn: StageFn
    stride: int
    out_channels: int
    widest: Callable[[int, int, int], int]  # (height, width, in channels) -> elements
    reads_image_slices: bool = False


def sub(variables: Variables, name: str) -> Variables:
    """The variables of child `name`: each collection's entry for it."""
    return {col: tree[name] for col, tree in variables.items() if name in tree}


def bn_affine(
    variables: Variables, name: str, epsilon: float = 1e-5
) -> tuple[jax.Array, jax.Array]:
    """Inference BatchNorm `name` of `variables` as per-channel `(mul, add)`."""
    p, s = variables["params"][name], variables["batch_stats"][name]
    return ops.inference_affine(p["scale"], p["bias"], s["mean"], s["var"], epsilon)


def matmul(x: jax.Array, weights: jax.Array) -> jax.Array:
    """A 1x1 conv of NHWC `x` by a (C_in, C_out) matrix, as a matmul over the pixels."""
    return jnp.dot(x.reshape(-1, x.shape[-1]), weights).reshape(*x.shape[:-1], weights.shape[-1])


def plain(layer: nn.Module, own: bool = False) -> Callable[[Variables, jax.Array], jax.Array]:
    """`layer` (a bound child) applied as itself, with its variables cut from its parent's,
    or given as they are (`own`)."""
    module, name = layer.unbind()[0], layer.name
    if own:
        return lambda v, x: module.apply(v, as_array(x), False)
    return lambda v, x: module.apply(sub(v, name), as_array(x), False)


def _is(layers: Sequence[Any], start: int, *kinds: Any) -> bool:
    """Whether `layers[start:]` begins with layers of `kinds` (a class, or the function relu6)."""
    if start + len(kinds) > len(layers):
        return False
    return all(
        layer is kind if not isinstance(kind, type) else isinstance(layer, kind)
        for layer, kind in zip(layers[start:], kinds, strict=False)
    )


def _pooled(y: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The kernel's `(y, row sums, column sums)` as `y` with CA's row and column means."""
    y, row_sums, col_sums = y
    n, h, w, c = y.shape
    return y, (row_sums / w).reshape(n, h, 1, c), (col_sums / h).reshape(n, 1, w, c)


class _Block:
    """A block's layer list compiled to kernel calls, run by `__call__(variables, x)`."""

    def __init__(self, block: nn.Module) -> None:
        self.layers, self.residual = list(block.conv), bool(block.residual)
        self.steps: list[Callable[..., Any]] = []
        self.residual_fused = False
        i = 0
        while i < len(self.layers):
            i = self._plan_from(i)

    def _relu6_at(self, i: int) -> bool:
        return _is(self.layers, i, relu6)

    def _feeds_ca(self, i: int) -> bool:
        return _is(self.layers, i, CoordAttention)

    def _depthwise_tail(self, dw_at: int) -> tuple[int, bool, bool, bool]:
        """(next index, ReLU6?, takes the residual?, sums for CA?) of the run dw -> BN [-> ReLU6]."""
        act = self._relu6_at(dw_at + 2)
        end = dw_at + 2 + act
        residual = self.residual and end == len(self.layers)
        self.residual_fused = self.residual_fused or residual
        sums = act and not residual and self._feeds_ca(end)
        return end, act, residual, sums

    def _plan_from(self, i: int) -> int:
        ls = self.layers
        if _is(ls, i, Conv1x1, BatchNorm, Conv1x1, BatchNorm, relu6, DepthwiseConv3x3, BatchNorm):
            return self._reduce_expand_depthwise(i)
        if _is(ls, i, Conv1x1, BatchNorm, relu6, DepthwiseConv3x3, BatchNorm):
            return self._expand_depthwise(i)
        if _is(ls, i, DepthwiseConv3x3, BatchNorm):
            return self._depthwise(i)
        if _is(ls, i, CoordAttention):
            return self._coordinate_attention(i)
        if _is(ls, i, SqueezeExcite) or _is(ls, i, CBAM):
            run = plain(ls[i])

            def isolated(v: Variables, x: jax.Array, inp: jax.Array) -> jax.Array:
                first = x.reshape(-1)[0]  # NaN takes the same path
                return jax.lax.cond(first == first, run, run, v, x)

            self.steps.append(isolated)
            return i + 1
        if ls[i] is relu6:
            self.steps.append(lambda v, x, inp: relu6(x))
            return i + 1
        run = plain(ls[i])
        self.steps.append(lambda v, x, inp: run(v, x))
        return i + 1

    def _kernel_call(
        self, dw: DepthwiseConv3x3, bn: BatchNorm, act: bool, residual: bool, sums: bool
    ) -> Callable[..., Any]:
        """The depthwise kernel for `dw -> bn [-> ReLU6]` with the given extras."""

        def call(v: Variables, x: jax.Array, inp: jax.Array, **extra: Any) -> Any:
            mul, add = bn_affine(v, bn.name, bn.epsilon)
            y = kernels.depthwise3x3_affine(
                x, v["params"][dw.name]["kernel"], mul, add, dw.stride, act,
                residual=inp if residual else None, sums=sums, **extra,
            )  # fmt: skip
            return _pooled(y) if sums else y

        return call

    def _depthwise(self, i: int) -> int:
        end, act, residual, sums = self._depthwise_tail(i)
        self.steps.append(
            self._kernel_call(self.layers[i], self.layers[i + 1], act, residual, sums)
        )
        return end

    def _expand_depthwise(self, i: int, reduce_bn: BatchNorm | None = None) -> int:
        """1x1 conv -> BN -> ReLU6 -> dw -> BN [-> ReLU6] from `i`; given `reduce_bn`, the linear
        BatchNorm before the 1x1 conv is folded in where the conv is."""
        conv, in_bn = self.layers[i], self.layers[i + 1]
        end, act, residual, sums = self._depthwise_tail(i + 3)
        kernel_call = self._kernel_call(self.layers[i + 3], self.layers[i + 4], act, residual, sums)

        def call(v: Variables, x: jax.Array, inp: jax.Array) -> Any:
            in_mul, in_add = bn_affine(v, in_bn.name, in_bn.epsilon)
            weights = v["params"][conv.name]["kernel"][0, 0]
            if math.prod(x.shape[1:-1]) < FUSED_EXPAND_MIN_PIXELS:
                if reduce_bn is not None:
                    mul, add = bn_affine(v, reduce_bn.name, reduce_bn.epsilon)
                    x = x * mul + add
                x = matmul(x, weights)
                return kernel_call(v, x, inp, input_affine=(in_mul, in_add))
            if reduce_bn is not None:  # (x * mul + shift) @ W = x @ (mul W) + shift @ W
                mul, shift = bn_affine(v, reduce_bn.name, reduce_bn.epsilon)
                in_add = in_add + (shift @ weights) * in_mul
                weights = mul[:, None] * weights
            return kernel_call(v, x, inp, input_affine=(in_mul, in_add), expand=weights)

        self.steps.append(call)
        return end

    def _reduce_expand_depthwise(self, i: int) -> int:
        reduce = self.layers[i]
        self.steps.append(lambda v, x, inp: matmul(x, v["params"][reduce.name]["kernel"][0, 0]))
        return self._expand_depthwise(i + 2, reduce_bn=self.layers[i + 1])

    def _coordinate_attention(self, i: int) -> int:
        ca = self.layers[i]
        module, name = ca.unbind()[0], ca.name

        def call(v: Variables, x: Any, inp: jax.Array) -> jax.Array:
            x, x_h, x_w = x if isinstance(x, tuple) else (x, *coordinate_pool(x))
            a_h, a_w = module.apply(sub(v, name), x_h, x_w, False, method="gates")
            return kernels.coordinate_gate(x, a_h, a_w)

        self.steps.append(call)
        return i + 1

    def __call__(self, v: Variables, x: jax.Array) -> jax.Array:
        y = x
        for step in self.steps:
            y = step(v, y, x)
        return x + y if self.residual and not self.residual_fused else y


def _widest_of_layers(layers: Sequence[Any]) -> Callable[[int, int, int], int]:
    """Elements per image of the widest tensor a layer list holds: its input or any output."""

    def widest(height: int, width: int, channels: int) -> int:
        most = height * width * channels
        for layer in layers:
            if isinstance(layer, Conv1x1):
                channels = layer.features
            elif isinstance(layer, DepthwiseConv3x3):
                height, width = ops.strided(height, layer.stride), ops.strided(width, layer.stride)
            most = max(most, height * width * channels)
        return most

    return widest


def _stem_stage(stem: ConvBNReLU, fused: bool) -> Stage:
    """The dense conv -> BN -> ReLU6 stage (3x3 stem, or MobileNetV2's 1x1 head conv)."""

    def widest(height: int, width: int, channels: int) -> int:
        out = ops.strided(height, stem.stride) * ops.strided(width, stem.stride) * stem.features
        return max(out, height * width * channels)

    run = plain(stem, own=True)
    if not fused or stem.kernel_size != 3:
        return Stage(stem.name, run, stem.stride, stem.features, widest)

    def call(v: Variables, x: Any) -> jax.Array:
        kernel = v["params"]["0"]["kernel"]  # ConvBNReLU's conv and BatchNorm: "0", "1"
        mul, add = bn_affine(v, "1")
        if isinstance(x, ImageSlice):
            return kernels.conv3x3_affine(
                x.source, kernel, mul, add, stem.stride, True, first=x.first, count=x.count
            )
        return kernels.conv3x3_affine(x, kernel, mul, add, stem.stride, True)

    return Stage(stem.name, call, stem.stride, stem.features, widest, reads_image_slices=True)


def block_stage(block: nn.Module, fused: bool) -> Stage:
    """A block of the body (bound to its variables) as a `Stage`: its layers through the
    kernels where `fused`, else as the model's own layers."""
    if isinstance(block, ConvBNReLU):
        return _stem_stage(block, fused)
    layers = list(block.conv)
    stride = math.prod(layer.stride for layer in layers if isinstance(layer, DepthwiseConv3x3))
    run = _Block(block) if fused else plain(block, own=True)
    return Stage(block.name, run, stride, block.out_channels, _widest_of_layers(layers))
