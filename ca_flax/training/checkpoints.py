"""orbax checkpoints of the TrainState: periodic + epoch-end saves, last K plus the best eval.

Restores go onto the current mesh's shardings, so a checkpoint written on N devices loads on
any other device count. SIGTERM (preemption) only sets a flag; the trainer saves and exits 0.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ca_flax.pretrained import check_stored_shapes
from ca_flax.training.steps import TrainState

BEST_METRIC = "top1"


class Checkpointer:
    """`workdir/checkpoints/<step>`: keeps the latest `keep` steps and the best by eval top-1."""

    def __init__(self, workdir: str | Path, keep: int):
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [
                ocp.checkpoint_managers.LatestN(n=keep),
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=lambda m: m[BEST_METRIC],
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        # best_fn makes orbax write each step's metrics, so the best survives a restart.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            best_fn=lambda m: m[BEST_METRIC],
            best_mode="max",
            create=True,
        )
        directory = Path(workdir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def save(self, state: TrainState, metrics: dict[str, float] | None = None) -> bool:
        """Save at `state.step` unless that step is already saved (async; see `wait`)."""
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return False
        return self.manager.save(
            step, args=ocp.args.StandardSave(state), metrics=metrics, force=True
        )

    def restore(self, abstract_state: TrainState, step: int | None = None) -> TrainState:
        """The state at `step` (default latest), laid out like `abstract_state` (arrays or
        ShapeDtypeStructs with shardings): any device count, whatever wrote the checkpoint."""
        step = self.latest_step() if step is None else step
        directory = self.manager.directory / str(step)
        check_stored_shapes(
            str(directory),
            ocp.StandardCheckpointer().metadata(directory / "default").item_metadata,
            abstract_state.variables(),
            "the workdir holds a run with another model config; use a new --workdir",
        )
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state
        )
        return self.manager.restore(step, args=ocp.args.StandardRestore(target))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class PreemptionFlag:
    """Set by SIGTERM; `should_stop` agrees across processes so all of them stop together."""

    def __init__(self):
        self._event = threading.Event()
        self._previous: Any = None

    def install(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self._event.set()

    def should_stop(self) -> bool:
        """True on every process once any process got SIGTERM (a collective when multi-host)."""
        local = self._event.is_set()
        if jax.process_count() == 1:
            return local
        return bool(multihost_utils.process_allgather(local).any())

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
