"""Start from a `ca_flax.load_pretrained` directory; re-initialise the classifier when the
number of classes differs (fine-tuning converted ImageNet weights on a new task)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from absl import logging
from flax import traverse_util

from ca_flax.pretrained import load_pretrained, read_metadata


def load_init_variables(
    directory: str, fresh: dict[str, Any], model_name: str, width_mult: float
) -> dict[str, Any]:
    """Pretrained variables shaped like `fresh`; leaves whose shapes differ keep `fresh`."""
    meta = read_metadata(directory)
    src_width = meta["model_kwargs"].get("width_mult", 1.0)
    if meta["model"] != model_name or src_width != width_mult:
        raise ValueError(
            f"config.init_from: {directory} holds {meta['model']} width {src_width}, "
            f"but config asks for {model_name} width {width_mult}"
        )
    _, pretrained = load_pretrained(directory)
    out = {}
    for collection in ("params", "batch_stats"):
        src = traverse_util.flatten_dict(pretrained[collection], sep="/")
        dst = traverse_util.flatten_dict(jax.device_get(fresh[collection]), sep="/")
        merged, reinit = {}, []
        for key, value in dst.items():
            # Host arrays: init_state places them on the mesh, which on a multi-host run spans
            # devices that arrays committed to this process's device cannot be moved onto.
            if key in src and np.shape(src[key]) == np.shape(value):
                merged[key] = np.asarray(src[key])
            else:
                merged[key], _ = np.asarray(value), reinit.append(key)
        if reinit:
            logging.info("init_from: re-initialised %s/%s", collection, ", ".join(reinit))
        out[collection] = traverse_util.unflatten_dict(merged, sep="/")
    return out
