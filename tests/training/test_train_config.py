"""Bad configs fail at start naming the field; init_from re-initialises a mismatched classifier."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ca_flax import create_model
from ca_flax.pretrained import save_pretrained
from ca_flax.training.config_check import ConfigError, check_config, check_dataset
from ca_flax.training.finetune import load_init_variables
from ca_flax.training.optim import weight_decay_mask
from tests.helpers import training


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model", "mobilenetv3", "unknown model"),
        ("dtype", "float16", "must be one of"),
        ("randaugment", "rand-m9-n2", "not implemented"),
        ("ema_decay", 1.5, "must be in [0, 1)"),
        ("eval_every_epochs", 0, "must be > 0"),
    ],
)
def test_bad_field_is_named(field: str, value: object, message: str) -> None:
    config = training.config()
    config[field] = value
    with pytest.raises(ConfigError, match=rf"config\.{field}: .*{re.escape(message)}"):
        check_config(config)


def test_missing_dataset_is_named(tmp_path: Path) -> None:
    config = training.config()
    config.dataset, config.data_dir = "imagenet2012", str(tmp_path)
    with pytest.raises(ConfigError, match=r"config\.dataset: 'imagenet2012' is not prepared"):
        check_dataset(config)


def test_batch_not_divisible_by_devices_fails_at_start(tmp_path: Path) -> None:
    proc = subprocess.run(
        training.train_cmd(tmp_path, "--config.batch_size=12"),
        cwd=training.REPO,
        env=training.env(devices=8),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "error: config.batch_size: 12 must be a positive multiple of the device count (8" in (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr


def _random_variables(model, seed: int) -> dict:
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), dict(shapes))


def test_init_from_reinitialises_classifier_when_classes_differ(tmp_path: Path) -> None:
    kwargs = {"width_mult": 0.35, "num_classes": 1000}
    pretrained = _random_variables(create_model("mobilenetv2_ca", **kwargs), seed=1)
    save_pretrained(tmp_path / "pre", "mobilenetv2_ca", pretrained, kwargs)
    fresh = _random_variables(create_model("mobilenetv2_ca", width_mult=0.35, num_classes=10), 2)
    loaded = load_init_variables(str(tmp_path / "pre"), fresh, "mobilenetv2_ca", 0.35)
    np.testing.assert_array_equal(
        loaded["params"]["features_3"]["conv_0"]["kernel"],
        pretrained["params"]["features_3"]["conv_0"]["kernel"],
    )
    np.testing.assert_array_equal(
        loaded["batch_stats"]["conv"]["1"]["var"], pretrained["batch_stats"]["conv"]["1"]["var"]
    )
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(
            loaded["params"]["classifier_1"][name], fresh["params"]["classifier_1"][name]
        )
    with pytest.raises(ValueError, match="config.init_from"):
        load_init_variables(str(tmp_path / "pre"), fresh, "mobilenext_ca", 0.35)


def test_weight_decay_mask_skips_bn_bias_and_depthwise() -> None:
    model = create_model("mobilenetv2_ca", width_mult=0.35, num_classes=10)
    params = _random_variables(model, 0)["params"]
    mask = weight_decay_mask(params)
    assert mask["features_0"]["0"]["kernel"]  # dense stem conv
    assert not mask["features_0"]["1"]["scale"]  # BatchNorm
    assert not mask["features_2"]["conv_3"]["kernel"]  # depthwise (3, 3, 1, C)
    assert mask["classifier_1"]["kernel"] and not mask["classifier_1"]["bias"]
