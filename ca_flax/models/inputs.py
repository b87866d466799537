"""What the models take as input: NHWC RGB images scaled to [0, 1], then standardised with
ImageNet's channel means and deviations, as the released weights were trained."""

from __future__ import annotations

from typing import Any

import numpy as np

MEAN_RGB = np.array((0.485, 0.456, 0.406), np.float32)
STD_RGB = np.array((0.229, 0.224, 0.225), np.float32)


def normalize(rgb: Any) -> Any:
    """RGB in [0, 1] (a NumPy, JAX or TensorFlow array, channels last) -> the models' input."""
    return (rgb - MEAN_RGB) / STD_RGB
