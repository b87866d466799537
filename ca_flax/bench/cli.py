"""Benchmark ca_flax against the PyTorch reference of the same layout, in one interleaved run.

`python -m ca_flax.bench --models mobilenetv2_ca mobilenext --batch-sizes 16 --modes infer train`
times inference and a full training step (forward, backward, SGD update, BatchNorm update) for
ca_flax (jit) and PyTorch (eager, channels_last, torch.compile, AMP on GPU) in A B A B order,
reports median images/s and ratios, compile time and memory, achieved GFLOP/s (the model's FLOPs
from XLA's cost analysis) against what a large matmul reaches on the device and, for unblocked
ca_flax programs, achieved memory bandwidth (XLA's bytes-accessed estimate per step) against
the device's peak, and the tf.data JPEG pipeline's images/s per CPU core. Prints a table and
writes JSON. Run from a checkout: the PyTorch models come from tests/torch_reference.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ca_flax import cpu
from ca_flax.atomic import write_atomically
from ca_flax.bench.candidates import Candidate, jax_candidate, load_torch_reference, torch_candidate
from ca_flax.bench.profiling import profile_cases
from ca_flax.bench.roofline import (
    SPEC_BANDWIDTH_GB_S,
    matmul_peak_gflop_s,
    stream_bandwidth_gb_s,
)
from ca_flax.cpu import hugepages
from ca_flax.models.registry import list_models
from ca_flax.ops import FORMULATIONS


def time_interleaved(candidates: list[Candidate], repeats: int, iters: int) -> None:
    """A B A B ...: each round times `iters` steps of every candidate in turn, after one
    untimed step, so that no candidate pays for what the previous one left behind (PyTorch's
    spinning OpenMP threads, a cache full of another model, memory to page back in).
    The `iters` steps are dispatched back to back and waited for once, as train.py runs them
    (it never waits for a step), so host work overlaps device work on both sides."""
    for _ in range(repeats):
        for c in candidates:
            c.step()
            c.sync()
            start = time.perf_counter()
            for _ in range(iters):
                c.step()
            c.sync()
            c.times.append((time.perf_counter() - start) / iters)


def input_pipeline_rate(num_images: int = 256, batch: int = 64, size: int = 224) -> float:
    """tf.data JPEG decode + random-resized crop + flip + normalise: images/s per CPU core."""
    import tensorflow as tf
    from PIL import Image

    from ca_flax.training.imagenet import decode_and_random_crop, to_input

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(32):  # ImageNet-like JPEGs (500x375), reused cyclically
            path = os.path.join(tmp, f"{i}.jpg")
            pixels = rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
            files.append(path)
        jpegs = [tf.io.read_file(f) for f in files]

        def process(i: tf.Tensor) -> tf.Tensor:
            jpeg = tf.gather(tf.stack(jpegs), i % len(jpegs))
            image = decode_and_random_crop(jpeg, size, tf.stack([i, i]))
            return to_input(tf.image.flip_left_right(image))

        ds = tf.data.Dataset.range(num_images).map(process, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(batch).prefetch(2)
        for _ in ds.take(1):
            pass
        start = time.perf_counter()
        for _ in ds:
            pass
        rate = num_images / (time.perf_counter() - start)
    return rate / (os.cpu_count() or 1)


def summarise(
    case: dict[str, Any], candidates: list[Candidate], env: dict[str, Any]
) -> list[dict[str, Any]]:
    """Rows with img/s, ratio to the best PyTorch, GFLOP/s against the device's matmul peak and
    (ca_flax) bandwidth against its peak bandwidth.

    Every candidate runs the same model, so GFLOP/s uses the unblocked ca_flax FLOP count.
    """
    peak_gb_s, peak_gflop_s = env["peak_bandwidth_gb_s"], env["matmul_peak_gflop_s"]
    batch = case["batch"]
    torch_rates = [batch / statistics.median(c.times) for c in candidates if "torch" in c.impl]
    best_torch = max(torch_rates) if torch_rates else None
    flops = next((c.flops for c in candidates if c.flops), None)
    rows = []
    for c in candidates:
        step_s = statistics.median(c.times)
        gflops = flops / step_s / 1e9 if flops else None
        bandwidth = c.bytes_accessed / step_s / 1e9 if c.bytes_accessed else None
        rows.append(
            {
                **case,
                "impl": c.impl,
                "images_per_s": batch / step_s,
                "vs_best_torch": batch / step_s / best_torch if best_torch else None,
                "compile_s": c.compile_s,
                "memory_mb": c.memory_mb,
                "gflops_per_s": gflops,
                "flops_vs_peak": gflops / peak_gflop_s if gflops else None,
                "bandwidth_gb_s": bandwidth,
                "bandwidth_vs_peak": bandwidth / peak_gb_s if bandwidth and peak_gb_s else None,
            }
        )
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    header = f"{'model':<16}{'mode':<7}{'batch':>6}  {'impl':<42}{'img/s':>9}{'vs torch':>10}"
    header += f"{'compile s':>11}{'mem MB':>9}{'GFLOP/s':>9}{'mm peak':>9}{'GB/s':>8}"
    header += f"{'bw peak':>9}"
    lines = [header]
    for r in rows:
        lines.append(
            f"{r['model']:<16}{r['mode']:<7}{r['batch']:>6}  {r['impl']:<42}"
            f"{r['images_per_s']:>9.1f}{_fmt(r['vs_best_torch'], '.2f', 'x'):>10}"
            f"{r['compile_s']:>11.1f}{_fmt(r['memory_mb'], '.0f'):>9}"
            f"{_fmt(r['gflops_per_s'], '.0f'):>9}{_percent(r['flops_vs_peak']):>9}"
            f"{_fmt(r['bandwidth_gb_s'], '.0f'):>8}{_percent(r['bandwidth_vs_peak']):>9}"
        )
    return "\n".join(lines)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return f"{value:{spec}}{suffix}" if value else "-"


def _percent(fraction: float | None) -> str:
    return _fmt(fraction and 100 * fraction, ".0f", "%")


def environment(dtype: Any) -> dict[str, Any]:
    """Device, versions, date, XLA_FLAGS, the device's peak bandwidth (data sheet, and as
    measured) and the GFLOP/s a large matmul in `dtype` reaches on it."""
    import torch

    device = str(jax.devices()[0].device_kind)
    stream = stream_bandwidth_gb_s()
    spec = SPEC_BANDWIDTH_GB_S.get(device)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "device": device,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_devices": len(jax.devices("cpu")),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "huge_pages": hugepages.enabled(),
        "cpu_kernels": jax.default_backend() == "cpu" and cpu.kernels_available(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),  # they change XLA:CPU's kernels (README)
        "stream_bandwidth_gb_s": stream,
        "spec_bandwidth_gb_s": spec,
        # "bw peak" compares with the data sheet where known, else with the streaming kernel.
        "peak_bandwidth_gb_s": spec or stream,
        "matmul_peak_gflop_s": matmul_peak_gflop_s(dtype),
    }


def positive(kind: type) -> Callable[[str], Any]:
    """An argparse type: `kind(text)`, refused unless above zero."""

    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ca_flax.bench", description=__doc__)
    p.add_argument(
        "--models", nargs="+", choices=list_models(), default=["mobilenetv2_ca", "mobilenext"]
    )
    p.add_argument("--batch-sizes", nargs="+", type=positive(int), default=[16])
    p.add_argument("--size", type=positive(int), default=224)
    p.add_argument("--width-mult", type=positive(float), default=1.0)
    p.add_argument("--modes", nargs="+", choices=["infer", "train"], default=["infer", "train"])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument(
        "--torch-configs", nargs="+", default=["eager", "channels_last", "compile", "amp"],
        choices=["eager", "channels_last", "compile", "amp"],
    )  # fmt: skip
    p.add_argument(
        "--formulations", nargs="+", choices=FORMULATIONS,
        help="time ca_flax with each of these conv formulations (default: the backend's own)",
    )  # fmt: skip
    p.add_argument(
        "--repeats", type=positive(int), default=5, help="interleaved rounds (median taken)"
    )
    p.add_argument("--iters", type=positive(int), default=3, help="steps per candidate per round")
    p.add_argument(
        "--cpu-devices", type=positive(int), default=cpu.available_cores(),
        help="on CPU, also time inference spread over this many CPU devices, one per core "
        "(default: the cores available; 1: off)",
    )  # fmt: skip
    p.add_argument("--skip-input-pipeline", action="store_true")
    p.add_argument(
        "--profile", type=Path, metavar="DIR",
        help="after timing, trace 2 steps of every candidate into DIR and print kernel summaries",
    )  # fmt: skip
    p.add_argument("--json", default="bench.json", help="where to write the results")
    args = p.parse_args(argv)
    if not Path(args.json).absolute().parent.is_dir():
        p.error(f"--json {args.json}: its directory does not exist")
    return args


def jax_candidates(name: str, mode: str, batch: int, args: argparse.Namespace) -> list[Candidate]:
    """ca_flax in each requested conv formulation, plus unblocked inference (XLA's loops) where
    it blocks, inference spread over the CPU devices where there are several, and that without
    ca_flax's CPU kernels (XLA's loops) where they run."""
    dtype = jnp.dtype(args.dtype)
    shape = (name, mode, batch, args.size, dtype, args.width_mult)
    candidates = [
        jax_candidate(*shape, formulation=formulation)
        for formulation in args.formulations or [None]
    ]
    cpu_kernels_here = jax.default_backend() == "cpu" and cpu.kernels_available()
    if (
        mode == "infer" and jax.default_backend() == "cpu"
    ):  # XLA's own program: no blocking, no kernel
        # (XLA's cost analysis, the FLOP count for every row, cannot see into a kernel call).
        candidates.append(jax_candidate(*shape, block_mb=0.0, kernels=False))
    if mode == "train" and cpu_kernels_here:  # what the kernel gradient gains; XLA's count
        candidates.append(jax_candidate(*shape, kernels=False))
    devices = jax.local_device_count()
    cpu_inference = mode == "infer" and jax.default_backend() == "cpu"
    if cpu_inference and devices > 1:
        candidates.append(jax_candidate(*shape, devices=devices))
    if cpu_inference and cpu_kernels_here:  # what the CPU kernels gain, on every core
        candidates.append(jax_candidate(*shape, devices=devices, kernels=False))
    return candidates


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cpu.use_cpu_cores(args.cpu_devices)  # before JAX starts: fixes the CPU device count
    # One process holds both frameworks: leave PyTorch half of a GPU (JAX takes 75% by default).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    ref = load_torch_reference()
    env = environment(jnp.dtype(args.dtype))
    print(f"{env['device']}: streaming bandwidth {env['stream_bandwidth_gb_s']:.0f} GB/s, "
          f"peak used {env['peak_bandwidth_gb_s']:.0f} GB/s, "
          f"{args.dtype} matmul {env['matmul_peak_gflop_s']:.0f} GFLOP/s, "
          f"malloc huge pages {'on' if env['huge_pages'] else 'off'}")  # fmt: skip
    rows, cases = [], []  # cases kept for --profile only: they hold compiled steps and state
    for name in args.models:
        for mode in args.modes:
            for batch in args.batch_sizes:
                case = {"model": name, "mode": mode, "batch": batch, "size": args.size,
                        "width": args.width_mult}  # fmt: skip
                print(f"{name} {mode} batch {batch}: compiling ...", flush=True)
                candidates = jax_candidates(name, mode, batch, args)
                for config in args.torch_configs:
                    c = torch_candidate(ref, name, mode, batch, args.size, config, args.width_mult)
                    if c is not None:
                        candidates.append(c)
                time_interleaved(candidates, args.repeats, args.iters)
                if args.profile:
                    cases.append((f"{name}_{mode}_{batch}", candidates))
                rows.extend(summarise(case, candidates, env))
                print(format_rows(rows[-len(candidates) :]), flush=True)
                write_json(args.json, {"environment": env, "results": rows})  # so far
    if args.profile:
        profile_cases(cases, args.profile)
    result = {"environment": env, "results": rows}
    if not args.skip_input_pipeline:
        result["input_pipeline_images_per_s_per_core"] = input_pipeline_rate(size=args.size)
        print(f"tf.data JPEG pipeline: {result['input_pipeline_images_per_s_per_core']:.0f} "
              "images/s per CPU core")  # fmt: skip
    print("\n" + format_rows(rows))
    write_json(args.json, result)
    print(f"wrote {args.json}")


def write_json(path: str, result: dict[str, Any]) -> None:
    """Write `result` to `path` through a temporary file, so a killed run leaves a whole file."""
    text = json.dumps(result, indent=2, default=str) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text), overwrite=True)
