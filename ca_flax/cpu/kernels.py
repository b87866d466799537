"""Hand-written CPU kernels for inference and for the depthwise layers' training gradients,
compiled on first use and called through XLA's FFI.

XLA:CPU runs a depthwise 3x3 + BatchNorm + ReLU6 as an elementwise loop over a padded copy of
its input, and the 3-channel stem as a concatenation of nine slices and a thin matmul; one pass
each with the taps in registers (`csrc/`) is faster (measurements: docs/cpu_backend.md). The
depthwise kernel can also run the 1x1 conv before it, and Coordinate Attention's gate
multiplies in place. In training, a depthwise layer's kernel gradient (and at stride 2 its input
gradient) is one pass where XLA:CPU writes shifted or zero-interleaved copies first.
The kernels are built once per machine with the system's C++ compiler into a cache folder
(`CA_FLAX_KERNEL_CACHE`, else `$XDG_CACHE_HOME/ca_flax` or `~/.cache/ca_flax`), named by a
hash of the sources, the compile command, jaxlib and the instruction set the compiler targets
on this CPU, so a shared home folder never hands a binary to a CPU it was not built for.
Without a compiler, or with `CA_FLAX_CPU_KERNELS=0`, the CPU backend falls back to XLA's
loops (same results to float rounding)."""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from ca_flax import ops
from ca_flax.models import layers

CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(
    CSRC / f
    for f in ("depthwise3x3.cc", "depthwise_grad.cc", "conv3x3.cc", "gate.cc", "uninitialized.cc")
)
OPT_OUT = "CA_FLAX_CPU_KERNELS"
DEPTHWISE_TARGET = "ca_flax_depthwise3x3_affine"
CONV_TARGET = "ca_flax_conv3x3_affine"
GATE_TARGET = "ca_flax_coordinate_gate"
UNINITIALIZED_TARGET = "ca_flax_uninitialized"
KERNEL_GRAD_TARGET = "ca_flax_depthwise3x3_kernel_grad"
INPUT_GRAD_TARGET = "ca_flax_depthwise3x3_input_grad_stride2"
TARGETS = {  # -> symbol
    DEPTHWISE_TARGET: "CaFlaxDepthwise3x3",
    KERNEL_GRAD_TARGET: "CaFlaxDepthwiseKernelGrad",
    INPUT_GRAD_TARGET: "CaFlaxDepthwiseInputGrad",
    CONV_TARGET: "CaFlaxConv3x3",
    GATE_TARGET: "CaFlaxGate",
    UNINITIALIZED_TARGET: "CaFlaxUninitialized",
}
TARGET_FLAGS = ("-O3", "-march=native", "-std=c++17")  # what the code is generated for
FLAGS = (*TARGET_FLAGS, "-shared", "-fPIC", "-w")
BUILD_TIMEOUT_S = 300
_wanted: contextvars.ContextVar[bool] = contextvars.ContextVar("ca_flax_cpu_kernels", default=True)


