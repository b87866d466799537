"""On the default device (meant for a GPU): both conv formulations give the same logits, the
depthwise conv and BatchNorm the same gradients at a real layer's shape, and bf16 logits stay
near fp32.
fp32 at 'highest' matmul precision (GPUs default to TF32). Prints relative errors; exits 1 if
any is off. Whole-network gradients are not compared: ReLU6 kinks make them a lottery in fp32."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

import ca_flax
from ca_flax.models.layers import BatchNorm
from ca_flax.ops import conv_formulation, lax_conv, windows_depthwise3x3


def rel(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def logits_error(name: str) -> tuple[float, float]:
    """(windows vs xla logits, bf16 vs fp32 logits) of a random `name` at width 0.35."""
    x = jax.random.normal(jax.random.key(0), (4, 64, 64, 3))
    model = ca_flax.create_model(name, width_mult=0.35)
    variables = ca_flax.init_variables(model, jax.random.key(1), x)
    logits = {}
    for formulation in ("shifted_windows", "lax_conv"):
        with conv_formulation(formulation):
            logits[formulation] = jax.jit(model.apply)(variables, x)
    bf16 = ca_flax.create_model(name, width_mult=0.35, dtype=jnp.bfloat16)
    return rel(logits["shifted_windows"], logits["lax_conv"]), rel(
        bf16.apply(variables, x), logits["lax_conv"]
    )


def depthwise_gradient_error(stride: int) -> float:
    """Worst of d/dx and d/dkernel, windows vs cuDNN, at MobileNetV2's (8, 56, 56, 144) layer."""
    x = jax.random.normal(jax.random.key(2), (8, 56, 56, 144))
    kernel = jax.random.normal(jax.random.key(3), (3, 3, 1, 144))

    def grads(conv):  # noqa: ANN001, ANN202
        return jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k))), (0, 1)))(x, kernel)

    ours = grads(lambda x, k: windows_depthwise3x3(x, k, stride))
    theirs = grads(lambda x, k: lax_conv(x, k, stride, depthwise=True))
    return max(rel(a, b) for a, b in zip(ours, theirs, strict=True))


def batchnorm_gradient_error(dtype: jnp.dtype) -> float:
    """Worst of y, dx, dscale, dbias and the running statistics, fused BatchNorm ('xla') vs
    autodiff ('windows'), train mode at MobileNetV2's (32, 56, 56, 144) layer."""
    x = (2.0 + jax.random.normal(jax.random.key(4), (32, 56, 56, 144))).astype(dtype)
    dy = jax.random.normal(jax.random.key(5), x.shape, dtype)
    bn = BatchNorm(dtype=dtype)
    variables = bn.init(jax.random.key(6), x, True)

    def objective(params, x, dy):  # noqa: ANN001, ANN202
        y, new = bn.apply({**variables, "params": params}, x, True, mutable=["batch_stats"])
        return jnp.vdot(y.astype(jnp.float32), dy.astype(jnp.float32)), (y, new["batch_stats"])

    results = []
    for formulation in ("lax_conv", "shifted_windows"):
        with conv_formulation(formulation):
            step = jax.jit(jax.grad(objective, argnums=(0, 1), has_aux=True))
            results.append(jax.tree.leaves(step(variables["params"], x, dy)))
    return max(rel(a, b) for a, b in zip(*results, strict=True))


def checks() -> Iterator[tuple[str, float, float]]:
    """(label, relative error, bar) of each check, computed one at a time."""
    for name in ("mobilenetv2_ca", "mobilenext"):
        formulations, bf16 = logits_error(name)
        yield f"{name} logits windows vs xla", formulations, 1e-4
        yield f"{name} logits bf16 vs fp32", bf16, 5e-2
    for stride in (1, 2):
        yield f"depthwise stride {stride} gradients", depthwise_gradient_error(stride), 1e-4
    yield "batchnorm fp32 fused vs autodiff", batchnorm_gradient_error(jnp.float32), 1e-4
    yield "batchnorm bf16 fused vs autodiff", batchnorm_gradient_error(jnp.bfloat16), 5e-2


def main() -> int:
    """Prints each check as it finishes, so a run killed at a time limit keeps the ones done."""
    print(f"device: {jax.devices()[0].device_kind}", flush=True)
    failed = 0
    with jax.default_matmul_precision("highest"):
        for label, error, bar in checks():
            failed += error >= bar
            verdict = "ok" if error < bar else "FAILED"
            print(f"{label}: {error:.1e} (bar {bar:.0e}) {verdict}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
