"""ImageNet-1k class names shipped with the package, in the sorted-synset order of the weights."""

from __future__ import annotations

import functools
from importlib import resources

CLASSES_FILE = "imagenet1k_classes.tsv"


@functools.cache
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 human-readable class names, indexed like the released logits."""
    text = resources.files("ca_flax").joinpath("data", CLASSES_FILE).read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines()[1:] if line.strip()]
    return tuple(name for _, _, name in sorted(rows, key=lambda r: int(r[0])))


def class_names(num_classes: int) -> tuple[str, ...]:
    """ImageNet names for a 1000-way model, else generic `class <i>` labels (fine-tuned heads)."""
    if num_classes == 1000:
        return imagenet_classes()
    return tuple(f"class {i}" for i in range(num_classes))
