"""Two processes joined by jax.distributed (CPU, gloo) compute what one process computes."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ca_flax
from ca_flax.models.initializers import init_variables
from ca_flax.pretrained import save_pretrained
from ca_flax.training import optim, steps, trainer
from ca_flax.training.checkpoints import Checkpointer
from ca_flax.training.data import Layout
from ca_flax.training.digits import DigitsDataset
from tests.helpers import training

RUN = [*training.SMALL, "--config.num_train_steps=2", "--config.log_every_steps=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_processes_read_disjoint_rows_of_each_global_batch() -> None:
    parts = [DigitsDataset(32, Layout(32, 120, p, 2), seed=0) for p in range(2)]
    whole = DigitsDataset(32, Layout(32, 120, 0, 1), seed=0)
    for step in (0, 5, 44):
        rows = [next(part.train_batches(step))["index"] for part in parts]
        assert not set(rows[0]) & set(rows[1])
        np.testing.assert_array_equal(
            np.concatenate(rows), next(whole.train_batches(step))["index"]
        )


def _imagenet_pretrained(directory: Path) -> Path:
    """A 1000-class checkpoint of the quickstart's model, as `init_from` takes it."""
    model = ca_flax.create_model("mobilenetv2_ca", width_mult=0.35)
    variables = init_variables(model, jax.random.key(7), jnp.zeros((1, 32, 32, 3)), train=False)
    return save_pretrained(directory, "mobilenetv2_ca", variables, {"width_mult": 0.35})


def test_two_processes_match_one_process(tmp_path: Path) -> None:
    """Also from a pretrained checkpoint (init_from), which every process loads."""
    port = _free_port()
    multi = tmp_path / "two_processes"
    run = [*RUN, f"--config.init_from={_imagenet_pretrained(tmp_path / 'pretrained')}"]
    procs = [
        subprocess.Popen(
            training.train_cmd(multi, *run)
            + [
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                "--cpu_collectives=gloo",
            ],
            cwd=training.REPO,
            env=training.env(devices=1),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=600)[1] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    assert "step 2/2" in logs[0] and "step 2/2" not in logs[1]  # process 0 alone logs
    assert all("init_from: re-initialised params/classifier_1" in log for log in logs)

    single = tmp_path / "one_process"
    training.run_train(single, *run, devices=2)
    summaries = [json.loads((d / "summary.json").read_text()) for d in (multi, single)]
    assert summaries[0]["processes"] == 2 and summaries[1]["processes"] == 1
    assert summaries[0]["final"]["eval/count"] == summaries[1]["final"]["eval/count"] == 360
    training.assert_trees_close(
        training.load_checkpoint(multi), training.load_checkpoint(single), 1e-4, 2e-6
    )

    # The checkpoint written over 2 processes restores onto this process's single device.
    config = training.config()
    model, mesh = trainer.build_model(config), steps.create_mesh(jax.devices()[:1])
    tx = optim.create_optimizer(config, optim.learning_rate_schedule(config, 44, 2))
    restored = Checkpointer(multi, keep=1).restore(steps.abstract_state(model, tx, 32, False, mesh))
    assert int(restored.step) == 2
    saved = training.load_checkpoint(multi)
    for name in ("params", "batch_stats"):
        training.assert_trees_close(jax.device_get(getattr(restored, name)), saved[name])
