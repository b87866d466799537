"""Benchmarks beside PyTorch (`python -m ca_flax.bench`), roofline figures, GPU profiles and the
program digests that say whether a GPU measurement still holds (`python -m ca_flax.bench.digest`).
Nothing else in ca_flax imports this package."""

from ca_flax.bench.cli import main, parse_args

__all__ = ["main", "parse_args"]
