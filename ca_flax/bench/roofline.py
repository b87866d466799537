"""What a device can do and what a compiled program costs, for the benchmark's roofline columns.

XLA's cost analysis gives a program's FLOPs and bytes accessed; a streaming kernel measures the
bandwidth the device actually sustains, beside the data-sheet figure where it is known, and a
large matmul the compute it sustains: together they roughly bound the images/s any
implementation of a model can reach on the device.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

# Memory bandwidth on the data sheet, GB/s, by jax `device_kind`.
SPEC_BANDWIDTH_GB_S = {
    "NVIDIA H100 80GB HBM3": 3350.0,
    "NVIDIA H100 PCIe": 2000.0,
    "NVIDIA H200": 4800.0,
    "NVIDIA A100-SXM4-80GB": 2039.0,
    "NVIDIA A100-SXM4-40GB": 1555.0,
}


def stream_bandwidth_gb_s(megabytes: int = 256, calls: int = 10, repeats: int = 3) -> float:
    """Best read+write bandwidth of a jitted `0.5 x + 1` over a buffer larger than any cache.

    The buffer is donated, so each call writes in place and no fresh memory is paged in;
    `calls` back-to-back calls are timed together, so a GPU's launch latency (0.1 ms against
    a 0.12 ms pass on an H200) does not count as memory time.
    """
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    scale = jax.jit(lambda v: v * 0.5 + 1.0, donate_argnums=0)
    x = scale(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            x = scale(x)
        x.block_until_ready()
        best = min(best, (time.perf_counter() - start) / calls)
    return 2 * x.nbytes / best / 1e9


def matmul_peak_gflop_s(
    dtype: Any = jnp.float32, size: int | None = None, repeats: int = 5
) -> float:
    """Best GFLOP/s of a jitted square matmul big enough to run at the device's compute peak.

    `size` defaults to 2048 on CPU (the best of 1024-4096 on the 2-core Zen 5 host) and 8192
    on accelerators; the matmul runs on the default device, as a one-device program does.
    """
    size = size or (2048 if jax.default_backend() == "cpu" else 8192)
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def xla_cost(compiled: Any) -> tuple[float | None, float | None]:
    """FLOPs and bytes accessed per call, as XLA's cost analysis estimates them."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return cost.get("flops"), cost.get("bytes accessed")
    except Exception:  # not every backend reports it
        return None, None


def xla_memory_mb(compiled: Any) -> float | None:
    """Arguments + outputs + temporaries of a compiled program, MiB, as XLA plans them."""
    try:
        m = compiled.memory_analysis()
        total = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
        return total / 2**20
    except Exception:  # not every backend reports it
        return None
