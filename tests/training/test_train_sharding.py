"""A train step sharded over 8 simulated CPU devices equals the same step on one device.

Both are built as the trainer builds them, with the CPU backend's training ops
(`backend_ops=cpu.training_ops` for the mesh's size): a one-device process takes its depthwise gradients from the
CPU kernels (where built, under 'shifted_windows'), an 8-device one keeps XLA's loops (a kernel
call would gather the sharded batch on every device). So the single-device step runs in a
process of its own, and the 8-device process compares its step with the one saved there.

One full-learning-rate step is compared: loss, gradients (momentum), parameters, BatchNorm
statistics and EMA agree to float32 rounding (per-device BatchNorm would be off by far more).
Later steps are not compared: from the second step on, this tiny 32x32 digits model has
near-constant BatchNorm channels whose 1/sqrt(eps) gain amplifies rounding differences in the
reduction order (one step: ~1e-4 relative) until gradients differ by tens of percent.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ca_flax.ops import FORMULATIONS
from tests.helpers import training

SCRIPT = r"""
import functools
import sys
import jax, numpy as np
from configs import quickstart
from ca_flax import cpu
from ca_flax.cpu import kernels
from ca_flax.ops import conv_formulation
from ca_flax.training import optim, steps, trainer
from ca_flax.training.data import Layout
from ca_flax.training.digits import DigitsDataset

formulation, saved = sys.argv[1], sys.argv[2]
devices = jax.devices()
assert len(devices) in (1, 8), devices
c = quickstart.get_config()
c.batch_size, c.ema_decay, c.label_smoothing, c.weight_decay_exclude = 16, 0.9, 0.1, True
c.warmup_epochs = 0.0  # full learning rate from the first step
model = trainer.build_model(c)
data = DigitsDataset(32, Layout(16, 16, 0, 1), seed=0)
schedule = optim.learning_rate_schedule(c, data.steps_per_epoch, 10)
tx = optim.create_optimizer(c, schedule)

def kernel_calls(text):
    return sum(text.count(target) for target in kernels.TARGETS)

mesh = steps.create_mesh(devices)
state = steps.init_state(model, tx, 32, 0, True, mesh)
ops = functools.partial(cpu.training_ops, mesh.size)  # as the trainer builds its step
train_fn = steps.make_train_step(model, tx, c, schedule, backend_ops=ops)
train, evaluate = steps.jit_steps(train_fn, steps.make_eval_step(model), mesh)
b = next(data.train_batches(0))
batch = steps.global_batch({"image": b["image"], "label": b["label"]}, mesh)
assert len(batch["image"].addressable_shards) == len(devices)
assert batch["image"].addressable_shards[0].data.shape[0] == 16 // len(devices)
mask = np.ones(len(b["label"]), np.float32)
eval_batch = steps.global_batch({"image": b["image"], "label": b["label"], "mask": mask}, mesh)
with conv_formulation(formulation):  # the steps trace here, in this formulation
    lowered = train.lower(state, batch)
    in_eval = kernel_calls(evaluate.lower(state.variables(), eval_batch).as_text())
in_train = kernel_calls(lowered.as_text())
state, metrics = lowered.compile()(state, batch)
assert int(state.step) == 1 and int(state.bad_step) == -1
assert state.params["features_0"]["0"]["kernel"].sharding.is_fully_replicated
state, metrics = jax.device_get(state), jax.device_get(metrics)

# The eval step is the plain model everywhere; the train step calls the gradient kernels on
# one device only, and there only where they are built and the depthwise is shifted windows.
assert in_eval == 0, in_eval
kernels_here = len(devices) == 1 and formulation == "shifted_windows" and cpu.kernels_available()
assert in_train > 0 if kernels_here else in_train == 0, (len(devices), in_train)

leaves = {jax.tree_util.keystr(p): np.asarray(a) for p, a in jax.tree_util.tree_leaves_with_path(state)}
if len(devices) == 1:
    np.savez(saved, **{f"metric/{k}": v for k, v in metrics.items()}, **leaves)
    print("SAVED_SINGLE", float(metrics["loss"]), in_train)
    sys.exit(0)
single = np.load(saved)
np.testing.assert_allclose(metrics["loss"], single["metric/loss"], rtol=1e-5)
np.testing.assert_allclose(metrics["accuracy"], single["metric/accuracy"])
assert sorted(leaves) == sorted(k for k in single.files if not k.startswith("metric/"))
for path, a in leaves.items():
    a, b = np.asarray(a, np.float64), np.asarray(single[path], np.float64)
    err, scale = np.max(np.abs(a - b), initial=0), np.max(np.abs(b), initial=0)
    assert err <= 2e-3 * scale + 1e-5, (path, err, scale)
print("SHARDED_EQUALS_SINGLE", float(metrics["loss"]), float(single["metric/loss"]))
"""


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_sharded_step_equals_single_device_step(formulation: str, tmp_path: Path) -> None:
    """In both formulations: GPUs and TPUs train under 'lax_conv', with the fused BatchNorm
    gradient; the CPU under 'shifted_windows', on one device with the gradient kernels."""
    saved = tmp_path / "single.npz"
    for devices, done in ((1, "SAVED_SINGLE"), (8, "SHARDED_EQUALS_SINGLE")):
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT, formulation, str(saved)],
            cwd=training.REPO,
            env=training.env(devices=devices),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, (devices, proc.stderr[-4000:])
        assert done in proc.stdout, (devices, proc.stdout[-2000:])
