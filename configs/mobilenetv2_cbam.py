"""Table row `mobilenetv2_cbam` on ImageNet with the paper's recipe (configs/imagenet_base.py)."""

import ml_collections

from configs import imagenet_base


def get_config() -> ml_collections.ConfigDict:
    """imagenet_base with `model = "mobilenetv2_cbam"`; width via `--config.width_mult`."""
    config = imagenet_base.get_config()
    config.model = "mobilenetv2_cbam"
    return config
