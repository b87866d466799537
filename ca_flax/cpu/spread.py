"""Inference spread over devices: each device runs the model on its own share of the batch.

XLA:CPU runs one device's program across cores poorly for these networks (many small
fusions). With one CPU device per core (`use_cpu_cores`, before JAX's first computation) and
the batch split over them, each core runs its own images through the same program (on CPU with
512-bit loops), nearly as fast as one core alone (measurements: docs/cpu_backend.md). On
accelerators it is plain data-parallel inference.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ca_flax.sharding import batch_split, data_mesh, replicated

# XLA:CPU vectorises loops 256 bits wide by default; on AVX-512 cores 512-bit loops ran spread
# inference faster, with the same logits (docs/cpu_backend.md).
CPU_COMPILER_OPTIONS = {"xla_cpu_prefer_vector_width": 512}


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def use_cpu_cores(count: int | None = None) -> bool:
    """Ask JAX for one CPU device per available core (or `count`); True if that took effect.

    Only possible before JAX's first computation: once JAX has started, its devices stay (and
    this returns False). A device count the user set (`--xla_force_host_platform_device_count`
    in XLA_FLAGS, or JAX_NUM_CPU_DEVICES) is kept as well.
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return False
    if "JAX_NUM_CPU_DEVICES" in os.environ:
        return False
    try:
        jax.config.update("jax_num_cpu_devices", count or available_cores())
    except RuntimeError:  # "should be updated before backends are initialized"
        return False
    return True


@dataclass(frozen=True)
class SpreadFunction:
    """`images -> jitted(variables, images)`, the images' batch split over `split`'s devices."""

    jitted: Callable[
        [Any, jax.Array], jax.Array
    ]  # compile it ahead with `.lower(variables, images)`
    variables: Any  # replicated: one copy per device
    split: NamedSharding  # the images' sharding: batch dimension over the devices

    def __call__(self, images: jax.Array) -> jax.Array:
        """Outputs for `images`; a batch that is not a multiple of the device count is padded
        with zeros for the call and the padding dropped from the result."""
        n = images.shape[0]
        pad = -n % self.split.mesh.size
        if pad:
            images = jnp.concatenate([images, jnp.zeros((pad, *images.shape[1:]), images.dtype)])
        out = self.jitted(self.variables, jax.device_put(images, self.split))
        return out[:n] if pad else out


def spread_over_devices(
    fn: Callable[[Any, jax.Array], jax.Array], variables: Any, devices: Sequence[Any] | None = None
) -> SpreadFunction:
    """`jit(fn)` over the batch split across `devices` (default: this process's devices), each
    device computing `fn` on its own images with its own copy of `variables` (placed here,
    once); `fn` must treat images independently."""
    mesh = data_mesh(devices or jax.local_devices())
    copies, split = replicated(mesh), batch_split(mesh)
    per_device = jax.shard_map(fn, mesh=mesh, in_specs=(P(), split.spec), out_specs=split.spec)
    on_cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
    jitted = jax.jit(
        per_device,
        in_shardings=(copies, split),
        out_shardings=split,
        compiler_options=CPU_COMPILER_OPTIONS if on_cpu else None,
    )
    return SpreadFunction(jitted, jax.device_put(variables, copies), split)
