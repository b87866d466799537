"""On the default device: both conv formulations give the same logits and parameter gradients
(fp32, inference mode, where nothing is chaotic), and a bf16 forward stays near fp32.
Prints relative errors (over all gradients at once); exits 1 if any is off."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

import ca_flax
from ca_flax.layers import conv_formulation


def rel(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def logits_and_grads(model, variables, x, formulation):  # noqa: ANN001, ANN201
    def loss(params):  # noqa: ANN001, ANN202
        out = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
        return jnp.sum(out**2), out

    with conv_formulation(formulation):
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])


def main() -> int:
    ok = True
    print(f"device: {jax.devices()[0].device_kind}")
    x = jax.random.normal(jax.random.key(0), (4, 64, 64, 3))
    for name in ("mobilenetv2_ca",):  # MobileNeXt is made of the same layers
        model = ca_flax.create_model(name, width_mult=0.35, dropout_rate=0.0)
        variables = model.init(jax.random.key(1), x)
        with jax.default_matmul_precision("highest"):
            (_, a), ga = logits_and_grads(model, variables, x, "windows")
            (_, b), gb = logits_and_grads(model, variables, x, "xla")
        grad_err = rel(
            *(jnp.concatenate([g.ravel() for g in jax.tree.leaves(t)]) for t in (ga, gb))
        )
        bf16 = ca_flax.create_model(name, width_mult=0.35, dtype=jnp.bfloat16)
        bf16_err = rel(bf16.apply(variables, x), model.apply(variables, x))
        good = rel(a, b) < 1e-4 and grad_err < 1e-4 and bf16_err < 5e-2
        ok &= good
        print(f"{name}: windows vs xla logits {rel(a, b):.1e}, worst gradient {grad_err:.1e}; "
              f"bf16 vs fp32 logits {bf16_err:.1e} {'ok' if good else 'FAILED'}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
