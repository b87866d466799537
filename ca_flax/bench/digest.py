"""Digests of the programs the GPU benchmark times, traced here on CPU: whether a change since a
GPU measurement altered what the GPU runs (same digest: the measured numbers still apply).

Each digest is the SHA-256 of the StableHLO (without source locations) that `ca_flax.bench`
jits on a GPU, batch 256, 224x224, bfloat16: the train step and inference, both in the GPU's
default `lax_conv` formulation, with no CPU kernels and no blocking. Traced abstractly: no arrays,
no compile. Digests depend on the jax version, so compare runs with the same jax.

    python -m ca_flax.bench.digest [--models mobilenetv2_ca mobilenext] [--batch 256]
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ca_flax import cpu
from ca_flax.bench.candidates import OPTIMIZER, make_train_step
from ca_flax.models.initializers import abstract_variables
from ca_flax.models.registry import create_model
from ca_flax.ops import conv_formulation

DTYPE = jnp.bfloat16


def stablehlo_digest(fn: Callable[..., Any], *args: Any) -> str:
    """SHA-256 (first 16 hex digits) of `jax.jit(fn)` lowered for `args`, locations left out."""
    module = jax.jit(fn).lower(*args).compiler_ir("stablehlo")
    text = module.operation.get_asm(enable_debug_info=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def gpu_program_digests(name: str, batch: int, size: int) -> dict[str, str]:
    """{"train": ..., "infer": ...} for model `name`, traced as the GPU benchmark traces it."""
    model = create_model(name, dtype=DTYPE)
    image = jax.ShapeDtypeStruct((batch, size, size, 3), DTYPE)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    with conv_formulation("lax_conv"), cpu.use_kernels(False):
        variables = abstract_variables(model, 32, DTYPE)
        params, stats = variables["params"], variables["batch_stats"]
        state = (params, stats, jax.eval_shape(OPTIMIZER.init, params))
        key = jax.eval_shape(lambda: jax.random.key(1))
        return {
            "train": stablehlo_digest(make_train_step(model), state, image, labels, key),
            "infer": stablehlo_digest(
                lambda v, x: model.apply(v, x, train=False), variables, image
            ),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mobilenetv2_ca", "mobilenext"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, batch {args.batch}, {args.size}x{args.size}, bfloat16, lax_conv")
    for name in args.models:
        for mode, digest in gpu_program_digests(name, args.batch, args.size).items():
            print(f"{name:16s} {mode:6s} {digest}")


if __name__ == "__main__":
    main()
