"""Shared fixtures (helpers are in tests/helpers): CPU-only JAX, the reference facts' folder."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

from tests.helpers.reference import REFERENCE  # noqa: E402


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.fail(f"reference facts not found at {REFERENCE}")
    return REFERENCE
