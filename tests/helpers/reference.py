"""The released checkpoints' layouts, from tests/data/reference (see its README.md)."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import DATA

REFERENCE = DATA / "reference"


def read_keys_tsv(path: Path) -> dict[str, tuple[int, ...]]:
    """key -> shape from a released `*.keys.tsv`, without `num_batches_tracked`."""
    out = {}
    for line in path.read_text().splitlines()[1:]:
        key, shape, _ = line.split("\t")
        if not key.endswith("num_batches_tracked"):
            out[key] = tuple(int(s) for s in shape.split(",")) if shape else ()
    return out
