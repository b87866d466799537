"""Running train.py in subprocesses for the training tests, and reading its checkpoints."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tests.helpers import REPO

# A tiny, fast run of the quickstart: digits at 32x32, width 0.35, batch 32.
SMALL = [
    "--config.batch_size=32",
    "--config.eval_batch_size=120",
    "--config.log_every_steps=2",
    "--config.checkpoint_every_steps=1000",
]


def config(name: str = "quickstart") -> Any:
    """`configs/<name>.py`'s config (pytest puts the repo root, the `tests` package's parent,
    on sys.path, so `configs` imports as train.py imports it)."""
    return importlib.import_module(f"configs.{name}").get_config()


def env(devices: int = 1, cache_dir: Path | None = None) -> dict[str, str]:
    """Environment for a CPU subprocess with `devices` simulated devices."""
    out = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    out.update(CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    if cache_dir is not None:  # compile once for runs of the same program
        out.update(
            JAX_COMPILATION_CACHE_DIR=str(cache_dir),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
    return out


def train_cmd(workdir: Path, *overrides: str, config: str = "configs/quickstart.py") -> list[str]:
    return [sys.executable, "train.py", "--config", config, "--workdir", str(workdir), *overrides]


def run_train(workdir: Path, *overrides: str, devices: int = 1, cache_dir: Path | None = None):
    """train.py to completion; fails the test with its log tail otherwise."""
    proc = subprocess.run(
        train_cmd(workdir, *overrides),
        cwd=REPO,
        env=env(devices, cache_dir),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def checkpoint_steps(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def load_checkpoint(workdir: Path, step: int | None = None) -> dict[str, Any]:
    """The saved TrainState at `step` (default latest) as a tree of numpy arrays."""
    import jax
    import orbax.checkpoint as ocp

    step = checkpoint_steps(workdir)[-1] if step is None else step
    path = workdir / "checkpoints" / str(step) / "default"
    checkpointer = ocp.PyTreeCheckpointer()
    as_numpy = ocp.RestoreArgs(restore_type=np.ndarray)  # whatever devices wrote it
    args = jax.tree.map(lambda _: as_numpy, checkpointer.metadata(path).item_metadata.tree)
    return checkpointer.restore(path, restore_args=args)


def assert_trees_close(a: Any, b: Any, rtol: float = 0.0, atol: float = 0.0) -> None:
    """Leaf by leaf: max |a - b| <= rtol * max |b| + atol (rounding noise scales with the leaf)."""
    import jax

    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b, strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        err, scale = np.max(np.abs(x - y), initial=0.0), np.max(np.abs(y), initial=0.0)
        assert err <= rtol * scale + atol, f"{jax.tree_util.keystr(path)}: {err} vs {scale}"
