"""Which written form the convolutions take: the one choice that differs by backend.

- ``"lax_conv"``: lax convolutions, which XLA hands to cuDNN on GPU and to the TPU's
  convolution units; TFLite export uses it too (its native ops). Train-mode BatchNorm uses a
  written-out gradient (`batch_norm.fused_batch_norm`).
- ``"shifted_windows"``: a depthwise 3x3 as nine shifted multiply-adds of the padded input,
  a 1x1 as a matmul over channels, the stem as one matmul over its nine windows (im2col): the
  CPU's fastest form. BatchNorm's gradient is autodiff's, which XLA:CPU fuses into the loops.

Both take the same parameters. Outside any `conv_formulation` block each backend uses its own
default (`BACKEND_DEFAULT`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

FORMULATIONS = ("lax_conv", "shifted_windows")
BACKEND_DEFAULT = {"cpu": "shifted_windows", "gpu": "lax_conv", "tpu": "lax_conv"}
_chosen: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "ca_flax_conv_formulation", default=None
)


@contextlib.contextmanager
def conv_formulation(name: str) -> Iterator[None]:
    """Trace the convolutions of any ca_flax model as `name` (one of `FORMULATIONS`) in this
    block. It applies when a function is traced, so jit a fresh function inside the block."""
    if name not in FORMULATIONS:
        raise ValueError(f"unknown conv formulation {name!r}; choose one of {FORMULATIONS}")
    token = _chosen.set(name)
    try:
        yield
    finally:
        _chosen.reset(token)


def active_formulation() -> str:
    """The formulation set by `conv_formulation`, else the default backend's (`BACKEND_DEFAULT`)."""
    chosen = _chosen.get()
    if chosen is not None:
        return chosen
    return BACKEND_DEFAULT.get(jax.default_backend(), "shifted_windows")
