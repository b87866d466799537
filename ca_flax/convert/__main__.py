"""CLI: `python -m ca_flax.convert SRC --model NAME [--width-mult W] [--ema] --out DIR`."""

from __future__ import annotations

import argparse
import sys

from ca_flax.convert import ConversionError, load_torch_checkpoint, sha256_of
from ca_flax.models.registry import list_models
from ca_flax.pretrained import save_pretrained


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ca_flax.convert",
        description="Convert a released PyTorch checkpoint into a ca_flax (orbax) checkpoint.",
    )
    parser.add_argument("src", help="PyTorch checkpoint (.pth / .pth.tar)")
    parser.add_argument("--model", required=True, help=f"one of: {', '.join(list_models())}")
    parser.add_argument("--width-mult", type=float, default=1.0)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--ema", action="store_true", help="take 'state_dict_ema' from the file")
    parser.add_argument("--out", required=True, help="output directory (must not exist)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kwargs = {"width_mult": args.width_mult, "num_classes": args.num_classes}
    try:
        variables = load_torch_checkpoint(args.src, args.model, ema=args.ema, **kwargs)
        out = save_pretrained(
            args.out,
            args.model,
            variables,
            kwargs,
            extra={"source": str(args.src), "source_sha256": sha256_of(args.src), "ema": args.ema},
        )
    except (ConversionError, FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({args.model}, width {args.width_mult})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
