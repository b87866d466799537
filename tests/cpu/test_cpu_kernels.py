"""ca_flax's own CPU kernels: built with the system compiler, registered with XLA, and the same
numbers as XLA's loops, alone and inside whole models."""

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

import ca_flax
from ca_flax import cpu_kernels, sequential
from ca_flax.convolutions import conv3x3_im2col, depthwise_conv3x3
from ca_flax.layers import conv_formulation, relu6
from tests.helpers.tiny_models import random_variables


def test_kernels_build_and_register_here():
    """The machines this suite runs on have a C++ compiler: the kernels must build (a silent
    fallback to XLA's loops would leave CPU inference slower and the kernels untested)."""
    assert jax.default_backend() == "cpu"
    assert cpu_kernels.available()


def reference(x, kernel, mul, add, stride, relu6_out, input_affine, residual):  # noqa: ANN001, ANN201
    """The same layer from XLA's loops, in float64."""
    with jax.enable_x64():
        f64 = partial(jnp.asarray, dtype=jnp.float64)
        x = f64(x)
        if input_affine is not None:
            x = relu6(x * f64(input_affine[0]) + f64(input_affine[1]))
        y = depthwise_conv3x3(x, f64(kernel), stride) * f64(mul) + f64(add)
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
        run = partial(cpu_kernels.depthwise3x3_affine, stride=stride, relu6=relu6_out, **kwargs)
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
            cpu_kernels.depthwise3x3_affine, stride=stride, relu6=relu6_out,
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
        cpu_kernels.depthwise3x3_affine(x, kernel, vec, vec, 1, False, sums=True)
    with pytest.raises(ValueError, match="sums are for a layer with ReLU6 and no residual"):
        cpu_kernels.depthwise3x3_affine(x, kernel, vec, vec, 1, True, residual=x, sums=True)


