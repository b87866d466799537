"""Converted-checkpoint directories: an orbax checkpoint of the variables plus `ca_flax.json`.

Directories are written to a temporary sibling and renamed into place, so a failed write
never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from ca_flax.atomic import write_atomically
from ca_flax.models.initializers import abstract_variables
from ca_flax.models.registry import create_model

METADATA_FILE = "ca_flax.json"
VARIABLES_DIR = "variables"
FORMAT_VERSION = 1


def save_pretrained(
    directory: str | Path,
    name: str,
    variables: dict[str, Any],
    model_kwargs: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `variables` of `create_model(name, **model_kwargs)` to a new directory, atomically."""
    metadata = {
        "format_version": FORMAT_VERSION,
        "model": name,
        "model_kwargs": dict(model_kwargs or {}),
        **(extra or {}),
    }

    def write(tmp: Path) -> None:
        tmp.mkdir()
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / VARIABLES_DIR, jax.tree.map(jnp.asarray, variables))
        checkpointer.wait_until_finished()
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")

    return write_atomically(directory, write)


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """The `ca_flax.json` of a checkpoint directory, checked for the keys loading needs."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a ca_flax checkpoint ({METADATA_FILE} missing)")
    try:
        metadata = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    required = ("model", "model_kwargs")
    if not isinstance(metadata, dict) or any(k not in metadata for k in required):
        raise ValueError(f"{path}: not a ca_flax checkpoint's metadata (needs keys {required})")
    return metadata


class CheckpointMismatchError(ValueError):
    """A checkpoint's stored variables do not fit the model asked to load them."""


def check_stored_shapes(where: str, stored: Any, variables: dict[str, Any], cause: str) -> None:
    """Fail naming the first variable whose shape in an orbax checkpoint (`stored`, its
    metadata tree) differs from `variables` ({'params', 'batch_stats'}), before orbax's restore
    does: its message names neither the variable nor what `cause`d the difference."""
    stored_shapes = {
        jax.tree_util.keystr(path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(stored)
    }
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        key = jax.tree_util.keystr(path)
        if stored_shapes.get(key) != tuple(leaf.shape):
            raise CheckpointMismatchError(
                f"{where}: variable {key} is stored as {stored_shapes.get(key)} but the model "
                f"wants {tuple(leaf.shape)} ({cause})"
            )


def load_pretrained(
    directory: str | Path, **model_overrides: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """Model and variables from a directory written by `save_pretrained` or the converter.

    `model_overrides` (e.g. `dtype=jnp.bfloat16`) change how the model computes, not its shapes.
    """
    directory = Path(directory).absolute()
    metadata = read_metadata(directory)
    kwargs = {**metadata["model_kwargs"], **model_overrides}
    model = create_model(metadata["model"], **kwargs)
    target = abstract_variables(model)
    # Onto this process's first device, whichever device wrote it (a GPU host, cpu:1, another
    # process): without a sharding orbax looks for the writer's device and fails.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {
        k: jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target[k]
        )
        for k in ("params", "batch_stats")
    }
    checkpointer = ocp.StandardCheckpointer()
    stored = checkpointer.metadata(directory / VARIABLES_DIR).item_metadata
    check_stored_shapes(str(directory), stored, target, f"model from {METADATA_FILE} and overrides")
    variables = checkpointer.restore(directory / VARIABLES_DIR, target)
    return model, variables
