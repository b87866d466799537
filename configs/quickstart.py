"""Offline quickstart: scikit-learn's handwritten digits, upscaled to 32x32 RGB, same trainer.

1,797 images ship inside scikit-learn; 360 are held out for validation. A width-0.35
MobileNetV2 + Coordinate Attention learns it on a CPU in minutes (accuracy over seeds, timings
and hosts: docs/training.md).
"""

import ml_collections

from configs import imagenet_base


def get_config() -> ml_collections.ConfigDict:
    """Small CA model on the digits dataset: a minute-scale, download-free training run."""
    c = imagenet_base.get_config()
    c.model = "mobilenetv2_ca"
    c.width_mult = 0.35
    c.dataset = "digits"
    c.num_classes = 10
    c.image_size = 32
    c.batch_size = 64
    c.eval_batch_size = 120
    c.num_epochs = 15.0
    c.warmup_epochs = 1.0
    c.base_learning_rate = 0.05  # peak 0.0125 at batch 64; 0.1 was unstable (docs/training.md)
    c.lr_batch_size = 256
    c.weight_decay = 4e-5
    c.log_every_steps = 20
    c.checkpoint_every_steps = 200
    c.keep_checkpoints = 2
    return c
