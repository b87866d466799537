"""CLI: `python -m ca_flax.visualize --checkpoint DIR IMAGE --out maps.png [--blocks ...]`.

Draws, for each chosen Coordinate Attention block, the height gate, the width gate and their
product (channel means) as heat maps over the preprocessed 224x224 crop, one row per block.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from ca_flax.atomic import write_atomically
from ca_flax.attention_maps import AttentionMapError, BlockMaps, ca_maps, select_blocks
from ca_flax.preprocess import ImageError, crop_image, load_image, normalize

PANEL_INCHES = 3.0
COLUMNS = (
    ("height attention a_h", "height"),
    ("width attention a_w", "width"),
    ("a_h x a_w", "product"),
)
# Colour bars span at least this much: a nearly constant gate (a 1x1 map, a saturated sigmoid)
# would otherwise get ticks 1e-8 apart, printed as an offset such as `1e-8+4.98394e-1`.
MIN_SPAN = 0.01


def color_limits(heat: np.ndarray, min_span: float = MIN_SPAN) -> tuple[float, float]:
    """(vmin, vmax) of a gate map: its range, widened about its middle to `min_span` and kept
    inside [0, 1] (where sigmoid gates and their products live) when it is narrower."""
    lo, hi = float(np.min(heat)), float(np.max(heat))
    if hi - lo >= min_span:
        return lo, hi
    mid = (lo + hi) / 2
    lo = min(max(mid - min_span / 2, 0.0), 1.0 - min_span)
    return lo, lo + min_span


def plot_maps(crop: Image.Image, maps: Sequence[BlockMaps], dpi: int = 100) -> Figure:
    """A (blocks x 3) grid of heat maps blended over `crop`, with titles and colour bars.

    A bare `Figure` (Agg canvas when saved), so no pyplot state or backend switch is involved.
    """
    rows = len(maps)
    fig = Figure(
        figsize=(PANEL_INCHES * len(COLUMNS), PANEL_INCHES * rows), dpi=dpi, layout="constrained"
    )
    axes = fig.subplots(rows, len(COLUMNS), squeeze=False)
    size = crop.size
    for row, block in zip(axes, maps, strict=True):
        for ax, (title, method) in zip(row, COLUMNS, strict=True):
            heat = getattr(block, method)()
            vmin, vmax = color_limits(heat)
            ax.imshow(crop)
            im = ax.imshow(
                heat,
                cmap="jet",
                alpha=0.5,
                vmin=vmin,
                vmax=vmax,
                extent=(0, size[0], size[1], 0),
                interpolation="bilinear",
            )
            cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            cbar.formatter.set_useOffset(False)  # plain decimals, never `offset + tick`
            cbar.formatter.set_scientific(False)
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        h, w = block.a_h.shape[0], block.a_w.shape[0]
        row[0].set_ylabel(f"{block.path}\n{h}x{w}, {block.a_h.shape[1]} ch", fontsize=9)
    return fig


def save_figure(fig: Figure, out: str | Path) -> Path:
    """Write the figure as PNG to `out` (replacing it) through a temporary sibling."""
    return write_atomically(
        out, lambda path: fig.savefig(path, format="png", dpi=fig.dpi), overwrite=True
    )


def render(checkpoint: str, image: str, out: str, blocks: Sequence[str] | None, dpi: int) -> Path:
    """Load checkpoint and image, compute the sown CA gates and write the grid to `out`."""
    from ca_flax.pretrained import load_pretrained

    crop = crop_image(load_image(image))
    model, variables = load_pretrained(checkpoint)
    maps = select_blocks(ca_maps(model, variables, normalize(crop)[None]), blocks)
    return save_figure(plot_maps(crop, maps, dpi), out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ca_flax.visualize",
        description="Draw Coordinate Attention maps (height, width, product) over an image.",
    )
    parser.add_argument("--checkpoint", required=True, help="directory of a *_ca checkpoint")
    parser.add_argument("image", help="image file (any PIL format)")
    parser.add_argument("--out", required=True, help="output PNG path")
    parser.add_argument(
        "--blocks", nargs="+", help="blocks to draw, e.g. 2 9 features_16 (default: 4 spread out)"
    )
    parser.add_argument("--dpi", type=int, default=100, help="pixels per inch (3 in per panel)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = render(args.checkpoint, args.image, args.out, args.blocks, args.dpi)
    except (AttentionMapError, ImageError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
