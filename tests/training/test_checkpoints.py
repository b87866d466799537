"""The trainer's orbax Checkpointer keeps the best eval step, also across a restart."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from ca_flax.training.checkpoints import Checkpointer
from ca_flax.training.steps import TrainState


def _state(step: int) -> TrainState:
    weights = {"w": jnp.full((2,), float(step))}
    return TrainState(jnp.asarray(step), weights, {}, {}, {}, jnp.asarray(-1))


def _save(checkpointer: Checkpointer, step: int, top1: float | None) -> None:
    checkpointer.save(_state(step), None if top1 is None else {"top1": top1})
    checkpointer.wait()


def test_best_step_survives_newer_saves_and_a_restart(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, keep=2)
    for step, top1 in [(1, 0.9), (2, 0.1), (3, None), (4, 0.3)]:  # step 3: a periodic save
        _save(checkpointer, step, top1)
    assert checkpointer.best_step() == 1
    checkpointer.close()

    resumed = Checkpointer(tmp_path, keep=2)  # as after a preemption
    for step, top1 in [(5, 0.4), (6, 0.5)]:
        _save(resumed, step, top1)
    assert resumed.best_step() == 1
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [1, 5, 6]
    restored = resumed.restore(_state(0), step=1)
    assert float(restored.params["w"][0]) == 1.0
    resumed.close()
