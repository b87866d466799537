"""Table row `mobilenext` on ImageNet with the paper's recipe (configs/imagenet_base.py)."""

import ml_collections

from configs import imagenet_base


def get_config() -> ml_collections.ConfigDict:
    """imagenet_base with `model = "mobilenext"`; width via `--config.width_mult`."""
    config = imagenet_base.get_config()
    config.model = "mobilenext"
    return config
