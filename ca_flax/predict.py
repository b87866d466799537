"""CLI: `python -m ca_flax.predict --checkpoint DIR IMAGE [IMAGE ...]` prints top-k classes.

Images that are missing or unreadable get a one-line message on stderr; the rest are still
classified, and the exit status is 1 if any image failed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from ca_flax import cpu
from ca_flax.classes import class_names
from ca_flax.preprocess import ImageError, preprocess_file

BATCH = 16


def make_classifier(
    model: nn.Module, variables: dict[str, Any]
) -> Callable[[jax.Array], jax.Array]:
    """NHWC batch -> softmax probabilities with inference-mode BatchNorm, through the CPU
    backend (`ca_flax.cpu.make_inference_fn`: the batch split over this process's devices; on
    CPU the command line asks for one device per core)."""
    logits = cpu.make_inference_fn(model, variables)
    return lambda batch: jax.nn.softmax(logits(batch), axis=-1)


def top_k(probs: np.ndarray, names: Sequence[str], k: int = 5) -> list[tuple[str, float]]:
    """The `k` most probable (name, probability) pairs of one probability vector."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [(names[i], float(probs[i])) for i in order]


def classify(
    model: nn.Module, variables: dict[str, Any], images: np.ndarray, k: int = 5
) -> list[list[tuple[str, float]]]:
    """Top-k (name, probability) lists for a stack of preprocessed (N, H, W, 3) images."""
    probs_fn = make_classifier(model, variables)
    probs = np.concatenate(
        [np.asarray(probs_fn(images[i : i + BATCH])) for i in range(0, len(images), BATCH)]
    )
    names = class_names(probs.shape[-1])
    return [top_k(p, names, k) for p in probs]


def load_images(paths: Sequence[str]) -> tuple[list[str], list[np.ndarray], list[str]]:
    """Preprocess every path; returns (ok paths, arrays, one-line errors for the rest)."""
    ok, arrays, errors = [], [], []
    for path in paths:
        try:
            arrays.append(preprocess_file(path))
            ok.append(path)
        except ImageError as e:
            errors.append(str(e))
    return ok, arrays, errors


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ca_flax.predict",
        description="Classify images with a ca_flax checkpoint (ImageNet eval preprocessing).",
    )
    parser.add_argument("--checkpoint", required=True, help="directory from ca_flax.convert")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any PIL format)")
    parser.add_argument("--top", type=int, default=5, help="classes to print per image")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.top < 1:
        print(f"error: --top {args.top}: must be at least 1", file=sys.stderr)
        return 2
    from ca_flax.pretrained import load_pretrained

    try:
        model, variables = load_pretrained(args.checkpoint)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths, arrays, errors = load_images(args.images)
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    if arrays:
        results = classify(model, variables, np.stack(arrays), args.top)
        for path, top in zip(paths, results, strict=True):
            print(path)
            for name, p in top:
                print(f"  {p:7.2%}  {name}")
    return 1 if errors else 0


if __name__ == "__main__":
    cpu.use_cpu_cores()  # before JAX starts: one CPU device per core, each classifying its images
    sys.exit(main())
