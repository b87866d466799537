"""MobileNetV2 (Sandler et al., CVPR 2018) with an optional attention block in every expanding
block (Coordinate Attention, Hou et al., CVPR 2021; SE; CBAM).

Layout and names follow the released `mbv2_ca.pth`: `features_0` stem, `features_1..17`
inverted residual blocks, `conv` head, `classifier` (dropout, linear).
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from ca_flax import ops
from ca_flax.models.attention import attention_block
from ca_flax.models.initializers import dense_init
from ca_flax.models.layers import (
    BatchNorm,
    Conv1x1,
    Conv3x3,
    DepthwiseConv3x3,
    Dropout,
    Linear,
    make_divisible,
    relu6,
    sequential,
)

# (expansion t, output channels c, repeats n, first stride s), from the paper.
MOBILENETV2_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class ConvBNReLU(nn.Module):
    """Dense conv (3x3 at `stride`, or 1x1) -> BN -> ReLU6, named `0`, `1` like the release."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.kernel_size == 3:
            conv = Conv3x3(self.features, self.stride, self.dtype, name="0")
        else:
            conv = Conv1x1(self.features, dtype=self.dtype, name="0")
        return relu6(BatchNorm(dtype=self.dtype, name="1")(conv(x), train))


class InvertedResidual(nn.Module):
    """1x1 expand -> BN -> ReLU6 -> dw 3x3 -> BN -> ReLU6 -> [attention] -> 1x1 project -> BN,
    plus the input when the shapes match (the first block, expansion 1, has no expand)."""

    in_channels: int
    out_channels: int
    stride: int
    expansion: int
    attention: str | None = None
    dtype: DTypeLike = jnp.float32

    @property
    def hidden(self) -> int:
        return round(self.in_channels * self.expansion)

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels

    def setup(self) -> None:
        conv1x1, bn = partial(Conv1x1, dtype=self.dtype), partial(BatchNorm, dtype=self.dtype)
        expand = [conv1x1(self.hidden), bn(), relu6] if self.expansion != 1 else []
        attention = attention_block(self.attention, self.in_channels, self.dtype)
        self.conv = [
            *expand,
            DepthwiseConv3x3(self.stride, self.dtype), bn(), relu6,
            *(attention if expand else []),
            conv1x1(self.out_channels), bn(),
        ]  # fmt: skip

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = sequential(self.conv, x, train)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    """MobileNetV2 at any width; `attention` is None, 'se', 'cbam' or 'ca'. NHWC input."""

    num_classes: int = 1000
    width_mult: float = 1.0
    attention: str | None = None
    dropout_rate: float = 0.1
    dtype: DTypeLike = jnp.float32

    def setup(self) -> None:
        channels = make_divisible(32 * self.width_mult, 8)
        features = [ConvBNReLU(channels, 3, 2, self.dtype)]
        for t, c, n, s in MOBILENETV2_SETTINGS:
            out = make_divisible(c * self.width_mult, 8)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(
                    InvertedResidual(channels, out, stride, t, self.attention, self.dtype)
                )
                channels = out
        self.features = features
        last = make_divisible(1280 * self.width_mult, 8) if self.width_mult > 1.0 else 1280
        self.conv = ConvBNReLU(last, 1, 1, self.dtype)
        self.classifier = [
            Dropout(self.dropout_rate),
            Linear(self.num_classes, dtype=self.dtype, kernel_init=dense_init),
        ]

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = sequential(self.features, x.astype(self.dtype), train)
        x = self.conv(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = sequential(self.classifier, x, train)
        return x.astype(ops.accum_dtype(self.dtype))
