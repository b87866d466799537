"""ca_flax's own CPU kernels (`ca_flax.cpu.kernels`): built with the system compiler, registered
with XLA, and the same numbers as float64 sums; their use inside whole models is in test_fusion."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ca_flax.cpu import kernels
from ca_flax.models.layers import relu6
from ca_flax.ops import im2col_conv3x3, windows_depthwise3x3
from tests.helpers import REPO


def test_kernels_build_and_register_here():
    """The machines this suite runs on have a C++ compiler: the kernels must build (a silent
    fallback to XLA's loops would leave CPU inference slower and the kernels untested)."""
    assert jax.default_backend() == "cpu"
    assert kernels.available()


def reference(x, kernel, mul, add, stride, relu6_out, input_affine, residual):  # noqa: ANN001, ANN201
    """The same layer from XLA's loops, in float64."""
    with jax.enable_x64():
        f64 = partial(jnp.asarray, dtype=jnp.float64)
        x = f64(x)
        if input_affine is not None:
            x = relu6(x * f64(input_affine[0]) + f64(input_affine[1]))
        y = windows_depthwise3x3(x, f64(kernel), stride) * f64(mul) + f64(add)
        y = relu6(y) if relu6_out else y
        return np.asarray(y if residual is None else y + f64(residual))


VARIANTS = {  # (ReLU6 after, BatchNorm + ReLU6 before, residual)
    "bn_relu6": (True, False, False),
    "bn": (False, False, False),
    "in_bn_relu6+bn_relu6": (True, True, False),
    "in_bn_relu6+bn+residual": (False, True, True),
    "bn_relu6+residual": (True, False, True),
}


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(
    "shape",
    [(2, 9, 13, 48), (1, 8, 8, 27), (3, 1, 5, 8), (1, 2, 1, 3), (2, 15, 6, 40)],
    ids=["32+16lanes", "16+8+3lanes", "one_row", "tiny", "32+8lanes"],
)
def test_depthwise_kernel_matches_xla_loops(shape, stride):
    """Every code path (groups of two 16-lane vectors, one, 8 lanes, single lanes, blocked and
    leftover columns, odd sizes, a one-pixel-wide image, several images) and every fused variant
    against float64 nine-tap sums."""
    rng = np.random.default_rng(sum(shape) + stride)
    c = shape[-1]
    x = rng.normal(0, 2, shape).astype(np.float32)
    kernel = rng.normal(0, 1, (3, 3, 1, c)).astype(np.float32)
    mul, add, in_mul, in_add = (rng.normal(0, 3, c).astype(np.float32) for _ in range(4))
    out_shape = (shape[0], (shape[1] - 1) // stride + 1, (shape[2] - 1) // stride + 1, c)
    res = rng.normal(0, 1, out_shape).astype(np.float32)
    for variant, (relu6_out, pre, with_residual) in VARIANTS.items():
        kwargs = {
            "input_affine": (in_mul, in_add) if pre else None,
            "residual": res if with_residual else None,
        }
        run = partial(kernels.depthwise3x3_affine, stride=stride, relu6=relu6_out, **kwargs)
        got = jax.jit(run)(x, kernel, mul, add)
        want = reference(x, kernel, mul, add, stride, relu6_out, **kwargs)
        assert got.shape == want.shape == out_shape and got.dtype == jnp.float32, variant
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=variant)
        if relu6_out and not with_residual and want.size >= 100:  # both ReLU6 bounds were hit
            assert 0 < np.mean(want == 0) < 1 and np.any(want == 6), variant
        if relu6_out and not with_residual:  # the output's row and column sums beside it
            assert_sums_match(jax.jit(partial(run, sums=True))(x, kernel, mul, add), got)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(
    ("shape", "channels"),
    [((2, 9, 19, 5), 48), ((1, 6, 7, 16), 27), ((1, 3, 1, 1), 8), ((1, 4, 14, 12), 16)],
    ids=["8+3px_32+16lanes", "7px_16+8+3lanes", "one_pixel_K1", "8+6px"],
)
def test_depthwise_kernel_with_expand_matches_xla_loops(shape, channels, stride):
    """The 1x1 conv inside the kernel (`expand`): every pixel step (8, then the 1-7 left) and
    lane group, with and without ReLU6 after and a residual, against float64 XLA loops."""
    rng = np.random.default_rng(sum(shape) + channels + stride)
    x = rng.normal(0, 1, shape).astype(np.float32)
    expand = rng.normal(0, 1, (shape[-1], channels)).astype(np.float32)
    kernel = rng.normal(0, 1, (3, 3, 1, channels)).astype(np.float32)
    mul, add, in_mul, in_add = (rng.normal(0, 2, channels).astype(np.float32) for _ in range(4))
    out_shape = (shape[0], (shape[1] - 1) // stride + 1, (shape[2] - 1) // stride + 1, channels)
    res = rng.normal(0, 1, out_shape).astype(np.float32)
    with jax.enable_x64():
        wide = np.asarray(jnp.dot(jnp.asarray(x, jnp.float64), jnp.asarray(expand, jnp.float64)))
    for relu6_out, residual in ((True, None), (False, res)):
        run = partial(
            kernels.depthwise3x3_affine, stride=stride, relu6=relu6_out,
            input_affine=(in_mul, in_add), residual=residual, expand=expand,
        )  # fmt: skip
        got = jax.jit(run)(x, kernel, mul, add)
        want = reference(wide, kernel, mul, add, stride, relu6_out, (in_mul, in_add), residual)
        assert got.shape == want.shape == out_shape and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=f"relu6={relu6_out}")
        if residual is None:
            assert_sums_match(jax.jit(partial(run, sums=True))(x, kernel, mul, add), got)
    pre = wide * in_mul + in_add
    assert np.any(pre < 0) and np.any(pre > 6)  # the input ReLU6 clipped on both sides


def assert_sums_match(outputs: tuple, y: jax.Array) -> None:
    """`sums=True` gives the same output and its sums over each row and each column."""
    got, row_sums, col_sums = map(np.asarray, outputs)
    y = np.asarray(y)
    np.testing.assert_allclose(got, y, rtol=1e-6, atol=1e-5)
    n, h, w, c = y.shape
    assert row_sums.shape == (n, h, c) and col_sums.shape == (n, w, c)
    np.testing.assert_allclose(row_sums, y.sum(2, dtype=np.float64), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(col_sums, y.sum(1, dtype=np.float64), rtol=1e-5, atol=1e-4)


def test_sums_need_relu6_and_no_residual():
    """Row and column sums are for Coordinate Attention's input only: refused otherwise."""
    x, kernel, vec = jnp.ones((1, 4, 4, 8)), jnp.ones((3, 3, 1, 8)), jnp.ones(8)
    with pytest.raises(ValueError, match="sums are for a layer with ReLU6 and no residual"):
        kernels.depthwise3x3_affine(x, kernel, vec, vec, 1, False, sums=True)
    with pytest.raises(ValueError, match="sums are for a layer with ReLU6 and no residual"):
        kernels.depthwise3x3_affine(x, kernel, vec, vec, 1, True, residual=x, sums=True)


def test_expand_needs_its_batchnorm_and_the_right_shape():
    """`expand` without the input BatchNorm + ReLU6, or of another shape, is refused by name."""
    x, kernel, vec = jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 1, 8)), jnp.ones(8)
    with pytest.raises(ValueError, match="expand must be"):
        kernels.depthwise3x3_affine(x, kernel, vec, vec, 1, True, expand=jnp.ones((3, 8)))
    with pytest.raises(ValueError, match=r"\(3, 8\)"):
        kernels.depthwise3x3_affine(
            x, kernel, vec, vec, 1, True, input_affine=(vec, vec), expand=jnp.ones((4, 8))
        )


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(
    ("shape", "out_channels"),
    [((2, 9, 37, 3), 32), ((1, 7, 13, 5), 27), ((1, 1, 2, 1), 48), ((1, 3, 1, 3), 16)],
    ids=["stem_8+4+1px", "16+8+3lanes", "tiny_32+16", "one_pixel_wide"],
)
def test_conv3x3_kernel_matches_xla(shape, out_channels, stride):
    """The dense 3x3 kernel (the stem) on every code path (32/16/8/1-lane output groups, 8-, 4-
    and 1-pixel steps, odd sizes, with and without ReLU6) against a float64 convolution."""
    rng = np.random.default_rng(sum(shape) + out_channels + stride)
    x = rng.normal(0, 2, shape).astype(np.float32)
    kernel = rng.normal(0, 1, (3, 3, shape[-1], out_channels)).astype(np.float32)
    mul, add = (rng.normal(0, 1, out_channels).astype(np.float32) for _ in range(2))
    with jax.enable_x64():
        f64 = partial(jnp.asarray, dtype=jnp.float64)
        linear = np.asarray(im2col_conv3x3(f64(x), f64(kernel), stride) * f64(mul) + f64(add))
    for relu6_out in (True, False):
        run = partial(kernels.conv3x3_affine, stride=stride, relu6=relu6_out)
        got = jax.jit(run)(x, kernel, mul, add)
        want = np.clip(linear, 0, 6) if relu6_out else linear
        assert got.shape == want.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=f"relu6={relu6_out}")
    if linear.size >= 100:  # both bounds of the ReLU6 were exercised
        assert np.any(linear < 0) and np.any(linear > 6)


