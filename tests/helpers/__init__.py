"""Helpers shared by the tests: tiny models and datasets, train.py runs, reference facts."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
