"""The model zoo: names users pass to `create_model`, and the keyword arguments behind them."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ca_flax.models.mobilenetv2 import MobileNetV2
from ca_flax.models.mobilenext import MobileNeXt

_MODELS: dict[str, tuple[type[nn.Module], str | None]] = {
    "mobilenetv2": (MobileNetV2, None),
    "mobilenetv2_se": (MobileNetV2, "se"),
    "mobilenetv2_cbam": (MobileNetV2, "cbam"),
    "mobilenetv2_ca": (MobileNetV2, "ca"),
    "mobilenext": (MobileNeXt, None),
    "mobilenext_se": (MobileNeXt, "se"),
    "mobilenext_ca": (MobileNeXt, "ca"),
}


def list_models() -> list[str]:
    """Names accepted by `create_model`."""
    return list(_MODELS)


def model_family(name: str) -> str:
    """'mobilenetv2' or 'mobilenext': the released layout a model name belongs to."""
    return _lookup(name)[0].__name__.lower()


def _lookup(name: str) -> tuple[type[nn.Module], str | None]:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(_MODELS)}")
    return _MODELS[name]


def create_model(
    name: str,
    *,
    num_classes: int = 1000,
    width_mult: float = 1.0,
    dtype: Any = jnp.float32,
    **kwargs: Any,
) -> nn.Module:
    """Build a model by name, e.g. `create_model('mobilenetv2_ca', width_mult=0.5)`.

    Extra keyword arguments (such as `dropout_rate`) go to the model class.
    """
    cls, attention = _lookup(name)
    return cls(
        num_classes=num_classes, width_mult=width_mult, attention=attention, dtype=dtype, **kwargs
    )
