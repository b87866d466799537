"""The benchmark runs end to end and reports every candidate (no timings are asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ca_flax import bench
from ca_flax.bench.profiling import file_name


def test_bench_reports_flax_and_torch_for_each_mode(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(
        ["--models", "mobilenetv2_ca", "--batch-sizes", "2", "--size", "32", "--width-mult",
         "0.35", "--torch-configs", "eager", "channels_last", "--formulations", "shifted_windows", "lax_conv",
         "--repeats", "1", "--iters", "1", "--profile", str(tmp_path / "profile"),
         "--cpu-devices", "1", "--json", str(out)]
    )  # fmt: skip
    result = json.loads(out.read_text())
    rows = result["results"]
    impls = ("ca_flax (float32) shifted_windows convs", "ca_flax (float32) lax_conv convs", "torch eager",
             "torch channels_last")  # fmt: skip
    assert {(r["mode"], r["impl"]) for r in rows} == {
        (mode, impl) for mode in ("infer", "train") for impl in impls
    } | {
        ("infer", "ca_flax (float32) unblocked XLA loops"),  # on CPU, XLA's own program
        ("infer", "ca_flax (float32) XLA loops"),  # blocked, without the CPU kernel
        ("train", "ca_flax (float32) XLA loops"),  # without the kernel gradient
    }
    assert all(r["images_per_s"] > 0 and r["compile_s"] >= 0 for r in rows)
    assert max(r["vs_best_torch"] for r in rows if "torch" in r["impl"]) == 1.0
    assert result["input_pipeline_images_per_s_per_core"] > 0
    env = result["environment"]
    assert env["jax"] and env["stream_bandwidth_gb_s"] > 0 and env["cpu_kernels"]
    assert env["peak_bandwidth_gb_s"] == (
        env["spec_bandwidth_gb_s"] or env["stream_bandwidth_gb_s"]
    )
    # Roofline columns: every candidate gets the model's GFLOP/s, also as a fraction of the
    # device's matmul peak; the ca_flax programs XLA's cost analysis sees whole (no loop, no
    # kernel call) get XLA's bytes-accessed bandwidth against the peak bandwidth.
    assert env["matmul_peak_gflop_s"] > 0
    assert all(r["gflops_per_s"] > 0 for r in rows)
    assert all(
        r["flops_vs_peak"] == pytest.approx(r["gflops_per_s"] / env["matmul_peak_gflop_s"])
        for r in rows
    )
    counted = {(mode, "ca_flax (float32) lax_conv convs") for mode in ("infer", "train")} | {
        ("train", "ca_flax (float32) XLA loops"), ("infer", "ca_flax (float32) unblocked XLA loops")
    }  # fmt: skip
    seen = [r for r in rows if (r["mode"], r["impl"]) in counted]
    assert len(seen) == 4
    assert all(r["bandwidth_gb_s"] > 0 and r["bandwidth_vs_peak"] > 0 for r in seen)
    assert all(r["bandwidth_gb_s"] is None for r in rows if r not in seen)
    printed = capsys.readouterr().out
    assert "GFLOP/s" in printed and "mm peak" in printed and "float32 matmul" in printed
    # --profile: a trace per candidate (jax.profiler / torch.profiler), then its kernel summary
    # (a CPU host records no device kernels; tests/tools/test_profiling.py reads real GPU traces).
    traces = {p.parent.relative_to(tmp_path / "profile").parts[:2] for p in
              (tmp_path / "profile").rglob("*.json*")}  # fmt: skip
    assert traces == {(f"mobilenetv2_ca_{r['mode']}_2", file_name(r["impl"])) for r in rows}
    assert printed.count("no device kernels recorded") == len(rows)


# A flag the README suggests for one-device CPU inference; the bench records what it ran with.
XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_dot"


def test_bench_spreads_cpu_inference_over_one_device_per_core(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--models", "mobilenext", "--modes", "infer", "--batch-sizes", "4", "--size", "32",
            "--width-mult", "0.35", "--torch-configs", "eager", "--repeats", "1", "--iters", "1",
            "--skip-input-pipeline", "--cpu-devices", "2", "--json", str(out)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    result = subprocess.run(
        [sys.executable, "-m", "ca_flax.bench", *argv],
        capture_output=True, text=True,
        env={**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": XLA_FLAG},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["environment"]["cpu_devices"] == 2
    assert data["environment"]["xla_flags"] == XLA_FLAG  # recorded with the numbers it changes
    rates = {r["impl"]: r["images_per_s"] for r in data["results"]}
    assert set(rates) == {"ca_flax (float32)", "ca_flax (float32) unblocked XLA loops",
                          "ca_flax (float32) on 2 devices",
                          "ca_flax (float32) on 2 devices XLA loops", "torch eager"}  # fmt: skip
    assert all(rate > 0 for rate in rates.values())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--models", "resnet50"], "invalid choice: 'resnet50'"),
        (["--batch-sizes", "0"], "--batch-sizes: must be > 0"),
        (["--repeats", "0"], "--repeats: must be > 0"),
        (["--cpu-devices", "0"], "--cpu-devices: must be > 0"),
        (["--json", "/no/such/dir/b.json"], "its directory does not exist"),
    ],
)
def test_bad_arguments_fail_before_any_compile(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_compiled_torch_inference_is_frozen():
    """The torch.compile inference candidate runs with inductor freezing, PyTorch's inference
    setting (BatchNorm folded into the convolutions as constants), so it is not undersold."""
    from torch._dynamo.utils import counters

    from ca_flax.bench.candidates import load_torch_reference, torch_candidate

    counters.clear()
    candidate = torch_candidate(
        load_torch_reference(), "mobilenext", "infer", 2, 32, "compile", width=0.35
    )
    assert candidate is not None, "torch.compile unavailable here"
    assert counters["inductor"]["binary_folding"] > 0


def program_digests(batch: int) -> dict[str, str]:
    """`python -m ca_flax.bench.digest`'s digests for mobilenext at 32x32, by "model mode"."""
    result = subprocess.run(
        [sys.executable, "-m", "ca_flax.bench.digest", "--models", "mobilenext", "--batch", str(batch), "--size", "32"],
        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    return {f"{name} {mode}": digest for name, mode, digest in rows}


def test_program_digest_is_stable_across_processes_and_tells_programs_apart():
    """The GPU programs' digests (`python -m ca_flax.bench.digest`) say whether a change altered what a
    GPU measurement ran: equal in another process (no source locations or ids in them),
    different for another program (batch, or train against inference)."""
    first, again, other = program_digests(2), program_digests(2), program_digests(4)
    assert set(first) == {"mobilenext train", "mobilenext infer"}
    assert first == again
    assert len(set(first.values())) == 2
    assert not set(first.values()) & set(other.values())
