"""`make_inference_fn(model, variables)`: the model's inference through the CPU backend.

The network's body runs as `Stage`s (`fusion`), through ca_flax's kernels where they are
built, cache-blocked (`blocking`), the batch split over the process's devices (`spread`: on
a CPU, one device per core with `use_cpu_cores`). Where the backend cannot run a model (another
family, a dtype other than float32, a backend other than the CPU) it says so once and runs the
plain model: `jax.jit(model.apply)` over the same devices.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ca_flax.cpu import kernels
from ca_flax.cpu.blocking import CPU_BLOCK_MB, Blocked
from ca_flax.cpu.fusion import Stage, block_stage, sub
from ca_flax.cpu.spread import SpreadFunction, spread_over_devices
from ca_flax.models.mobilenetv2 import MobileNetV2
from ca_flax.models.mobilenext import MobileNeXt

# MobileNeXt holds two wide tensors per block, so its chunks get a smaller budget
# (docs/cpu_backend.md).
FAMILY_BLOCK_MB = {MobileNetV2: CPU_BLOCK_MB, MobileNeXt: 2.0}
_said: set[str] = set()


def _say_once(reason: str) -> None:
    if reason not in _said:
        _said.add(reason)
        warnings.warn(f"ca_flax.cpu: {reason}; running the plain model", stacklevel=3)


@dataclass(frozen=True, eq=False)
class Plan:
    """A classifier's inference as the backend runs it: the body's stages (blocked), then
    global pooling and the linear classifier. `variables` is what `__call__` takes."""

    body: Blocked
    variables: dict[str, Any]

    def __call__(self, variables: dict[str, Any], images: jax.Array) -> jax.Array:
        x = self.body(variables["stages"], images.astype(jnp.float32))
        x = jnp.mean(x, axis=(1, 2))
        head = variables["head"]
        return jnp.dot(x, head["kernel"]) + head["bias"]


def why_not(model: nn.Module) -> str | None:
    """Why the backend cannot run `model` here, or None when it can."""
    if jax.default_backend() != "cpu":
        return f"the default backend is {jax.default_backend()}, not the CPU"
    if type(model) not in FAMILY_BLOCK_MB:
        return f"it has no plan for {type(model).__name__}"
    if jnp.dtype(model.dtype) != jnp.float32:
        return f"its plans are float32 and the model computes in {jnp.dtype(model.dtype).name}"
    return None


def body_layers(bound: nn.Module) -> list[nn.Module]:
    """The blocks before global pooling of a bound classifier, in order."""
    layers = list(bound.features)
    return [*layers, bound.conv] if isinstance(bound, MobileNetV2) else layers


def make_plan(model: nn.Module, variables: dict[str, Any], block_mb: float | None = None) -> Plan:
    """`model`'s inference plan for `variables`: fused through the kernels where they are
    enabled (`kernels.enabled`), else the model's own layers; blocked in `block_mb` (None: the
    family's default, 0: off). Raises ValueError naming the reason where `why_not`."""
    reason = why_not(model)
    if reason is not None:
        raise ValueError(reason)
    bound = model.bind(variables)
    fused = kernels.enabled()
    stages: list[Stage] = [block_stage(layer, fused) for layer in body_layers(bound)]
    budget = FAMILY_BLOCK_MB[type(model)] if block_mb is None else block_mb
    stage_variables = [sub(variables, stage.name) for stage in stages]
    head = variables["params"]["classifier_1"]
    return Plan(Blocked(stages, budget, fused), {"stages": stage_variables, "head": head})


def make_inference_fn(
    model: nn.Module,
    variables: dict[str, Any],
    devices: Sequence[Any] | None = None,
    block_mb: float | None = None,
) -> SpreadFunction:
    """`images -> logits` (NHWC float32 images, inference-mode BatchNorm), the batch split
    over `devices` (default: this process's devices), each device blocked in cache and
    through the kernels. Any model the backend cannot run runs as `model.apply`, with one
    warning saying why."""
    reason = why_not(model)
    if reason is not None:
        _say_once(reason)
        return spread_over_devices(lambda v, x: model.apply(v, x, train=False), variables, devices)
    plan = make_plan(model, variables, block_mb)
    return spread_over_devices(plan, plan.variables, devices)
