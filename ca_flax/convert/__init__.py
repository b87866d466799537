"""Import the released PyTorch checkpoints (`mbv2_ca.pth`, MobileNeXt) into Flax variables.

The key mapping is derived from the Flax model itself: every Flax path such as
`features_2/conv_6/conv1/kernel` names exactly one PyTorch key (`features.2.conv.6.conv1.weight`),
so every model and width converts with the same rule and mismatches are reported precisely.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ca_flax.models.initializers import abstract_variables
from ca_flax.models.registry import create_model, list_models, model_family

WRAPPER_KEYS = ("state_dict", "model")
EMA_KEY = "state_dict_ema"
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_STATS_TO_TORCH = {"mean": "running_mean", "var": "running_var"}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file, key or shape."""


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_torch_state_dict(path: str | Path, ema: bool = False) -> dict[str, np.ndarray]:
    """Load a checkpoint safely (`weights_only=True`), unwrap it and strip `module.` prefixes.

    Returns float arrays keyed like the released state_dict; `num_batches_tracked` is dropped.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"{path}: refused to load: not a plain weights file (weights_only=True): {first}"
        ) from None
    except Exception as e:  # torch raises RuntimeError/EOFError/... for damaged archives
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{path}: unreadable or truncated checkpoint: {first}") from None
    state = _unwrap(obj, ema, path)
    out = {}
    for raw_key, value in state.items():
        key = re.sub(r"^(module\.)+", "", raw_key)  # DataParallel / DDP wrappers, nested too
        if key.endswith("num_batches_tracked"):
            continue
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: key {key!r} holds {type(value).__name__}, not a tensor")
        if key in out:
            raise ConversionError(f"{path}: key {key!r} appears twice (as {raw_key!r} too)")
        array = value.detach().to(torch.float32).numpy()
        finite = np.isfinite(array)
        if not finite.all():
            raise ConversionError(
                f"{path}: key {key!r} holds {finite.size - finite.sum()} NaN/inf values"
            )
        out[key] = array
    return out


def _unwrap(obj: Any, ema: bool, path: Path) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a state_dict (dict), found {type(obj).__name__}")
    if ema:
        if EMA_KEY not in obj:
            raise ConversionError(f"{path}: --ema asked for {EMA_KEY!r}, which is not in the file")
        return obj[EMA_KEY]
    for key in WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], dict):
            return obj[key]
    return obj


def flax_to_torch_key(path: tuple[str, ...]) -> str:
    """`('features_2', 'conv_6', 'conv1', 'kernel')` -> `'features.2.conv.6.conv1.weight'`."""
    *modules, leaf = path
    parts = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    return ".".join(parts + [_LEAF_TO_TORCH.get(leaf) or _STATS_TO_TORCH[leaf]])


def to_flax_array(value: np.ndarray, flax_ndim: int) -> np.ndarray:
    """Conv OIHW -> HWIO (depthwise (C,1,3,3) -> (3,3,1,C)), Linear (out,in) -> (in,out)."""
    if flax_ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if flax_ndim == 2:
        return value.T
    return value


def torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(flax_shape) == 4:
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if len(flax_shape) == 2:
        return tuple(reversed(flax_shape))
    return tuple(flax_shape)


def expected_layout(name: str, **model_kwargs: Any) -> dict[str, tuple[str, tuple, tuple]]:
    """torch key -> (collection, flax path, flax shape) for model `name`, without computing it."""
    model = create_model(name, **model_kwargs)
    shapes = abstract_variables(model)
    layout = {}
    for collection in ("params", "batch_stats"):
        flat = jax.tree_util.tree_flatten_with_path(shapes[collection])[0]
        for keypath, leaf in flat:
            path = tuple(k.key for k in keypath)
            layout[flax_to_torch_key(path)] = (collection, path, tuple(leaf.shape))
    return layout


def _summarise(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def _guess_model(state: dict[str, np.ndarray], model_kwargs: dict[str, Any]) -> str | None:
    for candidate in list_models():
        layout = expected_layout(candidate, **model_kwargs)
        if set(layout) == set(state) and all(
            torch_shape(shape) == state[k].shape for k, (_, _, shape) in layout.items()
        ):
            return candidate
    return None


def _check_layout(
    state: dict[str, np.ndarray], name: str, layout: dict, model_kwargs: dict, source: str
) -> None:
    missing = [k for k in layout if k not in state]
    unexpected = [k for k in state if k not in layout]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing keys: {_summarise(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_summarise(unexpected)}")
        hint = _family_hint(state, name, model_kwargs)
        raise ConversionError(f"{source}: does not fit model {name!r}: {'; '.join(problems)}{hint}")
    for key, (_, _, shape) in layout.items():
        if state[key].shape != torch_shape(shape):
            raise ConversionError(
                f"{source}: key {key!r} has shape {tuple(state[key].shape)}, model {name!r} "
                f"expects {torch_shape(shape)} (check {_shape_flag(key)})"
            )


def _shape_flag(key: str) -> str:
    """The CLI flag that sets the shape of the released checkpoint's `key`."""
    return "--num-classes" if key.startswith("classifier") else "--width-mult"


def _family_hint(state: dict[str, np.ndarray], name: str, model_kwargs: dict) -> str:
    guess = _guess_model(state, model_kwargs)
    if guess is not None:
        family = model_family(guess)
        if family != model_family(name):
            return f". This is a {family} checkpoint: it matches model {guess!r}"
        return f". It matches model {guess!r}"
    is_mobilenext = (
        any(k.startswith("features.20.") for k in state) and "conv.0.weight" not in state
    )
    family = "mobilenext" if is_mobilenext else "mobilenetv2"
    if family != model_family(name):
        return f". This looks like a {family} checkpoint, not {model_family(name)}"
    return ""


def convert_state_dict(
    state: dict[str, np.ndarray], name: str, source: str = "checkpoint", **model_kwargs: Any
) -> dict[str, Any]:
    """Map a (cleaned) PyTorch state_dict onto model `name`: `{'params', 'batch_stats'}`."""
    layout = expected_layout(name, **model_kwargs)
    _check_layout(state, name, layout, model_kwargs, source)
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for key, (collection, path, shape) in layout.items():
        node = variables[collection]
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jnp.asarray(to_flax_array(state[key], len(shape)))
    return variables


def load_torch_checkpoint(
    path: str | Path, name: str, ema: bool = False, **model_kwargs: Any
) -> dict[str, Any]:
    """Read a released PyTorch checkpoint as Flax variables for `create_model(name, **kwargs)`."""
    if name not in list_models():
        raise ConversionError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    state = read_torch_state_dict(path, ema=ema)
    return convert_state_dict(state, name, source=str(path), **model_kwargs)
