"""Kernel summaries read real GPU traces: excerpts of the H200 bench run of 2026-11-26
(mobilenetv2_ca train step: jax.profiler Perfetto JSON, torch.profiler Chrome JSON), with
host events beside the kernels that must not be counted."""

from __future__ import annotations

import pytest

from ca_flax.bench.profiling import device_kernels, kernel_group, kernel_summary
from tests.helpers import DATA

TRACES = DATA / "h200_traces"


def test_jax_trace_counts_only_the_gpu_process():
    kernels = device_kernels(TRACES / "ca_flax")
    assert len(kernels) == 24  # the excerpt's device kernels; its 10 host events are left out
    assert sum(micros for _, micros in kernels) == pytest.approx(1330.533)
    summary = kernel_summary(kernels, steps=2)
    assert summary.splitlines()[0].strip() == "0.7 ms of kernels per step, 12 kernels per step"
    top = summary.splitlines()[1].split()
    assert top == ["0.45", "ms", "x3", "conv2d_c1_k1_nhwc_specialized"]  # cuDNN's depthwise
    assert " input_reduce_fusion" in summary  # XLA's numbered fusions grouped by kind


def test_torch_trace_counts_only_kernels():
    kernels = device_kernels(TRACES / "torch_amp")
    assert len(kernels) == 20  # its cpu_op and cuda_runtime events are left out
    names = {kernel_group(name) for name, _ in kernels}
    assert "conv2d_c1_k1_nhwc_specialized" in names  # cuDNN's depthwise, as in ca_flax's trace
    assert not any(name.startswith(("aten::", "cuda")) for name in names)


def test_kernel_groups_and_empty_traces(tmp_path):
    assert kernel_group("input_reduce_fusion_278") == "input_reduce_fusion"
    assert kernel_group("loop_add_fusion.12") == "loop_add_fusion"
    assert kernel_group("void convolve_common_engine_float_NHWC<__nv_bfloat16, 128>") == (
        "void convolve_common_engine_float_NHWC"
    )
    assert kernel_group("wgrad2d_c1_k1_nhwc_reduce") == "wgrad2d_c1_k1_nhwc_reduce"
    assert device_kernels(tmp_path) == []
    assert "no device kernels" in kernel_summary([], steps=2)
