"""MobileNeXt (Zhou et al., ECCV 2020): sandglass blocks with residuals between wide tensors.

Layout and names follow the official release: `features_0` stem, `features_1..20` sandglass
blocks, no head conv, `classifier` (dropout, linear). Attention, when asked for, goes after the
first depthwise 3x3 conv of a block, as the CA paper recommends for MobileNeXt.
"""

from __future__ import annotations

import math
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
    DepthwiseConv3x3,
    Dropout,
    Linear,
    make_divisible,
    relu6,
    sequential,
)
from ca_flax.models.mobilenetv2 import ConvBNReLU

# (reduction t, output channels c, repeats n, first stride s), from the official release.
MOBILENEXT_SETTINGS = (
    (2, 96, 1, 2),
    (6, 144, 1, 1),
    (6, 192, 3, 2),
    (6, 288, 3, 2),
    (6, 384, 4, 1),
    (6, 576, 4, 2),
    (6, 960, 3, 1),
    (6, 1280, 1, 1),
)


def sandglass_hidden(in_channels: int, out_channels: int, reduction: int) -> int:
    """Bottleneck width: in // t, widened to make_divisible(ceil(out / 6), 16) when too thin."""
    hidden = in_channels // reduction
    if hidden < out_channels / 6.0:
        hidden = make_divisible(math.ceil(out_channels / 6.0), 16)
    return hidden


class SandGlass(nn.Module):
    """dw 3x3 -> BN -> ReLU6 -> [attention] -> 1x1 reduce -> BN (linear) -> 1x1 expand -> BN ->
    ReLU6 -> dw 3x3 (at `stride`) -> BN (linear), plus the input when the shapes match.

    As released, the first depthwise conv is kept only where the block is `full` (reduction 2,
    same width in and out, or `keep_3x3`), the last one where the block is full or strides.
    """

    in_channels: int
    out_channels: int
    stride: int
    reduction: int
    keep_3x3: bool = False
    attention: str | None = None
    dtype: DTypeLike = jnp.float32

    @property
    def full(self) -> bool:
        return self.reduction == 2 or self.in_channels == self.out_channels or self.keep_3x3

    @property
    def residual(self) -> bool:
        same = self.in_channels == self.out_channels
        return same and self.stride == 1 and not self.keep_3x3

    def setup(self) -> None:
        hidden = sandglass_hidden(self.in_channels, self.out_channels, self.reduction)
        conv1x1, bn = partial(Conv1x1, dtype=self.dtype), partial(BatchNorm, dtype=self.dtype)
        dw = partial(DepthwiseConv3x3, dtype=self.dtype)
        attention = attention_block(self.attention, hidden, self.dtype)
        first = [dw(1), bn(), relu6, *attention] if self.full else []
        last = [dw(self.stride), bn()] if self.full or self.stride == 2 else []
        self.conv = [
            *first,
            conv1x1(hidden), bn(),
            conv1x1(self.out_channels), bn(), relu6,
            *last,
        ]  # fmt: skip

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = sequential(self.conv, x, train)
        return x + y if self.residual else y


class MobileNeXt(nn.Module):
    """MobileNeXt at any width; `attention` is None, 'se' or 'ca'. NHWC input."""

    num_classes: int = 1000
    width_mult: float = 1.0
    attention: str | None = None
    dropout_rate: float = 0.2
    dtype: DTypeLike = jnp.float32

    def setup(self) -> None:
        channels = make_divisible(32 * self.width_mult, 8)
        features = [ConvBNReLU(channels, 3, 2, self.dtype)]
        for t, c, n, s in MOBILENEXT_SETTINGS:
            keep_out = c == 1280 and self.width_mult < 1.0
            out = c if keep_out else make_divisible(c * self.width_mult, 8)
            for i in range(n):
                first = i == 0
                features.append(
                    SandGlass(
                        channels,
                        out,
                        s if first else 1,
                        t,
                        keep_3x3=first and n == 1 and s == 1,
                        attention=self.attention,
                        dtype=self.dtype,
                    )
                )
                channels = out
        self.features = features
        self.classifier = [
            Dropout(self.dropout_rate),
            Linear(self.num_classes, dtype=self.dtype, kernel_init=dense_init),
        ]

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = sequential(self.features, x.astype(self.dtype), train)
        x = jnp.mean(x, axis=(1, 2))
        x = sequential(self.classifier, x, train)
        return x.astype(ops.accum_dtype(self.dtype))