def test_expand_needs_its_batchnorm_and_the_right_shape():
    """`expand` without the input BatchNorm + ReLU6, or of another shape, is refused by name."""
    x, kernel, vec = jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 1, 8)), jnp.ones(8)
    with pytest.raises(ValueError, match="expand must be"):
        cpu_kernels.depthwise3x3_affine(x, kernel, vec, vec, 1, True, expand=jnp.ones((3, 8)))
    with pytest.raises(ValueError, match=r"\(3, 8\)"):
        cpu_kernels.depthwise3x3_affine(
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
        linear = np.asarray(conv3x3_im2col(f64(x), f64(kernel), stride) * f64(mul) + f64(add))
    for relu6_out in (True, False):
        run = partial(cpu_kernels.conv3x3_affine, stride=stride, relu6=relu6_out)
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
    run = partial(cpu_kernels.conv3x3_affine, stride=2, relu6=True)
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
    gated, same = jax.jit(lambda *a: (cpu_kernels.coordinate_gate(*a), a[0] + 0))(x, a_h, a_w)
    np.testing.assert_array_equal(gated, x * a_h * a_w)
    np.testing.assert_array_equal(same, x)
    only = jax.jit(lambda x, a_h, a_w: cpu_kernels.coordinate_gate(x * 2, a_h, a_w))(x, a_h, a_w)
    np.testing.assert_array_equal(only, (x * 2) * a_h * a_w)


def test_coordinate_gate_kernel_refuses_gates_of_another_shape():
    """Gates that do not match the input are refused with the shapes it expects."""
    x = jnp.ones((1, 4, 5, 8))
    with pytest.raises(Exception, match=r"a_h must be \(N, H, 1, C\)"):
        jax.jit(cpu_kernels.coordinate_gate)(x, jnp.ones((1, 5, 1, 8)), jnp.ones((1, 1, 5, 8)))


def count_modules(params: dict, names: set[str]) -> int:
    """Submodules in a parameter tree whose children are exactly `names`."""
    if not isinstance(params, dict):
        return 0
    return (set(params) == names) + sum(count_modules(v, names) for v in params.values())


def program_text(fn, *args) -> str:  # noqa: ANN001
    """`fn`'s lowered program, traced afresh (jit caches traces per function)."""
    return jax.jit(lambda *a: fn(*a)).lower(*args).as_text()


def count_kernel_calls(fn, *args, target: str = cpu_kernels.DEPTHWISE_TARGET) -> int:  # noqa: ANN001
    """Calls of kernel `target` in `fn`'s program."""
    return program_text(fn, *args).count(target)


# The empty placeholders of the depthwise kernel's optional `expand` operand and sum results.
NO_EXPAND, NO_SUMS = "tensor<0x0xf32>", "tensor<0x0x0xf32>"


def count_depthwise_calls_with(fn, *args, absent: str) -> int:  # noqa: ANN001
    """Depthwise kernel calls in `fn`'s program that use an optional part: `absent`, its empty
    placeholder, is not in the call (NO_EXPAND: the 1x1 conv runs inside; NO_SUMS: the output's
    row and column sums come out)."""
    text = program_text(fn, *args)
    calls = [line for line in text.splitlines() if cpu_kernels.DEPTHWISE_TARGET in line]
    return sum(absent not in line for line in calls)


@pytest.mark.parametrize(
    ("name", "expand_from"),
    [("mobilenetv2_ca", 0), ("mobilenetv2_ca", None), ("mobilenext", 0), ("mobilenext", None),
     ("mobilenext_ca", 0)],
    ids=["mobilenetv2_ca-expand_everywhere", "mobilenetv2_ca-expand_default",
         "mobilenext-expand_everywhere", "mobilenext-expand_default", "mobilenext_ca"],
)  # fmt: skip
def test_models_use_the_kernel_in_cpu_inference_with_the_same_logits(
    name, expand_from, monkeypatch
):
    """Every depthwise + BatchNorm (+ ReLU6) of a float32 CPU inference is one kernel call, so is
    the stem, and the logits equal XLA's loops'; with the 1x1 conv before it inside the kernel on
    images of FUSED_EXPAND_MIN_PIXELS (here: all, or the default, which these small images are
    under). Training, 'xla' convolutions and bf16 keep XLA's loops."""
    if expand_from is not None:
        monkeypatch.setattr(sequential, "FUSED_EXPAND_MIN_PIXELS", expand_from)
    model = ca_flax.create_model(name, num_classes=7, width_mult=0.35)
    x = jax.random.normal(jax.random.key(0), (4, 32, 40, 3))
    variables = random_variables(model)
    infer = partial(model.apply, train=False)
    kernels = jax.tree_util.tree_leaves(variables["params"])
    depthwise = sum(k.ndim == 4 and k.shape[:3] == (3, 3, 1) for k in kernels)
    assert count_kernel_calls(infer, variables, x) == depthwise > 0
    # A 1x1 conv goes in before a depthwise in every block but mobilenetv2's first (17 blocks)
    # and the two of mobilenext's 20 that widen at stride 1 (no 3x3 after their 1x1 convs).
    expanding = {"mobilenetv2_ca": 16}.get(name, 18) if expand_from == 0 else 0
    assert count_depthwise_calls_with(infer, variables, x, absent=NO_EXPAND) == expanding
    if expand_from is None:  # at 64x64 the stride-2 block at 32x32 (over 28x28) takes it in
        big = jnp.zeros((1, 64, 64, 3))
        assert count_depthwise_calls_with(infer, variables, big, absent=NO_EXPAND) == 1
    assert count_kernel_calls(infer, variables, x, target=cpu_kernels.CONV_TARGET) == 1
    # Cache-blocked, the stem reads its chunk of the batch where it lies: no copy of the input.
    blocked = partial(model.clone(inference_block_mb=0.015).apply, train=False)
    (stem,) = [line for line in program_text(blocked, variables, x).splitlines()
               if cpu_kernels.CONV_TARGET in line]  # fmt: skip
    assert "(tensor<4x32x40x3xf32>, tensor<i32>," in stem and "-> tensor<1x16x20x" in stem
    # ... and each loop's output starts uninitialized, every value written before it is read.
    target = cpu_kernels.UNINITIALIZED_TARGET
    assert count_kernel_calls(blocked, variables, x, target=target) >= 2  # nested loops
    gates = count_modules(variables["params"], {"conv1", "bn1", "conv2", "conv3"})  # CA blocks
    assert gates == {"mobilenetv2_ca": 16, "mobilenext": 0, "mobilenext_ca": 15}[name]
    assert count_kernel_calls(infer, variables, x, target=cpu_kernels.GATE_TARGET) == gates
    # Each CA block's pooling comes from the depthwise kernel before it.
    assert count_depthwise_calls_with(infer, variables, x, absent=NO_SUMS) == gates
    with cpu_kernels.use_kernels(False):
        for target in cpu_kernels.TARGETS:
            assert count_kernel_calls(infer, variables, x, target=target) == 0
        plain = jax.jit(lambda v, x: infer(v, x))(variables, x)
    fused = jax.jit(infer)(variables, x)
    np.testing.assert_allclose(fused, plain, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jax.jit(blocked)(variables, x), fused, rtol=1e-5, atol=1e-5)
    assert float(jnp.std(plain)) > 0.1  # O(1) logits: a wrong layer would show

    train = partial(
        model.apply, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}
    )
    bf16 = ca_flax.create_model(name, num_classes=7, width_mult=0.35, dtype=jnp.bfloat16)
    for target in cpu_kernels.TARGETS:
        assert count_kernel_calls(train, variables, x, target=target) == 0
        with conv_formulation("xla"):
            assert count_kernel_calls(infer, variables, x, target=target) == 0
        assert (
            count_kernel_calls(partial(bf16.apply, train=False), variables, x, target=target) == 0
        )


