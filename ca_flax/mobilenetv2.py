"""MobileNetV2 (Sandler et al.) with an optional attention block in every expanding block.

Layout and names follow the released `mbv2_ca.pth`: `features_0` stem, `features_1..17`
inverted residual blocks, `conv` head, `classifier_1` linear layer.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ca_flax.attention import attention_factory
from ca_flax.convolutions import strided
from ca_flax.image_slice import ImageSlice, as_array
from ca_flax.layers import Array, Dtype, make_divisible
from ca_flax.network import ClassifierNet
from ca_flax.sequential import Sequential, may_fuse

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
    """Dense conv (3x3 stride s, or 1x1) + BN + ReLU6, named like `Sequential(conv, bn, relu)`."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    dtype: Dtype = jnp.float32

    def widest_activation(self, height: int, width: int) -> int:
        """Elements per image of the largest tensor it holds: its output."""
        return strided(height, self.stride) * strided(width, self.stride) * self.features

    @property
    def out_channels(self) -> int:
        """Channels of its output, as the blocks name theirs (`blocking.image_shape_after`)."""
        return self.features

    def reads_image_slices(self) -> bool:
        """Whether it takes an `ImageSlice` for `x` (`blocking.run_layers`): the 3x3 conv does."""
        return self.kernel_size == 3

    @nn.compact
    def __call__(self, x: Array | ImageSlice, train: bool) -> Array:
        seq = Sequential("", train, self.dtype, fuse=may_fuse(self))
        if self.kernel_size == 3:
            return seq.conv3x3_bn_relu6(x, self.features, self.stride)
        return seq.act(seq.bn(seq.pointwise(as_array(x), self.features)))


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> [attention] -> project (1x1, linear), residual if shapes match."""

    in_channels: int
    out_channels: int
    stride: int
    expansion: int
    attention: str | None = None
    dtype: Dtype = jnp.float32

    def widest_activation(self, height: int, width: int) -> int:
        """Elements per image of the largest tensor it holds: the expanded input."""
        return height * width * round(self.in_channels * self.expansion)

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        seq = Sequential("conv", train, self.dtype, fuse=may_fuse(self))
        y = x
        if self.expansion == 1:
            y = seq.depthwise_bn(y, self.stride)
        else:
            hidden = round(self.in_channels * self.expansion)
            pooled = self.attention == "ca"  # CA's pooling comes from the depthwise kernel
            y = seq.expand_depthwise_bn(y, hidden, self.stride, pooled=pooled)
            attention = attention_factory(self.attention, self.in_channels, self.dtype)
            if attention is not None:
                y = seq.module(attention, y)
        y = seq.bn(seq.pointwise(y, self.out_channels))
        if self.stride == 1 and self.in_channels == self.out_channels:
            y = x + y
        return y


class MobileNetV2(ClassifierNet):
    """MobileNetV2 at any width; see `ClassifierNet` for the fields."""

    def feature_layers(self) -> list[nn.Module]:
        """Stem, inverted residual blocks and head conv."""
        channels = make_divisible(32 * self.width_mult, 8)
        layers = [ConvBNReLU(channels, 3, 2, self.dtype, name="features_0")]
        index = 1
        for t, c, n, s in MOBILENETV2_SETTINGS:
            out = make_divisible(c * self.width_mult, 8)
            for i in range(n):
                layers.append(
                    InvertedResidual(
                        channels,
                        out,
                        s if i == 0 else 1,
                        t,
                        self.attention,
                        self.dtype,
                        name=f"features_{index}",
                    )
                )
                channels, index = out, index + 1
        last = make_divisible(1280 * self.width_mult, 8) if self.width_mult > 1.0 else 1280
        layers.append(ConvBNReLU(last, 1, 1, self.dtype, name="conv"))
        return layers
