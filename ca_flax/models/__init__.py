"""The model definitions, pure Flax: they read like the papers and know nothing of backends."""

from ca_flax.models.attention import CBAM, CoordAttention, SqueezeExcite
from ca_flax.models.initializers import init_variables
from ca_flax.models.mobilenetv2 import MobileNetV2
from ca_flax.models.mobilenext import MobileNeXt
from ca_flax.models.registry import create_model, list_models, model_family

__all__ = [
    "CBAM",
    "CoordAttention",
    "MobileNeXt",
    "MobileNetV2",
    "SqueezeExcite",
    "create_model",
    "init_variables",
    "list_models",
    "model_family",
]