def test_conv3x3_kernel_reads_a_chunk_of_the_batch_in_place():
    """Given `count`, the dense kernel computes images x[first : first + count] from the whole
    batch, `first` traced and clamped like lax.dynamic_slice; gradients reach the right images."""
    rng = np.random.default_rng(3)
    x = rng.normal(0, 2, (5, 9, 10, 3)).astype(np.float32)
    kernel = rng.normal(0, 1, (3, 3, 3, 16)).astype(np.float32)
    mul, add = (rng.normal(0, 1, 16).astype(np.float32) for _ in range(2))
    run = partial(kernels.conv3x3_affine, stride=2, relu6=True)
    whole = jax.jit(run)(x, kernel, mul, add)

    @jax.jit
    def chunk(x, first):  # noqa: ANN001, ANN202
        return run(x, kernel, mul, add, first=first, count=2)

    for first, start in [(0, 0), (2, 2), (3, 3), (4, 3), (-1, 0)]:  # the last two clamped
        np.testing.assert_array_equal(chunk(x, first), whole[start : start + 2])
    grad = np.asarray(jax.grad(lambda x: jnp.sum(chunk(x, 1) ** 2))(x))
    assert np.all(grad[[0, 3, 4]] == 0) and np.all(np.abs(grad[1:3]).sum((1, 2, 3)) > 0)
    with pytest.raises(ValueError, match="count=6: x holds 5 images"):
        run(x, kernel, mul, add, count=6)


