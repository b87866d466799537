"""A train step sharded over 8 simulated CPU devices equals the same step on one device.

One full-learning-rate step is compared: loss, gradients (momentum), parameters, BatchNorm
statistics and EMA agree to float32 rounding (per-device BatchNorm would be off by far more).
Later steps are not compared: from the second step on, this tiny 32x32 digits model has
near-constant BatchNorm channels whose 1/sqrt(eps) gain amplifies rounding differences in the
reduction order (one step: ~1e-4 relative) until gradients differ by tens of percent.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from ca_flax.layers import CONV_FORMULATIONS
from tests.helpers import training

SCRIPT = r"""
import sys
import jax, numpy as np
from configs import quickstart
from ca_flax import cpu_kernels
from ca_flax.layers import conv_formulation
from ca_flax.training import optim, steps, trainer
from ca_flax.training.data import Layout
from ca_flax.training.digits import DigitsDataset

assert jax.device_count() == 8, jax.devices()
c = quickstart.get_config()
c.batch_size, c.ema_decay, c.label_smoothing, c.weight_decay_exclude = 16, 0.9, 0.1, True
c.warmup_epochs = 0.0  # full learning rate from the first step
model = trainer.build_model(c)
data = DigitsDataset(32, Layout(16, 16, 0, 1), seed=0)
schedule = optim.learning_rate_schedule(c, data.steps_per_epoch, 10)
tx = optim.create_optimizer(c, schedule)

def run(devices):
    mesh = steps.create_mesh(devices)
    state = steps.init_state(model, tx, 32, 0, True, mesh)
    train_fn = steps.make_train_step(model, tx, c, schedule)
    train, _ = steps.jit_steps(train_fn, steps.make_eval_step(model), mesh)
    batches = data.train_batches(0)
    for _ in range(1):
        b = next(batches)
        batch = steps.global_batch({"image": b["image"], "label": b["label"]}, mesh)
        assert len(batch["image"].addressable_shards) == len(devices)
        assert batch["image"].addressable_shards[0].data.shape[0] == 16 // len(devices)
        state, metrics = train(state, batch)
    assert int(state.step) == 1 and int(state.bad_step) == -1
    assert state.params["features_0"]["0"]["kernel"].sharding.is_fully_replicated
    return jax.device_get(state), jax.device_get(metrics)

# The 8-device eval step keeps XLA's loops (a CPU kernel call would gather the batch on every
# device); the model alone on one device does call the kernels.
def eval_program(variables, batch):
    _, evaluate = steps.jit_steps(lambda s, b: (s, {}), steps.make_eval_step(model), mesh8)
    mask = np.ones(len(batch["label"]), np.float32)
    program = evaluate.lower(variables, {**batch, "mask": mask}).as_text()
    infer = jax.jit(lambda v, x: model.apply(v, x, train=False))
    alone = infer.lower(variables, batch["image"]).as_text()
    return tuple(sum(text.count(t) for t in cpu_kernels.TARGETS) for text in (program, alone))

mesh8 = steps.create_mesh(jax.devices())
with conv_formulation(sys.argv[1]):  # traced on the first call, inside run
    sharded, m8 = run(jax.devices())
    single, m1 = run(jax.devices()[:1])
    first = next(data.train_batches(0))
    images = {"image": first["image"], "label": first["label"]}
    in_eval, alone = eval_program(single.variables(), images)
assert in_eval == 0, in_eval
assert alone > 0 if sys.argv[1] == "windows" and cpu_kernels.available() else alone == 0, alone
np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
np.testing.assert_allclose(m8["accuracy"], m1["accuracy"])
for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(sharded), jax.tree.leaves(single)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err, scale = np.max(np.abs(a - b), initial=0), np.max(np.abs(b), initial=0)
    assert err <= 2e-3 * scale + 1e-5, (jax.tree_util.keystr(path), err, scale)
print("SHARDED_EQUALS_SINGLE", float(m8["loss"]), float(m1["loss"]))
"""


@pytest.mark.parametrize("formulation", CONV_FORMULATIONS)
def test_sharded_step_equals_single_device_step(formulation: str) -> None:
    """In both formulations: GPUs and TPUs train under 'xla', with the fused BatchNorm gradient."""
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, formulation],
        cwd=training.REPO,
        env=training.env(devices=8),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "SHARDED_EQUALS_SINGLE" in proc.stdout
