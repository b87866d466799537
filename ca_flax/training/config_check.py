"""Fail at start, naming the config field, instead of hours into a run."""

from __future__ import annotations

from typing import Any

import jax

from ca_flax.models.registry import list_models

DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A config field has a value the trainer cannot use."""


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}: {message}")


def check_config(config: Any) -> None:
    """Raise ConfigError naming the first bad field of `config`."""
    _require(
        config.model in list_models(),
        "model",
        f"unknown model {config.model!r}; choose one of {', '.join(list_models())}",
    )
    _require(config.width_mult > 0, "width_mult", f"must be > 0, got {config.width_mult}")
    _require(config.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {config.dtype!r}")
    _require(config.num_classes > 1, "num_classes", f"must be > 1, got {config.num_classes}")
    devices, processes = jax.device_count(), jax.process_count()
    for field in ("batch_size", "eval_batch_size"):
        value = config[field]
        _require(
            value > 0 and value % devices == 0,
            field,
            f"{value} must be a positive multiple of the device count ({devices}, "
            f"over {processes} process(es))",
        )
    _require(config.num_epochs > 0 or config.num_train_steps > 0, "num_epochs", "must be > 0")
    _require(
        config.optimizer == "sgd",
        "optimizer",
        f"only 'sgd' is implemented, got {config.optimizer!r}",
    )
    _require(0 <= config.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
    _require(config.mixup_alpha >= 0, "mixup_alpha", "must be >= 0")
    _require(0 <= config.ema_decay < 1, "ema_decay", "must be in [0, 1) (0 = off)")
    _require(
        not config.randaugment,
        "randaugment",
        f"RandAugment is not implemented yet; set it to '' (got {config.randaugment!r})",
    )
    _require(config.log_every_steps > 0, "log_every_steps", "must be > 0")
    _require(config.checkpoint_every_steps > 0, "checkpoint_every_steps", "must be > 0")
    _require(config.keep_checkpoints > 0, "keep_checkpoints", "must be > 0")
    _require(
        config.eval_every_epochs > 0,
        "eval_every_epochs",
        f"must be > 0 (the last step always evaluates), got {config.eval_every_epochs}",
    )


def check_dataset(config: Any) -> None:
    """The TFDS dataset must already be prepared under `config.data_dir` (no downloads)."""
    if config.dataset == "digits":
        return
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(config.dataset, data_dir=config.data_dir or None)
    except Exception as e:  # unknown name, bad directory
        raise ConfigError(
            f"config.dataset: cannot open TFDS dataset {config.dataset!r}: {e}"
        ) from e
    if not builder.is_prepared():
        raise ConfigError(
            f"config.dataset: {config.dataset!r} is not prepared under config.data_dir="
            f"{builder.data_dir!r}; see docs/training.md ('Preparing ImageNet')"
        )
    for field in ("train_split", "eval_split"):
        split = config[field]
        _require(split in builder.info.splits, field, f"split {split!r} not in {config.dataset}")
