"""Shared fixtures: paths to the reference facts and converted PyTorch references."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

REFERENCE = Path(__file__).resolve().parent / "data" / "reference"  # see its README.md


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.fail(f"reference facts not found at {REFERENCE}")
    return REFERENCE


def read_keys_tsv(path: Path) -> dict[str, tuple[int, ...]]:
    """key -> shape from a released `*.keys.tsv`, without `num_batches_tracked`."""
    out = {}
    for line in path.read_text().splitlines()[1:]:
        key, shape, _ = line.split("\t")
        if not key.endswith("num_batches_tracked"):
            out[key] = tuple(int(s) for s in shape.split(",")) if shape else ()
    return out
