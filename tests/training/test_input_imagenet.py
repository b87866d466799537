"""The real TFDS imagenet2012 builder, prepared offline from a tiny manual directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from ca_flax.models.inputs import MEAN_RGB, STD_RGB
from ca_flax.training.data import Layout
from ca_flax.training.imagenet import ImageNetDataset
from tests.helpers import REPO, tiny_imagenet, training


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tfds")
    tiny_imagenet.prepare(path)
    return path


def small_config(data_dir: Path) -> ml_collections.ConfigDict:
    c = training.config("imagenet_base")
    c.data_dir = str(data_dir)
    c.image_size, c.eval_resize, c.shuffle_buffer = 32, 36, 64
    c.batch_size, c.eval_batch_size = 8, 8
    return c


def expected_pixels(label: int) -> np.ndarray:
    return (np.float32(tiny_imagenet.colour(label)) / 255 - np.float32(MEAN_RGB)) / np.float32(
        STD_RGB
    )


def test_builder_labels_match_manual_files(data_dir: Path) -> None:
    import tensorflow_datasets as tfds

    builder = tfds.builder("imagenet2012", data_dir=str(data_dir))
    names = builder.info.features["label"].names
    assert builder.info.splits["train"].num_examples == 4 * tiny_imagenet.TRAIN_PER_CLASS
    val_wnids = tiny_imagenet.validation_labels()
    for ex in tfds.as_numpy(builder.as_dataset(split="validation")):
        index = int(ex["file_name"].decode()[-13:-5]) - 1
        assert names[ex["label"]] == val_wnids[index]
    for ex in tfds.as_numpy(builder.as_dataset(split="train")):
        assert names[ex["label"]] == ex["file_name"].decode().split("_")[0]


def test_pipeline_shapes_labels_pixels(data_dir: Path) -> None:
    dataset = ImageNetDataset(small_config(data_dir), Layout(8, 8, 0, 1))
    assert dataset.steps_per_epoch == 4
    batches = dataset.train_batches(0)
    seen = []
    for _ in range(dataset.steps_per_epoch):
        batch = next(batches)
        assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
        for image, label in zip(batch["image"], batch["label"], strict=True):
            # Solid colours survive crop/flip/resize: every pixel is the class colour.
            np.testing.assert_allclose(image.mean((0, 1)), expected_pixels(label), atol=0.05)
        seen += batch["label"].tolist()
    assert sorted(seen) == sorted([0, 1, 2, 3] * tiny_imagenet.TRAIN_PER_CLASS)
    evals = list(dataset.eval_batches())
    masks = np.concatenate([b["mask"] for b in evals])
    assert masks.sum() == tiny_imagenet.NUM_VAL and len(masks) == 16  # 10 images, padded to 2x8
    for batch in evals:
        assert batch["image"].shape == (8, 32, 32, 3)
        for image, label, m in zip(batch["image"], batch["label"], batch["mask"], strict=True):
            if m:
                np.testing.assert_allclose(image.mean((0, 1)), expected_pixels(label), atol=0.05)


def test_batch_larger_than_the_training_split_is_named(data_dir: Path) -> None:
    config = small_config(data_dir)
    config.max_train_examples = 4
    with pytest.raises(ValueError, match=r"config\.batch_size=8 exceeds the 4 training examples"):
        ImageNetDataset(config, Layout(8, 8, 0, 1))


def test_same_seed_and_step_give_same_batches(data_dir: Path) -> None:
    config = small_config(data_dir)
    first = ImageNetDataset(config, Layout(8, 8, 0, 1)).train_batches(0)
    for _ in range(5):  # into the second epoch
        expected = next(first)
    resumed = next(ImageNetDataset(config, Layout(8, 8, 0, 1)).train_batches(4))
    np.testing.assert_array_equal(resumed["image"], expected["image"])
    np.testing.assert_array_equal(resumed["label"], expected["label"])


def test_process_shards_are_disjoint(data_dir: Path) -> None:
    config = small_config(data_dir)
    config.batch_size = 8
    labels = []
    for process in range(2):
        ds = ImageNetDataset(config, Layout(8, 8, process, 2))
        batches = ds.train_batches(0)
        labels.append(np.concatenate([next(batches)["label"] for _ in range(ds.steps_per_epoch)]))
    assert len(labels[0]) == len(labels[1]) == 16
    assert sorted(np.concatenate(labels).tolist()) == sorted([0, 1, 2, 3] * 8)


def test_train_steps_on_8_devices(data_dir: Path, tmp_path: Path) -> None:
    """train.py end to end on the TFDS data, 8 simulated CPU devices, eval sees all images."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    cmd = [
        sys.executable, "train.py", "--config", "configs/mobilenetv2_ca.py",
        "--workdir", str(tmp_path / "run"), f"--config.data_dir={data_dir}",
        "--config.width_mult=0.35", "--config.image_size=32", "--config.eval_resize=36",
        "--config.batch_size=16", "--config.eval_batch_size=8", "--config.num_train_steps=3",
        "--config.log_every_steps=1", "--config.shuffle_buffer=64",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step 3/3" in proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["devices"] == 8 and summary["steps"] == 3
    assert summary["final"]["eval/count"] == tiny_imagenet.NUM_VAL
    assert np.isfinite(summary["final"]["eval/loss"])
