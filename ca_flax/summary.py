"""Parameter and multiply-add counts per model, beside the paper's table.

`python -m ca_flax.summary [--size 224] [--width-mult 1.0] [--markdown]` prints the table that
README.md carries. Multiply-adds count convolutions and the classifier, as the papers do.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ca_flax.models.initializers import abstract_variables
from ca_flax.models.layers import Conv1x1, Conv3x3, DepthwiseConv3x3
from ca_flax.models.registry import create_model, list_models

# The seed README's ImageNet tables: (params, multiply-adds, top-1).
SEED_TABLE = {
    "mobilenetv2": ("3.5M", "300M", 72.3),
    "mobilenetv2_se": ("3.89M", "300M", 73.5),
    "mobilenetv2_cbam": ("3.89M", "300M", 73.6),
    "mobilenetv2_ca": ("3.95M", "310M", 74.3),
    "mobilenext": ("3.5M", "300M", 74.0),
    "mobilenext_se": ("3.89M", "300M", 74.7),
    "mobilenext_ca": ("4.09M", "330M", 75.2),
}
_COUNTED = (nn.Conv, nn.Dense, Conv1x1, Conv3x3, DepthwiseConv3x3)


def _shapes(name: str, size: int, **kwargs: Any) -> tuple[dict, dict]:
    model = create_model(name, **kwargs)
    x = jnp.zeros((1, size, size, 3))
    variables = abstract_variables(model, size)
    _, state = jax.eval_shape(
        lambda v: model.apply(
            v,
            x,
            capture_intermediates=lambda m, method: isinstance(m, _COUNTED),
            mutable=["intermediates"],
        ),
        variables,
    )
    return variables["params"], state["intermediates"]


def count_params(name: str, **kwargs: Any) -> int:
    """Trainable parameters (BatchNorm running statistics excluded)."""
    params, _ = _shapes(name, 32, **kwargs)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def count_macs(name: str, size: int = 224, **kwargs: Any) -> int:
    """Multiply-adds of every convolution and the classifier for one size x size image."""
    params, outputs = _shapes(name, size, **kwargs)
    total = 0
    for path, out in jax.tree_util.tree_flatten_with_path(outputs)[0]:
        if path[-2].key != "__call__":  # values sown by attention blocks, not layer outputs
            continue
        node = params
        for key in path[:-2]:  # drop ('__call__', 0)
            node = node[key.key]
        total += math.prod(out.shape[1:-1]) * math.prod(node["kernel"].shape)
    return total


def summary_rows(size: int = 224, **kwargs: Any) -> list[dict[str, Any]]:
    rows = []
    for name in list_models():
        seed_params, seed_macs, top1 = SEED_TABLE[name]
        rows.append(
            {
                "model": name,
                "params": count_params(name, **kwargs),
                "macs": count_macs(name, size, **kwargs),
                "seed_params": seed_params,
                "seed_macs": seed_macs,
                "seed_top1": top1,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    header = ["model", "params", "M-Adds", "seed params", "seed M-Adds", "seed top-1"]
    lines = [
        [r["model"], f"{r['params']:,}", f"{r['macs'] / 1e6:.1f}M", r["seed_params"],
         r["seed_macs"], f"{r['seed_top1']:.1f}"]
        for r in rows
    ]  # fmt: skip
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*line) for line in [header, *lines])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ca_flax.summary", description=__doc__)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--width-mult", type=float, default=1.0)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    print(format_table(summary_rows(args.size, width_mult=args.width_mult), args.markdown))


if __name__ == "__main__":
    main()
