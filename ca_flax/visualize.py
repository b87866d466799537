"""CLI: `python -m ca_flax.visualize (--checkpoint DIR | --workdir DIR) (IMAGE | --digits N)
--out maps.png [--blocks ...]`.

Draws, for each chosen Coordinate Attention block, the height gate, the width gate and their
product (channel means) as heat maps over the image the model saw, one row per block: the
preprocessed 224x224 crop of IMAGE, or each of the first N validation digits of the quickstart's
digits split (at the run's image size), with its label and the model's prediction.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure, FigureBase
from PIL import Image

from ca_flax.atomic import write_atomically
from ca_flax.attention_maps import (
    AttentionMapError,
    BlockMaps,
    batch_ca_maps,
    ca_maps,
    select_blocks,
)
from ca_flax.models.initializers import abstract_variables
from ca_flax.models.inputs import MEAN_RGB, STD_RGB
from ca_flax.preprocess import CROP, ImageError, crop_image, image_to_input, load_image

PANEL_INCHES = 3.0
COLUMNS = (
    ("height attention a_h", "height"),
    ("width attention a_w", "width"),
    ("a_h x a_w", "product"),
)
# Colour bars span at least this much: a nearly constant gate (a 1x1 map, a saturated sigmoid)
# would otherwise get ticks 1e-8 apart, printed as an offset such as `1e-8+4.98394e-1`.
MIN_SPAN = 0.001
# What train.py writes in its --workdir (ca_flax.training.trainer, .checkpoints); not imported
# from there, since the trainer pulls in TensorFlow.
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM = "default"


def color_limits(heat: np.ndarray, min_span: float = MIN_SPAN) -> tuple[float, float]:
    """(vmin, vmax) of a gate map: its range, widened about its middle to `min_span` and kept
    inside [0, 1] (where sigmoid gates and their products live) when it is narrower."""
    lo, hi = float(np.min(heat)), float(np.max(heat))
    if hi - lo >= min_span:
        return lo, hi
    mid = (lo + hi) / 2
    lo = min(max(mid - min_span / 2, 0.0), 1.0 - min_span)
    return lo, lo + min_span


def _draw_block_row(
    fig: FigureBase, row: Sequence[Axes], crop: Image.Image, block: BlockMaps
) -> None:
    extent = (0, crop.size[0], crop.size[1], 0)
    for ax, (title, method) in zip(row, COLUMNS, strict=True):
        heat = getattr(block, method)()
        vmin, vmax = color_limits(heat)
        ax.imshow(crop, extent=extent)  # pixel edges on the heat map's (default: centres)
        im = ax.imshow(
            heat,
            cmap="jet",
            alpha=0.5,
            vmin=vmin,
            vmax=vmax,
            extent=extent,
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


def plot_images(
    items: Sequence[tuple[Image.Image, Sequence[BlockMaps], str]], dpi: int = 100
) -> Figure:
    """For each (image, its blocks' maps, title): a (blocks x 3) grid of heat maps blended over
    the image, with colour bars; the grids are stacked, each under its title (if any)."""
    rows = [len(maps) for _, maps, _ in items]
    fig = Figure(
        figsize=(PANEL_INCHES * len(COLUMNS), PANEL_INCHES * sum(rows)),
        dpi=dpi,
        layout="constrained",
    )
    subfigs = fig.subfigures(len(items), 1, squeeze=False, height_ratios=rows)[:, 0]
    for sub, (crop, maps, title) in zip(subfigs, items, strict=True):
        axes = sub.subplots(len(maps), len(COLUMNS), squeeze=False)
        for row, block in zip(axes, maps, strict=True):
            _draw_block_row(sub, row, crop, block)
        if title:
            sub.suptitle(title, fontsize=10)
    return fig


def plot_maps(crop: Image.Image, maps: Sequence[BlockMaps], dpi: int = 100) -> Figure:
    """A (blocks x 3) grid of heat maps blended over `crop`, with titles and colour bars.

    A bare `Figure` (Agg canvas when saved), so no pyplot state or backend switch is involved.
    """
    return plot_images([(crop, maps, "")], dpi)


def save_figure(fig: Figure, out: str | Path) -> Path:
    """Write the figure as PNG to `out` (replacing it) through a temporary sibling."""
    return write_atomically(
        out, lambda path: fig.savefig(path, format="png", dpi=fig.dpi), overwrite=True
    )


@dataclass(frozen=True)
class Run:
    """What `load_workdir` found: the checkpoint it read, its eval top-1, the run's config."""

    workdir: Path
    step: int
    top1: float | None
    config: dict[str, Any]

    def describe(self) -> str:
        top1 = "" if self.top1 is None else f", eval top-1 {self.top1:.4f}"
        return f"{self.workdir} step {self.step}{top1}"


def _checkpoint_steps(workdir: Path) -> list[int]:
    directory = workdir / CHECKPOINTS_DIR
    if not directory.is_dir():
        return []
    return sorted(
        int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / STATE_ITEM).is_dir()
    )


