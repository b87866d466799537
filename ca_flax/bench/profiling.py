"""Where a benchmark candidate's time goes: trace a few steps, then sum the device kernels.

ca_flax steps are traced with `jax.profiler` (Perfetto JSON), PyTorch steps with
`torch.profiler` (Chrome JSON); both list each GPU kernel with its duration. The summary groups
kernels by name (XLA's `input_reduce_fusion.17` counts as `input_reduce_fusion`) so the two
frameworks' costs can be read side by side. On a CPU-only host no device kernels are recorded.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path
from typing import Any

import jax

Kernel = tuple[str, float]  # (name, microseconds)


def trace_steps(candidate: Any, directory: Path, steps: int) -> None:
    """Run a benchmark candidate's `step` `steps` times, then its `sync`, under its framework's
    profiler (PyTorch for `torch ...` labels), writing a trace under `directory`."""
    if candidate.impl.startswith("torch"):
        import torch

        with torch.profiler.profile() as prof:
            for _ in range(steps):
                candidate.step()
            candidate.sync()
        directory.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(directory / "trace.json"))
    else:
        with jax.profiler.trace(str(directory), create_perfetto_trace=True):
            for _ in range(steps):
                candidate.step()
            candidate.sync()


def _load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def device_kernels(directory: Path) -> list[Kernel]:
    """GPU kernels in the trace under `directory`: Perfetto events of a `/device:` process
    (jax), or Chrome events of category `kernel` (PyTorch)."""
    kernels: list[Kernel] = []
    for path in sorted(directory.rglob("perfetto_trace.json.gz")):
        events = _load(path)
        devices = {
            e["pid"]
            for e in events
            if e.get("ph") == "M"
            and e.get("name") == "process_name"
            and e["args"]["name"].startswith("/device:")
        }
        kernels += [
            (e["name"], e["dur"]) for e in events if e.get("ph") == "X" and e["pid"] in devices
        ]
    for path in sorted(directory.rglob("trace.json")):
        events = _load(path)
        kernels += [(e["name"], e["dur"]) for e in events if e.get("cat") == "kernel"]
    return kernels


def kernel_group(name: str) -> str:
    """A kernel's name without XLA's instance suffix and template arguments, at most 60 chars."""
    return re.sub(r"[._]\d+$", "", name.split("<")[0])[:60]


def kernel_summary(kernels: list[Kernel], steps: int, top: int = 8) -> str:
    """Kernel time and count per step, then the `top` kernel groups by time."""
    if not kernels:
        return "    no device kernels recorded"
    total = collections.Counter()
    count = collections.Counter()
    for name, micros in kernels:
        group = kernel_group(name)
        total[group] += micros / steps
        count[group] += 1
    lines = [
        f"    {sum(total.values()) / 1e3:.1f} ms of kernels per step, "
        f"{len(kernels) // steps} kernels per step"
    ]
    for group, micros in total.most_common(top):
        lines.append(f"    {micros / 1e3:7.2f} ms  x{count[group] / steps:<4g} {group}")
    return "\n".join(lines)


def file_name(impl: str) -> str:
    """A candidate's label as a directory name: `ca_flax (bfloat16) xla convs` ->
    `ca_flax__bfloat16__xla_convs`."""
    return "".join(ch if ch.isalnum() else "_" for ch in impl)


def profile_cases(cases: list[tuple[str, list[Any]]], directory: Path, steps: int = 2) -> None:
    """Trace `steps` steps of every benchmark candidate (`.impl` label, `.step`, `.sync`) into
    `directory`/<case>/<impl> and print each one's kernel summary. All ca_flax traces come
    first: after torch.profiler had run, later jax.profiler traces held no GPU kernels (H200,
    torch 2.11, jax 0.11)."""
    jobs = [(case, c) for case, candidates in cases for c in candidates]
    jobs.sort(key=lambda job: job[1].impl.startswith("torch"))
    for case, c in jobs:
        path = directory / case / file_name(c.impl)
        try:
            trace_steps(c, path, steps)
        except Exception as e:  # a profiler missing on this host must not cost the timings
            print(f"{case} {c.impl}: profile failed: {type(e).__name__}: {str(e)[:120]}")
            continue
        print(f"{case} {c.impl}: kernels\n{kernel_summary(device_kernels(path), steps)}")