def cache_dir() -> Path:
    """Where built kernels are kept: `CA_FLAX_KERNEL_CACHE`, else the user's cache folder."""
    if "CA_FLAX_KERNEL_CACHE" in os.environ:
        return Path(os.environ["CA_FLAX_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ca_flax"


def target_macros(compiler: str) -> str:
    """What the compiler predefines for this CPU under `-march=native` (its instruction-set
    extensions among them): the part of the cache key that tells CPUs apart on any OS."""
    command = [compiler, *TARGET_FLAGS, "-E", "-dM", "-x", "c++", os.devnull]
    done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"{compiler} cannot target this CPU:\n{done.stderr[-2000:]}")
    return done.stdout


def compile_command(compiler: str, output: Path) -> list[str]:
    """The compiler invocation that builds the shared library at `output` from `SOURCES`."""
    return [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", str(output)]


def build(compiler: str = "c++") -> Path:
    """Build the kernel library if this machine has no copy yet; returns its path.

    The file name hashes the sources, the compile command, jaxlib's version and what the
    compiler predefines for this CPU (`target_macros`), so a cache folder shared between
    machines never hands a binary to a CPU it was not built for.

    Compiles into a temporary file beside the target and renames it, so concurrent processes
    (tests, one per host) never load a half-written library. Raises RuntimeError, with the
    compiler's messages, if the build fails.
    """
    path = shutil.which(compiler)
    if path is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH to build the CPU kernels")
    key = hashlib.sha256()
    for source in (*SOURCES, *sorted(CSRC.glob("*.h"))):
        key.update(source.name.encode() + source.read_bytes())
    for part in (*compile_command(path, Path("out.so")), jaxlib.__version__, target_macros(path)):
        key.update(part.encode())
    out = cache_dir() / f"ca_flax_kernels-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(out.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        command = compile_command(path, Path(tmp))
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"building the kernels in {CSRC} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _remove_abandoned_builds(directory: Path) -> None:
    """Delete temporary libraries that a killed build left (older than any build may take)."""
    for tmp in directory.glob(".ca_flax_kernels-*"):
        with contextlib.suppress(OSError):  # another process may remove it first
            if time.time() - tmp.stat().st_mtime > 2 * BUILD_TIMEOUT_S:
                tmp.unlink()


@functools.cache
def available() -> bool:
    """True once the kernels are built and registered with XLA for the CPU; False (with one
    warning saying why) when they cannot be, or when `CA_FLAX_CPU_KERNELS=0` turns them off."""
    if os.environ.get(OPT_OUT, "1") == "0" or sys.platform == "win32":
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as err:
        warnings.warn(f"ca_flax CPU kernels unavailable, using XLA's loops: {err}", stacklevel=2)
        return False
    for target, symbol in TARGETS.items():
        capsule = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(target, capsule, platform="cpu")
    return True


@contextlib.contextmanager
def use_kernels(wanted: bool) -> Iterator[None]:
    """Trace models with (True) or without (False) these kernels inside this block, e.g. to
    compare them with XLA's loops in one process. It applies when a function is traced, so jit
    a fresh function inside the block."""
    token = _wanted.set(wanted)
    try:
        yield
    finally:
        _wanted.reset(token)


def enabled() -> bool:
    """Whether models traced now use the kernels: wanted here (`use_kernels`) and `available`."""
    return _wanted.get() and available()


def require(target: str) -> None:
    """Raise RuntimeError, naming `target`, where the kernels are not `available()`."""
    if not available():
        raise RuntimeError(f"{target} is not available here: see the warning, or {OPT_OUT}")


def uninitialized(shape: tuple[int, ...], dtype: Any, trip: jax.Array) -> jax.Array:
    """An array of `shape` whose values are whatever its memory held: for a buffer written in
    full before it is read (`blocking.run_chunked`'s output), where zeros cost a pass. `trip`,
    any value of the loop trip the buffer belongs to, is read by nothing: it keeps XLA from
    making the buffer once outside the loop, which cost a copy per trip. Raises RuntimeError
    where the kernels are not `available()`."""
    require(UNINITIALIZED_TARGET)
    out = jax.ShapeDtypeStruct(shape, dtype)
    call = jax.ffi.ffi_call(UNINITIALIZED_TARGET, out, vmap_method="broadcast_all")
    return call(jax.lax.stop_gradient(trip))  # no derivative: nothing depends on `trip`


def depthwise3x3_kernel_grad(x: jax.Array, g: jax.Array, stride: int) -> jax.Array:
    """The (3, 3, 1, C) gradient of a depthwise 3x3 convolution's kernel (padding 1, `stride`)
    from its float32 NHWC input `x` and output gradient `g`, in one pass over both, where
    XLA:CPU runs nine reductions, each over a shifted copy of `x` it writes first. Raises
    RuntimeError where the kernel is not `available()`, ValueError for a `g` of another shape."""
    require(KERNEL_GRAD_TARGET)
    c = x.shape[-1]
    if g.shape != _output(x, stride, c).shape:
        raise ValueError(f"g {g.shape} is not the output shape of x {x.shape} at stride {stride}")
    out = jax.ShapeDtypeStruct((9, c), jnp.float32)
    call = jax.ffi.ffi_call(KERNEL_GRAD_TARGET, out, vmap_method="sequential")
    return call(x, g, stride=np.int64(stride)).reshape(3, 3, 1, c)


def depthwise3x3_input_grad_stride2(
    g: jax.Array, kernel: jax.Array, input_shape: tuple[int, ...]
) -> jax.Array:
    """The input gradient of a stride-2 depthwise 3x3 convolution (padding 1) of an
    `input_shape` float32 NHWC tensor, from its output gradient `g` and (3, 3, 1, C) `kernel`:
    each input pixel sums the taps that reach it, where XLA:CPU sums nine zero-interleaved pads
    element by element. Raises RuntimeError where the kernel is not `available()`, ValueError
    for a `g` of another shape."""
    require(INPUT_GRAD_TARGET)
    out = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    if g.shape != _output(out, 2, out.shape[-1]).shape:
        raise ValueError(f"g {g.shape} is not the stride-2 output shape of {tuple(input_shape)}")
    call = jax.ffi.ffi_call(INPUT_GRAD_TARGET, out, vmap_method="sequential")
    return call(g, kernel.reshape(9, -1).astype(jnp.float32))


def depthwise3x3_affine(
    x: jax.Array,
    kernel: jax.Array,
    mul: jax.Array,
    add: jax.Array,
    stride: int,
    relu6: bool,
    input_affine: tuple[jax.Array, jax.Array] | None = None,
    residual: jax.Array | None = None,
    expand: jax.Array | None = None,
    sums: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
    """`act(depthwise3x3(pre(x), kernel, stride) * mul + add) + residual` in one pass.

    `pre(x)` is `relu6(x * in_mul + in_add)` for `input_affine = (in_mul, in_add)` (the
    BatchNorm and ReLU6 of the 1x1 conv that feeds the layer), else `x`; given an (C_in, C)
    `expand` matrix (with `input_affine`), that 1x1 conv is applied first, `x @ expand`, inside
    the kernel, so the C-wide tensor is never written; `act` is ReLU6 if
    `relu6`; `residual`, shaped like the output, is added if given. float32 NHWC `x`, a
    (3, 3, 1, C) `kernel`, per-channel vectors; padding 1, stride 1 or 2. Derivatives come from
    XLA's form of the same layer (`reference_depthwise3x3_affine`), so gradients through
    inference (saliency maps, frozen BatchNorm) work. With `sums` (ReLU6, no residual) it
    returns `(y, y.sum(2), y.sum(1))`: the output summed over each row (N, H_out, C) and each
    column (N, W_out, C) as it is written, Coordinate Attention's pooling without a pass of its
    own. Raises RuntimeError where the kernel is not `available()`, ValueError for an `expand`
    without `input_affine` or of the wrong shape, or for `sums` with a residual or no ReLU6.
    """
    require(DEPTHWISE_TARGET)
    if expand is not None and (
        input_affine is None or expand.shape != (x.shape[-1], kernel.shape[-1])
    ):
        raise ValueError(
            f"expand must be (C_in, C) = {(x.shape[-1], kernel.shape[-1])} and come with "
            f"input_affine; got {expand.shape} and input_affine={input_affine is not None}"
        )
    if sums and (residual is not None or not relu6):
        raise ValueError("sums are for a layer with ReLU6 and no residual (Coordinate Attention's)")
    return _depthwise(stride, relu6, sums, x, kernel, mul, add, input_affine, residual, expand)


def conv3x3_affine(
    x: jax.Array,
    kernel: jax.Array,
    mul: jax.Array,
    add: jax.Array,
    stride: int,
    relu6: bool,
    first: jax.Array | int = 0,
    count: int | None = None,
) -> jax.Array:
    """`act(conv3x3(x, kernel, stride) * mul + add)` in one pass: a dense 3x3 convolution
    (padding 1, stride 1 or 2) with its BatchNorm folded in, `act` ReLU6 if `relu6`.

    Made for the networks' stem (3 input channels): XLA's form writes nine slices concatenated
    into a 27-channel copy and reads it back in a thin matmul; this reads each input once.
    float32 NHWC `x`, a (3, 3, C_in, C_out) `kernel`, (C_out,) vectors. Given `count`, only
    images `x[first : first + count]` are computed (`first` clamped as `lax.dynamic_slice`
    clamps), read where they lie: a chunk of the batch without a copy. Derivatives come from
    XLA's form (`reference_conv3x3_affine`). Raises RuntimeError where it is not `available()`.
    """
    require(CONV_TARGET)
    count = x.shape[0] if count is None else count
    if not 0 <= count <= x.shape[0]:
        raise ValueError(f"count={count}: x holds {x.shape[0]} images")
    return _conv(stride, relu6, count, x, jnp.asarray(first, jnp.int32), kernel, mul, add)


def coordinate_gate(x: jax.Array, a_h: jax.Array, a_w: jax.Array) -> jax.Array:
    """`x * a_h * a_w` for float32 NHWC `x`, `a_h` (N, H, 1, C), `a_w` (N, 1, W, C): Coordinate
    Attention's gate, written over `x`'s buffer where `x` is not needed after it (XLA copies `x`
    first otherwise). Derivatives are the product's. Raises RuntimeError where the kernel is
    not `available()`."""
    require(GATE_TARGET)
    return _gate(x, a_h, a_w)


@jax.custom_jvp
def _gate(x, a_h, a_w):  # noqa: ANN001, ANN202
    f32 = jnp.float32
    out = jax.ShapeDtypeStruct(x.shape, f32)
    call = jax.ffi.ffi_call(GATE_TARGET, out, vmap_method="sequential", input_output_aliases={0: 0})
    return call(x.astype(f32), a_h.astype(f32), a_w.astype(f32))


@_gate.defjvp
def _gate_jvp(primals, tangents):  # noqa: ANN001, ANN202
    return jax.jvp(lambda x, a_h, a_w: x * a_h * a_w, primals, tangents)


def reference_depthwise3x3_affine(
    stride: int, relu6: bool, x: jax.Array, kernel: jax.Array, mul: jax.Array, add: jax.Array,
    input_affine: tuple[jax.Array, jax.Array] | None, residual: jax.Array | None, expand: jax.Array | None = None,
) -> jax.Array:  # fmt: skip
    """`depthwise3x3_affine` as XLA ops: the function its derivatives are taken from."""
    if expand is not None:
        x = jnp.dot(x, expand)
    if input_affine is not None:
        x = layers.relu6(x * input_affine[0] + input_affine[1])
    y = ops.lax_conv(x, kernel, stride, depthwise=True) * mul + add
    y = layers.relu6(y) if relu6 else y
    return y if residual is None else y + residual


def reference_conv3x3_affine(
    stride: int, relu6: bool, x: jax.Array, kernel: jax.Array, mul: jax.Array, add: jax.Array
) -> jax.Array:
    """`conv3x3_affine` as XLA ops: the function its derivatives are taken from."""
    y = ops.lax_conv(x, kernel, stride) * mul + add
    return layers.relu6(y) if relu6 else y


def _output(x: jax.Array, stride: int, channels: int) -> jax.ShapeDtypeStruct:
    n, h, w, _ = x.shape
    return jax.ShapeDtypeStruct(
        (n, ops.strided(h, stride), ops.strided(w, stride), channels), jnp.float32
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _depthwise(stride, relu6, sums, x, kernel, mul, add, input_affine, residual, expand):  # noqa: ANN001, ANN202
    c = kernel.shape[-1]
    f32 = jnp.float32
    out = _output(x, stride, c)
    n, h, w, _ = out.shape
    sum_shapes = [(n, h, c), (n, w, c)] if sums else [(0, 0, 0)] * 2
    outs = (out, *(jax.ShapeDtypeStruct(shape, f32) for shape in sum_shapes))
    call = jax.ffi.ffi_call(DEPTHWISE_TARGET, outs, vmap_method="sequential")
    in_mul, in_add = input_affine if input_affine is not None else (mul, add)  # unread if None
    # The kernel takes the input BatchNorm's scale folded into the expanding matrix.
    expand = jnp.zeros((0, 0), f32) if expand is None else (expand * in_mul).astype(f32)
    no_residual = jnp.zeros((0, 0, 0, 0), f32)
    y, row_sums, col_sums = call(
        x.astype(f32),
        kernel.reshape(9, c).astype(f32),
        *(v.astype(f32) for v in (mul, add, in_mul, in_add)),
        expand,
        no_residual if residual is None else residual.astype(f32),
        stride=np.int64(stride),
        relu6=relu6,
        input_bn_relu6=input_affine is not None,
    )
    return (y, row_sums, col_sums) if sums else y


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _conv(stride, relu6, count, x, first, kernel, mul, add):  # noqa: ANN001, ANN202
    out = _output(x, stride, kernel.shape[-1])
    out = jax.ShapeDtypeStruct((count, *out.shape[1:]), out.dtype)
    call = jax.ffi.ffi_call(CONV_TARGET, out, vmap_method="sequential")
    f32 = jnp.float32
    args = (x.astype(f32), first, kernel.astype(f32), mul.astype(f32), add.astype(f32))
    return call(*args, stride=np.int64(stride), relu6=relu6)


@_depthwise.defjvp
def _depthwise_jvp(stride, relu6, sums, primals, tangents):  # noqa: ANN001, ANN202
    def reference(*args):  # noqa: ANN002, ANN202
        y = reference_depthwise3x3_affine(stride, relu6, *args)
        return (y, jnp.sum(y, 2), jnp.sum(y, 1)) if sums else y

    return jax.jvp(reference, primals, tangents)


@_conv.defjvp
def _conv_jvp(stride, relu6, count, primals, tangents):  # noqa: ANN001, ANN202
    x, first, *params = primals
    dx, _, *dparams = tangents

    def reference(x, kernel, mul, add):  # noqa: ANN001, ANN202
        images = jax.lax.dynamic_slice_in_dim(x, first, count)
        return reference_conv3x3_affine(stride, relu6, images, kernel, mul, add)

    return jax.jvp(reference, (x, *params), (dx, *dparams))