def _eval_top1(workdir: Path, step: int) -> float | None:
    history = workdir / "eval_history.jsonl"
    if not history.is_file():
        return None
    for line in history.read_text().splitlines():
        try:
            entry = json.loads(line)
            if entry.get("step") == step:
                return float(entry["eval/top1"])
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # only printed beside the output path; a torn line costs nothing else
    return None


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """absl's Python logger (where orbax logs) at ERROR for the duration."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_workdir(workdir: str | Path) -> tuple[Any, dict[str, Any], Run]:
    """Model and variables of a `train.py --workdir` run: its best checkpoint by eval top-1
    (the latest when the best was not recorded or is gone), the model built from the config in
    its `summary.json`. Raw weights, also when the run kept an EMA."""
    import jax
    import orbax.checkpoint as ocp

    from ca_flax.models.registry import create_model
    from ca_flax.pretrained import check_stored_shapes

    workdir = Path(workdir).absolute()
    if not workdir.is_dir():
        raise FileNotFoundError(f"{workdir}: no such training workdir")
    steps = _checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(
            f"{workdir}: no checkpoint in {CHECKPOINTS_DIR}/ (not a train.py --workdir, or its "
            "run saved none yet)"
        )
    summary_path = workdir / SUMMARY_FILE
    if not summary_path.is_file():
        raise FileNotFoundError(
            f"{workdir}: no {SUMMARY_FILE} with the run's config (train.py writes it when the "
            "run finishes; finish it by running the same train.py command again)"
        )
    try:
        summary = json.loads(summary_path.read_text())
        config = summary["config"]
        model_name, width, classes = config["model"], config["width_mult"], config["num_classes"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{summary_path}: not a train.py summary ({e!r})") from e
    best = summary.get("best_checkpoint_step")
    step = best if best in steps else steps[-1]

    model = create_model(model_name, num_classes=classes, width_mult=width)
    size = int(config.get("image_size", CROP))
    shapes = abstract_variables(model, size)
    target = {k: shapes[k] for k in ("params", "batch_stats")}
    path = workdir / CHECKPOINTS_DIR / str(step) / STATE_ITEM
    with _quiet_absl():  # orbax warns that the item has no metadata file of its own
        stored = ocp.StandardCheckpointer().metadata(path).item_metadata
    check_stored_shapes(str(path), stored, target, f"model from {SUMMARY_FILE}'s config")
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    variables = ocp.PyTreeCheckpointer().restore(
        path,
        args=ocp.args.PyTreeRestore(item=target, restore_args=as_numpy, partial_restore=True),
    )
    return model, variables, Run(workdir, step, _eval_top1(workdir, step), config)


def validation_digits(count: int, image_size: int) -> tuple[np.ndarray, list[int]]:
    """The first `count` images of the digits validation split that `train.py` evaluates on
    (config.dataset='digits'), as normalised (count, S, S, 3) float32, and their labels."""
    # The digits module comes with the training package, which imports TensorFlow (unused
    # here); keep its C++ start-up lines (log setup, oneDNN notice) off the console.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    from ca_flax.training.data import Layout
    from ca_flax.training.digits import NUM_VALIDATION, DigitsDataset

    if not 1 <= count <= NUM_VALIDATION:
        raise ValueError(f"--digits {count}: choose 1 to {NUM_VALIDATION} validation digits")
    data = DigitsDataset(image_size, Layout(1, 1, 0, 1), seed=0)
    return data.eval_images[:count], [int(y) for y in data.eval_labels[:count]]


def _to_picture(image: np.ndarray) -> Image.Image:
    """A normalised (S, S, 3) image back to the RGB picture it was made from."""
    rgb = np.clip(image * np.float32(STD_RGB) + np.float32(MEAN_RGB), 0.0, 1.0)
    return Image.fromarray(np.round(rgb * 255).astype(np.uint8))


def render(
    out: str,
    blocks: Sequence[str] | None,
    dpi: int,
    checkpoint: str | None = None,
    workdir: str | None = None,
    image: str | None = None,
    digits: int = 0,
) -> tuple[Path, Run | None]:
    """Load the model (a checkpoint or a training workdir) and the image (a file or validation
    digits), compute the sown CA gates and write the grid to `out`."""
    from ca_flax.pretrained import load_pretrained

    crop = crop_image(load_image(image)) if image else None
    run = None
    if workdir:
        model, variables, run = load_workdir(workdir)
    else:
        model, variables = load_pretrained(checkpoint)
    if crop is not None:
        maps = select_blocks(ca_maps(model, variables, image_to_input(crop)[None]), blocks)
        return save_figure(plot_maps(crop, maps, dpi), out), run

    size = int(run.config.get("image_size", CROP)) if run else CROP
    images, labels = validation_digits(digits, size)
    logits, per_image = batch_ca_maps(model, variables, images)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    items = []
    for i, (label, maps) in enumerate(zip(labels, per_image, strict=True)):
        pred = int(probs[i].argmax())
        title = f"validation digit #{i}: a {label}, predicted {pred} ({probs[i, pred]:.0%})"
        items.append((_to_picture(images[i]), select_blocks(maps, blocks), title))
    return save_figure(plot_images(items, dpi), out), run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ca_flax.visualize",
        description="Draw Coordinate Attention maps (height, width, product) over an image.",
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="directory of a *_ca checkpoint")
    model.add_argument(
        "--workdir",
        help="a train.py --workdir: its best checkpoint (else latest), model from summary.json",
    )
    parser.add_argument("image", nargs="?", help="image file (any PIL format)")
    parser.add_argument(
        "--digits",
        type=int,
        default=0,
        metavar="N",
        help="instead of an image: the first N validation digits of the digits quickstart",
    )
    parser.add_argument("--out", required=True, help="output PNG path")
    parser.add_argument(
        "--blocks",
        nargs="+",
        help="blocks to draw, e.g. 2 9 features_16 (default: 4 spread out, larger than 1x1)",
    )
    parser.add_argument("--dpi", type=int, default=100, help="pixels per inch (3 in per panel)")
    args = parser.parse_args(argv)
    if (args.image is None) == (args.digits == 0):
        parser.error("give an image file or --digits N (one of them)")
    if args.digits < 0:
        parser.error(f"--digits {args.digits}: must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out, run = render(
            args.out,
            args.blocks,
            args.dpi,
            checkpoint=args.checkpoint,
            workdir=args.workdir,
            image=args.image,
            digits=args.digits,
        )
    except (AttentionMapError, ImageError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}" + (f" (model: {run.describe()})" if run else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
