"""Train a model: `python train.py --config configs/quickstart.py --workdir /tmp/run`.

Any config field can be overridden: `--config.batch_size=1024 --config.width_mult=0.5`.
Multi-host: pass `--multihost` on TPU pods (or clusters JAX auto-detects), or give
`--coordinator_address/--num_processes/--process_id` on GPU hosts. See docs/training.md.
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ca_flax.cpu import hugepages

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events, summary.json.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "jax.distributed.initialize() (auto-detect).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_CPU_COLLECTIVES = flags.DEFINE_string(
    "cpu_collectives", None, "'gloo' for multi-process CPU runs (testing without accelerators)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Imported here, not at the top: the trainer pulls in TensorFlow (slow to import), which the
    # huge-pages re-execution in __main__ would otherwise pay for twice.
    from ca_flax.pretrained import CheckpointMismatchError
    from ca_flax.training import train_and_evaluate
    from ca_flax.training.config_check import ConfigError

    if _CPU_COLLECTIVES.value:
        jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
    if _COORDINATOR.value:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif _MULTIHOST.value:
        jax.distributed.initialize()
    logging.info(
        "process %d/%d, %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )  # fmt: skip
    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, CheckpointMismatchError) as e:  # the message names the field or key
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()  # faster CPU train step; see ca_flax/cpu/hugepages.py
    app.run(main)
