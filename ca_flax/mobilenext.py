"""MobileNeXt (Zhou et al., ECCV 2020): sandglass blocks with residuals between wide tensors.

Layout and names follow the official release: `features_0` stem, `features_1..20` sandglass
blocks, no head conv, `classifier_1` linear layer. Attention, when asked for, goes after the
first depthwise 3x3 conv of a block, as the CA paper recommends for MobileNeXt.
"""

from __future__ import annotations

import math
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from ca_flax.attention import attention_factory
from ca_flax.layers import Array, Dtype, make_divisible
from ca_flax.mobilenetv2 import ConvBNReLU
from ca_flax.network import ClassifierNet
from ca_flax.sequential import Sequential, may_fuse

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
    """dw3x3 -> 1x1 reduce (linear) -> 1x1 expand -> dw3x3 (linear); see the reference forms."""

    in_channels: int
    out_channels: int
    stride: int
    reduction: int
    keep_3x3: bool = False
    attention: str | None = None
    dtype: Dtype = jnp.float32

    def widest_activation(self, height: int, width: int) -> int:
        """Elements per image of the largest tensor it holds: a wide one at input resolution."""
        return height * width * max(self.in_channels, self.out_channels)

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        seq = Sequential("conv", train, self.dtype, fuse=may_fuse(self))
        hidden = sandglass_hidden(self.in_channels, self.out_channels, self.reduction)
        full = self.reduction == 2 or self.in_channels == self.out_channels or self.keep_3x3
        y = x
        if full:
            y = seq.depthwise_bn(y, pooled=self.attention == "ca")  # CA's pooling, if it runs
            attention = attention_factory(self.attention, hidden, self.dtype)
            if attention is not None:
                y = seq.module(attention, y)
        identity = self.in_channels == self.out_channels and self.stride == 1 and not self.keep_3x3
        residual = x if identity else None
        if full or self.stride == 2:
            out = self.out_channels
            return seq.reduce_expand_depthwise_bn(y, hidden, out, self.stride, False, residual)
        y = seq.bn(seq.pointwise(y, hidden))
        y = seq.act(seq.bn(seq.pointwise(y, self.out_channels)))
        return y if residual is None else x + y


class MobileNeXt(ClassifierNet):
    """MobileNeXt at any width; see `ClassifierNet` for the fields."""

    dropout_rate: float = 0.2
    # Two depthwise layers per block on the wide tensors: chunks under the default 3 MB ran faster
    # on one CPU device per core. With the CPU kernels, 2 MB ran 7-8% faster than 1.5 MB for
    # mobilenext (one process, two A/B runs), level for mobilenext_ca.
    cpu_block_mb: ClassVar[float] = 2.0

    def feature_layers(self) -> list[nn.Module]:
        """Stem and sandglass blocks."""
        channels = make_divisible(32 * self.width_mult, 8)
        layers = [ConvBNReLU(channels, 3, 2, self.dtype, name="features_0")]
        index = 1
        for t, c, n, s in MOBILENEXT_SETTINGS:
            keep_out = c == 1280 and self.width_mult < 1.0
            out = c if keep_out else make_divisible(c * self.width_mult, 8)
            for i in range(n):
                first = i == 0
                layers.append(
                    SandGlass(
                        channels,
                        out,
                        s if first else 1,
                        t,
                        keep_3x3=first and n == 1 and s == 1,
                        attention=self.attention,
                        dtype=self.dtype,
                        name=f"features_{index}",
                    )
                )
                channels, index = out, index + 1
        return layers