@pytest.mark.parametrize("shape", [(2, 3, 5, 48), (1, 4, 2, 27), (1, 1, 1, 1)])
def test_coordinate_gate_kernel_is_the_product_and_leaves_a_live_input_alone(shape):
    """`coordinate_gate` equals `x * a_h * a_w` bitwise on the 16-, 8- and 1-lane paths; it
    writes over its input's buffer only where the input is not used after it (XLA copies it
    otherwise), so a caller still reading `x` sees it unchanged."""
    rng = np.random.default_rng(sum(shape))
    n, h, w, c = shape
    x = rng.normal(0, 1, shape).astype(np.float32)
    a_h = rng.uniform(0, 1, (n, h, 1, c)).astype(np.float32)
    a_w = rng.uniform(0, 1, (n, 1, w, c)).astype(np.float32)
    gated, same = jax.jit(lambda *a: (kernels.coordinate_gate(*a), a[0] + 0))(x, a_h, a_w)
    np.testing.assert_array_equal(gated, x * a_h * a_w)
    np.testing.assert_array_equal(same, x)
    only = jax.jit(lambda x, a_h, a_w: kernels.coordinate_gate(x * 2, a_h, a_w))(x, a_h, a_w)
    np.testing.assert_array_equal(only, (x * 2) * a_h * a_w)


