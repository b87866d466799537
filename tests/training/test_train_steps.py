"""The jitted train step on a tiny model: a NaN loss freezes the state and records the step."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from ca_flax.models.layers import BatchNorm
from ca_flax.training import optim, steps
from tests.helpers import training


class Tiny(nn.Module):
    """Conv + torch-style BatchNorm + classifier: enough for the step's plumbing."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = BatchNorm()(nn.Conv(4, (3, 3))(x), train)
        x = nn.Dropout(0.1, deterministic=not train)(x.mean((1, 2)))
        return nn.Dense(self.num_classes)(x)


def _setup():
    config = training.config()
    config.warmup_epochs, config.ema_decay = 0.0, 0.5
    schedule = optim.learning_rate_schedule(config, 10, 100)
    tx = optim.create_optimizer(config, schedule)
    model, mesh = Tiny(), steps.create_mesh()
    state = steps.init_state(model, tx, 8, 0, True, mesh)
    train, _ = steps.jit_steps(
        steps.make_train_step(model, tx, config, schedule), steps.make_eval_step(model), mesh
    )
    return state, train, mesh


def _batch(mesh, seed: int, poison: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(8, 8, 8, 3)).astype(np.float32)
    if poison:
        images[0, 0, 0, 0] = np.nan
    labels = rng.integers(0, 10, size=8).astype(np.int32)
    return steps.global_batch({"image": images, "label": labels}, mesh)


def test_nan_loss_freezes_state_and_names_step() -> None:
    state, train, mesh = _setup()
    state, metrics = train(state, _batch(mesh, 0))
    assert np.isfinite(metrics["loss"]) and int(state.bad_step) == -1
    good = jax.device_get(state)
    state, metrics = train(state, _batch(mesh, 1, poison=True))
    assert not np.isfinite(metrics["loss"])
    assert int(state.bad_step) == 1 and int(state.step) == 2
    state, _ = train(state, _batch(mesh, 2))  # later finite steps do not thaw it
    after = jax.device_get(state)
    assert int(after.bad_step) == 1
    for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(good.params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(after.ema), jax.tree.leaves(good.ema), strict=True):
        np.testing.assert_array_equal(a, b)


def test_ema_tracks_weights() -> None:
    state, train, mesh = _setup()
    before = jax.device_get(state)
    state, _ = train(state, _batch(mesh, 0))
    after = jax.device_get(state)
    kernel = ("Conv_0", "kernel")
    raw, ema = after.params[kernel[0]][kernel[1]], after.ema["params"][kernel[0]][kernel[1]]
    start = before.params[kernel[0]][kernel[1]]
    np.testing.assert_allclose(ema, 0.5 * start + 0.5 * raw, rtol=1e-6, atol=1e-7)