@pytest.mark.parametrize("name", ["mobilenetv2_ca", "mobilenext"])
def test_gradients_through_inference_match_xla_loops(name, monkeypatch):
    """The kernels take their derivatives from XLA's form of the same layers, so gradients of
    inference (saliency maps, frozen BatchNorm) work and equal those without the kernels; the
    1x1 convs inside the kernel (all of them here), CA's pooling from it, and (mobilenetv2_ca)
    the cache-blocked loops (nested, outputs uninitialized, the stem reading in place) included."""
    monkeypatch.setattr(sequential, "FUSED_EXPAND_MIN_PIXELS", 0)
    block_mb = 0.015 if name == "mobilenetv2_ca" else None  # nested loops: once is enough
    model = ca_flax.create_model(name, num_classes=7, width_mult=0.35, inference_block_mb=block_mb)
    x = jax.random.normal(jax.random.key(0), (2, 32, 40, 3))
    variables = random_variables(model)

    def loss(v, x):  # noqa: ANN001, ANN202
        return jnp.sum(jnp.sin(model.apply(v, x, train=False)))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x)
    with cpu_kernels.use_kernels(False):
        plain = jax.jit(jax.grad(lambda v, x: loss(v, x), argnums=(0, 1)))(variables, x)
    leaves = jax.tree_util.tree_leaves
    for got, want in zip(leaves(grads), leaves(plain), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
    assert float(jnp.abs(plain[1]).max()) > 0  # the input gradient is not trivially zero


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
    built = cpu_kernels.build()
    assert not abandoned.exists() and building.exists()
    assert built.parent == tmp_path / "cache" and built.stat().st_size > 0
    mtime = built.stat().st_mtime_ns
    assert cpu_kernels.build() == built and built.stat().st_mtime_ns == mtime

    # A compiler that answers the CPU query but fails the build, as a broken toolchain would.
    broken = tmp_path / "broken-c++"
    broken.write_text(
        '#!/bin/sh\ncase "$*" in *-dM*) exec c++ "$@";; esac\necho "no room" >&2\nexit 1\n'
    )
    broken.chmod(0o755)
    monkeypatch.setenv("CA_FLAX_KERNEL_CACHE", str(tmp_path / "failed"))
    with pytest.raises(RuntimeError, match="csrc failed:\n.*no room"):
        cpu_kernels.build(compiler=str(broken))
    assert list((tmp_path / "failed").iterdir()) == []
    with pytest.raises(RuntimeError, match="compiler 'no-such-cc' on PATH"):
        cpu_kernels.build(compiler="no-such-cc")


@pytest.mark.parametrize(
    ("env", "warning"),
    [({"CA_FLAX_CPU_KERNELS": "0"}, None), ({"PATH": ""}, "no C++ compiler 'c++' on PATH")],
    ids=["opted_out", "no_compiler"],
)
def test_without_kernels_models_keep_xla_loops(env, warning):
    """CA_FLAX_CPU_KERNELS=0 turns the kernels off for the whole process; without a compiler
    they are off too, with one warning saying why, and models still run."""
    code = (
        "import jax, ca_flax\n"
        "from ca_flax import cpu_kernels\n"
        "print(cpu_kernels.available())\n"
        "m = ca_flax.create_model('mobilenext', num_classes=3, width_mult=0.35)\n"
        "x = jax.numpy.ones((1, 16, 16, 3))\n"
        "print(m.apply(m.init(jax.random.key(0), x), x).shape)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["False", "(1, 3)"]
    if warning:
        assert out.stderr.count("CPU kernels unavailable") == 1 and warning in out.stderr
