"""The one data-parallel layout both the trainer and spread inference use: a 1-D 'data' mesh,
state replicated, batches split along their first axis. Models never see it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def data_mesh(devices: Sequence[Any]) -> Mesh:
    """`devices` on one 'data' axis."""
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """A copy on every device of `mesh`."""
    return NamedSharding(mesh, P())


def batch_split(mesh: Mesh) -> NamedSharding:
    """Split along the first (batch) axis over `mesh`'s 'data' axis."""
    return NamedSharding(mesh, P(DATA_AXIS))
