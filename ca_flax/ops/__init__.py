"""What differs by backend: the written forms of the convolutions and of train-mode BatchNorm.

Imports nothing else of ca_flax. `conv_formulation` picks the form; layers call the functions
below with their parameters; a backend may plug in its own training depthwise
(`training_depthwise`).
"""

from ca_flax.ops.batch_norm import (
    affine,
    batch_moments,
    batch_norm_train,
    fused_batch_norm,
    inference_affine,
    normalize,
    shifted_moments,
)
from ca_flax.ops.conv import (
    accum_dtype,
    conv1x1,
    conv3x3,
    depthwise_conv3x3,
    im2col_conv3x3,
    lax_conv,
    shifted_windows,
    strided,
    training_depthwise,
    windows_depthwise3x3,
)
from ca_flax.ops.formulation import (
    BACKEND_DEFAULT,
    FORMULATIONS,
    active_formulation,
    conv_formulation,
)

__all__ = [
    "BACKEND_DEFAULT",
    "FORMULATIONS",
    "accum_dtype",
    "active_formulation",
    "affine",
    "batch_moments",
    "batch_norm_train",
    "conv1x1",
    "conv3x3",
    "conv_formulation",
    "depthwise_conv3x3",
    "fused_batch_norm",
    "im2col_conv3x3",
    "inference_affine",
    "lax_conv",
    "normalize",
    "shifted_moments",
    "shifted_windows",
    "strided",
    "training_depthwise",
    "windows_depthwise3x3",
]
