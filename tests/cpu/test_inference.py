"""Inference spread over CPU devices (`ca_flax.cpu.make_inference_fn`): one device per core,
the plain model's outputs and those of the same plan on one device."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.helpers import REPO

SPREAD_OVER_TWO_CPU_DEVICES = textwrap.dedent(
    """
    import jax, numpy as np
    from ca_flax import cpu
    from ca_flax.cpu.spread import CPU_COMPILER_OPTIONS
    assert cpu.use_cpu_cores(2)
    import ca_flax
    from ca_flax.cpu.training import kernels_apply_to_training
    from tests.helpers.tiny_models import random_variables
    assert jax.device_count() == 2, jax.devices()
    assert not cpu.use_cpu_cores(3)  # JAX has started: its devices stay
    assert not kernels_apply_to_training(jax.device_count())  # a kernel call cannot split a sharded batch
    rng = np.random.default_rng(0)
    for name in ("mobilenetv2_ca", "mobilenext_ca"):
        model = ca_flax.create_model(name, width_mult=0.35, num_classes=10)
        variables = random_variables(model)
        # A budget this small blocks each device's share in chunks of one or two images.
        spread = cpu.make_inference_fn(model, variables, block_mb=0.03)
        assert all(len(v.sharding.device_set) == 2 for v in jax.tree.leaves(spread.variables))
        # The same plan on one device (512-bit loops there too: vector width moves float32 sums).
        plan = cpu.make_plan(model, variables, block_mb=0.03)
        one_device = jax.jit(plan, compiler_options=CPU_COMPILER_OPTIONS)
        for batch in (8, 5, 1):  # odd batches are padded for the call, padding dropped
            x = rng.standard_normal((batch, 32, 32, 3)).astype(np.float32)
            out = spread(x)
            assert out.shape == (batch, 10), out.shape
            if batch == 8:
                assert len(out.sharding.device_set) == 2, out.sharding
                want = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
                np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
                # XLA's loops, without the kernels: the blocked loops' outputs start as zeros.
                with cpu.use_kernels(False):
                    bare = cpu.make_inference_fn(model, variables, block_mb=0.03)
                text = bare.jitted.lower(bare.variables, x).as_text()
                assert "ca_flax_" not in text and "stablehlo.while" in text
                np.testing.assert_allclose(bare(x), want, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(out, one_device(plan.variables, x), rtol=1e-5, atol=1e-6)
    print("spread ok")
    """
)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    environ.update(env, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))  # for tests.helpers
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ, cwd=REPO
    )


def test_two_cpu_devices_give_the_models_and_the_single_device_logits():
    result = run_python(SPREAD_OVER_TWO_CPU_DEVICES)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "spread ok" in result.stdout


def test_a_device_count_set_by_the_user_is_kept():
    code = "import jax\nfrom ca_flax.cpu import use_cpu_cores\n"
    code += "print(use_cpu_cores(2), jax.device_count())"
    for env in ({"XLA_FLAGS": "--xla_force_host_platform_device_count=3"},
                {"JAX_NUM_CPU_DEVICES": "3"}):  # fmt: skip
        result = run_python(code, **env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.split() == ["False", "3"]
