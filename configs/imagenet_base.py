"""Base ImageNet recipe of the Coordinate Attention paper's tables (see docs/training.md).

200 epochs, random-resized crop + flip, cosine schedule with linear warmup, SGD momentum 0.9,
weight decay 4e-5, lr 0.05 per 256 images scaled linearly with the global batch.
Row configs (`configs/mobilenetv2_ca.py`, ...) only set `model`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """The seed's ImageNet recipe; override any field with `--config.FIELD=VALUE`."""
    c = ml_collections.ConfigDict()
    # Model.
    c.model = "mobilenetv2_ca"
    c.width_mult = 1.0
    c.dropout_rate = -1.0  # < 0: the model's default (0.1 MobileNetV2, 0.2 MobileNeXt)
    c.dtype = "float32"  # or "bfloat16": compute dtype; params, BN statistics stay float32
    c.init_from = ""  # a ca_flax.load_pretrained directory to fine-tune from
    # Data.
    c.dataset = "imagenet2012"  # TFDS name, or "digits" (scikit-learn, offline)
    c.data_dir = ""  # TFDS data_dir; "" = TFDS default (~/tensorflow_datasets)
    c.train_split = "train"
    c.eval_split = "validation"
    c.num_classes = 1000
    c.image_size = 224
    c.eval_resize = 256  # shorter side before the center crop
    c.shuffle_buffer = 16_384
    c.max_train_examples = -1  # > 0: use only the first N training examples (smoke runs)
    # Optimisation.
    c.batch_size = 256  # global, over all devices and processes
    c.eval_batch_size = 256  # global
    c.num_epochs = 200.0
    c.num_train_steps = -1  # > 0 overrides num_epochs
    c.warmup_epochs = 5.0
    c.base_learning_rate = 0.05  # per `lr_batch_size` images, scaled with batch_size
    c.lr_batch_size = 256
    c.optimizer = "sgd"
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 4e-5
    c.weight_decay_exclude = False  # True: no decay on BN, biases and depthwise kernels
    c.label_smoothing = 0.0
    c.mixup_alpha = 0.0
    c.randaugment = ""  # e.g. "rand-m9-n2"; not implemented yet, must stay ""
    c.ema_decay = 0.0  # > 0: keep an EMA of the weights and evaluate it beside them
    c.seed = 0
    # Progress, checkpoints.
    c.log_every_steps = 100
    c.eval_every_epochs = 1
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3  # the last K, plus the best by eval top-1
    return c
