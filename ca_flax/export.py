"""CLI: `python -m ca_flax.export --checkpoint DIR --format {tflite,saved_model} --out PATH`.

The model is lowered with `jax.experimental.jax2tf` (StableHLO inside a TF graph) at a fixed
(1, size, size, 3) float32 NHWC input, with inference-mode BatchNorm and the weights baked in
as constants. TFLite conversion uses builtin ops only. Outputs are written to a temporary
sibling and renamed into place.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax

from ca_flax.atomic import write_atomically
from ca_flax.ops import conv_formulation

FORMATS = ("tflite", "saved_model")


def inference_fn(model: nn.Module, variables: dict[str, Any]) -> Callable[[jax.Array], jax.Array]:
    """images (N, H, W, 3) -> float32 logits, inference-mode BN, TFLite-native convs."""
    variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}

    def logits(images: jax.Array) -> jax.Array:
        # TFLite maps lax convolutions to DEPTHWISE_CONV_2D and CONV_2D; the CPU speed forms
        # would export as ~9 SLICE/MUL/ADD ops per layer and a BATCH_MATMUL TFLite rejects.
        with conv_formulation("lax_conv"):
            return model.apply(variables, images, train=False)

    return logits


def tf_module(fn: Callable[[jax.Array], jax.Array], size: int) -> Any:
    """A tf.Module whose `serving_default` maps `images` (1, size, size, 3) to `logits`."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    converted = jax2tf.convert(fn, with_gradient=False)
    module = tf.Module()

    @tf.function(
        input_signature=[tf.TensorSpec((1, size, size, 3), tf.float32, name="images")],
        autograph=False,
    )
    def serve(images: Any) -> dict[str, Any]:
        return {"logits": converted(images)}

    module.serve = serve
    return module


def tflite_bytes(module: Any) -> bytes:
    """Convert the module's serving function to a TFLite flatbuffer (builtin ops only)."""
    import tensorflow as tf

    concrete = module.serve.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter.convert()


def export(
    model: nn.Module, variables: dict[str, Any], fmt: str, out: str | Path, size: int = 224
) -> Path:
    """Write `model` with `variables` as a TFLite file or a SavedModel directory at `out`."""
    import tensorflow as tf

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    module = tf_module(inference_fn(model, variables), size)
    if fmt == "tflite":
        return write_atomically(Path(out).absolute(), lambda p: p.write_bytes(tflite_bytes(module)))
    signatures = {"serving_default": module.serve.get_concrete_function()}
    return write_atomically(
        Path(out).absolute(), lambda p: tf.saved_model.save(module, str(p), signatures=signatures)
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ca_flax.export",
        description="Export a ca_flax checkpoint to TFLite or a TF SavedModel (fixed input size).",
    )
    parser.add_argument("--checkpoint", required=True, help="directory from ca_flax.convert")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="output .tflite file or SavedModel directory")
    parser.add_argument("--size", type=int, default=224, help="input height and width in pixels")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.size < 32:
        print(f"error: --size {args.size} is too small; use at least 32", file=sys.stderr)
        return 1
    from ca_flax.pretrained import load_pretrained

    try:
        model, variables = load_pretrained(args.checkpoint)
        out = export(model, variables, args.format, args.out, args.size)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.rglob("*"))
    print(f"wrote {out} ({args.format}, input 1x{args.size}x{args.size}x3, {size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
