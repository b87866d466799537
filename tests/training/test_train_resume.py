"""Quickstart learns; SIGTERM mid-run then resume ends with the same parameters as no stop."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import training

# 3 epochs of 44 steps at batch 32 (1,437 training digits).
RUN = [
    *training.SMALL,
    "--config.num_epochs=3",
    "--config.warmup_epochs=0.5",
    "--config.ema_decay=0.9",  # EMA weights are saved, restored and evaluated too
]
TOTAL = 132


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    training.run_train(workdir, *RUN, cache_dir=cache_dir)
    return workdir


def test_quickstart_learns(uninterrupted: Path) -> None:
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["steps"] == TOTAL
    assert summary["final"]["eval/count"] == 360
    assert summary["best"]["eval/top1"] >= 0.6, summary["best"]  # chance is 0.1
    assert summary["final"]["eval_ema/count"] == 360
    assert list((uninterrupted).glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert training.checkpoint_steps(uninterrupted)[-1] == TOTAL


def test_sigterm_then_resume_matches_uninterrupted(
    uninterrupted: Path, cache_dir: Path, tmp_path: Path
) -> None:
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        training.train_cmd(workdir, *RUN),
        cwd=training.REPO,
        env=training.env(1, cache_dir),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    log = []
    for line in proc.stderr:
        log.append(line)
        if f"step 50/{TOTAL}" in line:
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, "".join(log[-40:])
    assert any("SIGTERM: saving step" in line for line in log)
    stopped = training.checkpoint_steps(workdir)[-1]
    assert 50 <= stopped < TOTAL
    assert not (workdir / "summary.json").exists()

    resumed = training.run_train(workdir, *RUN, cache_dir=cache_dir)
    assert f"resuming from checkpoint step {stopped}" in resumed.stderr
    final = training.load_checkpoint(workdir, TOTAL)
    expected = training.load_checkpoint(uninterrupted, TOTAL)
    training.assert_trees_close(final, expected)
    assert int(np.asarray(final["step"])) == TOTAL


def test_resume_with_another_model_config_is_one_line(
    uninterrupted: Path, cache_dir: Path, tmp_path: Path
) -> None:
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    proc = subprocess.run(
        training.train_cmd(workdir, *RUN, "--config.width_mult=0.5"),
        cwd=training.REPO,
        env=training.env(1, cache_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "is stored as" in errors[0], proc.stderr[-3000:]
    assert "another model config" in errors[0]


def test_rerun_of_a_finished_run_keeps_its_summary(
    uninterrupted: Path, cache_dir: Path, tmp_path: Path
) -> None:
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    before = json.loads((workdir / "summary.json").read_text())
    # A resumed run restores its checkpoint without computing a fresh init or reading init_from.
    gone = f"--config.init_from={tmp_path / 'deleted_pretrained'}"
    training.run_train(workdir, *RUN, gone, cache_dir=cache_dir)
    after = json.loads((workdir / "summary.json").read_text())
    assert after["images_per_second"] == before["images_per_second"] > 0
    assert after["best_checkpoint_step"] == before["best"]["step"]
