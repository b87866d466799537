"""ImageNet through the real TFDS `imagenet2012` builder and tf.data, one shard per process.

Train: fused JPEG decode + random crop (area 0.08-1, aspect 3/4-4/3), horizontal flip, bilinear
resize to `image_size`. Eval: resize the shorter side to `eval_resize`, center crop
`image_size` (the released weights' transform). Both normalise RGB/255 with ImageNet mean/std.
Every random choice is a stateless function of (seed, epoch, position in epoch), and the shuffle
is seeded per epoch, so batches depend only on (seed, step) and resume exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ca_flax.models.inputs import normalize
from ca_flax.training.config_check import ConfigError
from ca_flax.training.data import (
    Batch,
    Layout,
    num_eval_steps,
    pad_eval_batches,
)

AREA_RANGE = (0.08, 1.0)
ASPECT_RANGE = (3 / 4, 4 / 3)


def decode_and_random_crop(jpeg: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
    """Inception-style random-resized crop decoded straight from the JPEG bytes."""
    shape = tf.io.extract_jpeg_shape(jpeg)
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=ASPECT_RANGE,
        area_range=AREA_RANGE,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
    image = tf.io.decode_and_crop_jpeg(jpeg, window, channels=3)
    return tf.image.resize(image, (size, size), method="bilinear")


def decode_and_center_crop(jpeg: tf.Tensor, size: int, resize: int) -> tf.Tensor:
    """Resize the shorter side to `resize`, then take the central `size` x `size` crop."""
    image = tf.io.decode_jpeg(jpeg, channels=3)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    scale = tf.cast(resize, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
    new_h = tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32)
    new_w = tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32)
    image = tf.image.resize(image, (new_h, new_w), method="bilinear", antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image[top : top + size, left : left + size]


def to_input(image: tf.Tensor) -> tf.Tensor:
    """uint8 RGB -> the models' float32 input (`ca_flax.models.inputs.normalize`)."""
    return normalize(tf.cast(image, tf.float32) / 255.0)


class ImageNetDataset:
    """`imagenet2012` (or any TFDS image classification dataset with JPEG images)."""

    def __init__(self, config, layout: Layout):  # noqa: ANN001 - an ml_collections.ConfigDict
        self.config, self.layout = config, layout
        self.builder = tfds.builder(config.dataset, data_dir=config.data_dir or None)
        info = self.builder.info
        self.num_classes = info.features["label"].num_classes
        self.num_train_examples = info.splits[config.train_split].num_examples
        if config.max_train_examples > 0:
            self.num_train_examples = min(self.num_train_examples, config.max_train_examples)
        self.num_eval_examples = info.splits[config.eval_split].num_examples
        self.steps_per_epoch = self.num_train_examples // layout.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"config.batch_size={layout.global_batch} exceeds the {self.num_train_examples} "
                f"training examples of {config.dataset} (see config.max_train_examples)"
            )
        self._train_split = self._process_split(config.train_split, self.num_train_examples)
        self._eval_split = tfds.split_for_jax_process(config.eval_split)

    def _process_split(self, split: str, num_examples: int) -> str:
        """This process's disjoint shard of the first `num_examples` examples of `split`."""
        base = split if num_examples == self._split_size(split) else f"{split}[:{num_examples}]"
        return tfds.even_splits(base, n=self.layout.process_count, drop_remainder=False)[
            self.layout.process_index
        ]

    def _split_size(self, split: str) -> int:
        return self.builder.info.splits[split].num_examples

    def _epoch(self, epoch: int, skip_batches: int) -> tf.data.Dataset:
        """One epoch of augmented local batches, starting `skip_batches` batches in."""
        cfg, local = self.config, self.layout.local_batch
        epoch_seed = int(np.random.default_rng([cfg.seed, epoch]).integers(2**31 - 1))
        read_config = tfds.ReadConfig(shuffle_seed=epoch_seed, skip_prefetch=True)
        ds = self.builder.as_dataset(
            split=self._train_split,
            shuffle_files=True,
            read_config=read_config,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
        ds = ds.shuffle(cfg.shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
        ds = ds.take(self.steps_per_epoch * local).enumerate().skip(skip_batches * local)

        def augment(index: tf.Tensor, example: dict) -> dict:
            seed = tf.stack([tf.constant(epoch_seed, tf.int64), index])
            image = decode_and_random_crop(example["image"], cfg.image_size, seed)
            image = tf.image.stateless_random_flip_left_right(image, seed + 1)
            return {"image": to_input(image), "label": example["label"]}

        ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(local, drop_remainder=True).prefetch(2)

    def train_batches(self, start_step: int) -> Iterator[Batch]:
        """Local batches from `start_step` on, epoch after epoch."""
        epoch, within = divmod(start_step, self.steps_per_epoch)
        while True:
            yield from tfds.as_numpy(self._epoch(epoch, within))
            epoch, within = epoch + 1, 0

    def eval_batches(self) -> Iterator[Batch]:
        """Every validation image of this process's shard once, padded to a common count."""
        cfg = self.config
        ds = self.builder.as_dataset(
            split=self._eval_split, decoders={"image": tfds.decode.SkipDecoding()}
        )

        def preprocess(example: dict) -> dict:
            image = decode_and_center_crop(example["image"], cfg.image_size, cfg.eval_resize)
            return {"image": to_input(image), "label": example["label"]}

        ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(self.layout.local_eval_batch).prefetch(2)
        steps = num_eval_steps(self.num_eval_examples, self.layout)
        return pad_eval_batches(tfds.as_numpy(ds), steps, self.layout.local_eval_batch)