def test_coordinate_gate_kernel_refuses_gates_of_another_shape():
    """Gates that do not match the input are refused with the shapes it expects."""
    x = jnp.ones((1, 4, 5, 8))
    with pytest.raises(Exception, match=r"a_h must be \(N, H, 1, C\)"):
        jax.jit(kernels.coordinate_gate)(x, jnp.ones((1, 5, 1, 8)), jnp.ones((1, 1, 5, 8)))


def test_build_is_cached_per_machine_and_failures_leave_nothing(tmp_path, monkeypatch):
    """A build goes to the cache folder once (the second call reuses the file) and clears what
    killed builds left; a compiler that fails raises with what it printed and leaves no file
    behind; a missing one is named."""
    monkeypatch.setenv("CA_FLAX_KERNEL_CACHE", str(tmp_path / "cache"))
    # What a killed build leaves (a day old) is cleared; one that may still be building stays.
    (tmp_path / "cache").mkdir()
    abandoned, building = (tmp_path / "cache" / f".ca_flax_kernels-x.so.{n}" for n in (1, 2))
    abandoned.write_bytes(b"half")
    building.write_bytes(b"half")
    os.utime(abandoned, (time.time() - 86400,) * 2)
    built = kernels.build()
    assert not abandoned.exists() and building.exists()
    assert built.parent == tmp_path / "cache" and built.stat().st_size > 0
    mtime = built.stat().st_mtime_ns
    assert kernels.build() == built and built.stat().st_mtime_ns == mtime

    # A compiler that answers the CPU query but fails the build, as a broken toolchain would.
    broken = tmp_path / "broken-c++"
    broken.write_text(
        '#!/bin/sh\ncase "$*" in *-dM*) exec c++ "$@";; esac\necho "no room" >&2\nexit 1\n'
    )
    broken.chmod(0o755)
    monkeypatch.setenv("CA_FLAX_KERNEL_CACHE", str(tmp_path / "failed"))
    with pytest.raises(RuntimeError, match="csrc failed:\n.*no room"):
        kernels.build(compiler=str(broken))
    assert list((tmp_path / "failed").iterdir()) == []
    with pytest.raises(RuntimeError, match="compiler 'no-such-cc' on PATH"):
        kernels.build(compiler="no-such-cc")


@pytest.mark.parametrize(
    ("env", "warning"),
    [({"CA_FLAX_CPU_KERNELS": "0"}, None), ({"PATH": ""}, "no C++ compiler 'c++' on PATH")],
    ids=["opted_out", "no_compiler"],
)
def test_without_kernels_models_and_the_backend_keep_xla_loops(env, warning):
    """CA_FLAX_CPU_KERNELS=0 turns the kernels off for the whole process; without a compiler
    they are off too, with one warning saying why. Models still run, and so does the CPU
    backend: its plan is the model's own layers, cache-blocked with zeroed loop outputs (no
    kernel in its program), and gives the model's logits."""
    code = (
        "import jax, numpy as np, ca_flax\n"
        "from ca_flax import cpu\n"
        "from ca_flax.cpu import kernels\n"
        "from tests.helpers.tiny_models import random_variables\n"
        "print(kernels.available(), cpu.kernels_available())\n"
        "m = ca_flax.create_model('mobilenext', num_classes=3, width_mult=0.35)\n"
        "x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))\n"
        "v = random_variables(m)\n"
        "want = jax.jit(m.apply)(v, x)\n"
        "print(want.shape)\n"
        "infer = cpu.make_inference_fn(m, v, block_mb=0.01)  # blocked: one image a chunk\n"
        "text = infer.jitted.lower(infer.variables, x).as_text()\n"
        "print('ca_flax_' in text, 'stablehlo.while' in text)\n"
        "np.testing.assert_allclose(infer(x), want, rtol=1e-5, atol=1e-5)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), **env}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:3] == ["False False", "(2, 3)", "False True"]
    if warning:
        assert out.stderr.count("CPU kernels unavailable") == 1 and warning in out.stderr
