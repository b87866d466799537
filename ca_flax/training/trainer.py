"""The training loop: data -> jitted steps on the mesh -> logs, evals, checkpoints, summary."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from ca_flax import cpu
from ca_flax.models.registry import create_model
from ca_flax.training import config_check, optim, steps
from ca_flax.training.checkpoints import Checkpointer, PreemptionFlag
from ca_flax.training.data import Dataset, Layout
from ca_flax.training.progress import Progress, create_writer, quiet_library_logs

SUMMARY_FILE = "summary.json"
EVAL_HISTORY_FILE = "eval_history.jsonl"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; the run stopped without saving that state."""


def create_dataset(config: Any, layout: Layout) -> Dataset:
    """The config's dataset, this process's view of it."""
    if config.dataset == "digits":
        from ca_flax.training.digits import DigitsDataset

        return DigitsDataset(config.image_size, layout, config.seed, config.max_train_examples)
    from ca_flax.training.imagenet import ImageNetDataset

    return ImageNetDataset(config, layout)


def build_model(config: Any) -> Any:
    """`create_model` with the config's name, width, classes, dtype and dropout."""
    kwargs = {}
    if config.dropout_rate >= 0:
        kwargs["dropout_rate"] = config.dropout_rate
    return create_model(
        config.model,
        num_classes=config.num_classes,
        width_mult=config.width_mult,
        dtype=jnp.dtype(config.dtype),
        **kwargs,
    )


def total_train_steps(config: Any, steps_per_epoch: int) -> int:
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return max(1, math.ceil(config.num_epochs * steps_per_epoch))


def evaluate(eval_step: Any, variables: Any, dataset: Dataset, mesh: Any) -> dict[str, float]:
    """Top-1/top-5/loss over every eval example exactly once (padding rows masked)."""
    totals = None
    for batch in dataset.eval_batches():
        batch = {k: batch[k] for k in ("image", "label", "mask")}
        batch["label"] = batch["label"].astype("int32")
        out = eval_step(variables, steps.global_batch(batch, mesh))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {
        "top1": float(totals["top1"]) / count,
        "top5": float(totals["top5"]) / count,
        "loss": float(totals["loss"]) / count,
        "count": count,
    }


class Trainer:
    """One run in `workdir`: resumes from its latest checkpoint when there is one."""

    def __init__(self, config: Any, workdir: str | Path):
        quiet_library_logs()
        config_check.check_config(config)
        config_check.check_dataset(config)
        self.config, self.workdir = config, Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.layout = Layout.current(config.batch_size, config.eval_batch_size)
        self.dataset = create_dataset(config, self.layout)
        if self.dataset.num_classes != config.num_classes:
            raise config_check.ConfigError(
                f"config.num_classes: {config.num_classes}, but {config.dataset} has "
                f"{self.dataset.num_classes} classes"
            )
        self.steps_per_epoch = self.dataset.steps_per_epoch
        self.total_steps = total_train_steps(config, self.steps_per_epoch)
        self.schedule = optim.learning_rate_schedule(config, self.steps_per_epoch, self.total_steps)
        self.tx = optim.create_optimizer(config, self.schedule)
        self.mesh = steps.create_mesh()
        self.model = build_model(config)
        self.checkpointer = Checkpointer(self.workdir, config.keep_checkpoints)
        self.state = self._initial_state()
        train_fn = steps.make_train_step(
            self.model,
            self.tx,
            config,
            self.schedule,
            backend_ops=functools.partial(cpu.training_ops, self.mesh.size),
        )
        eval_fn = steps.make_eval_step(self.model)
        self.train_step, self.eval_step = steps.jit_steps(train_fn, eval_fn, self.mesh)
        self.writer = create_writer(self.workdir)

    def _initial_state(self) -> steps.TrainState:
        """The latest checkpoint's state (no init computed), else a fresh or `init_from` one."""
        cfg = self.config
        setup = (self.model, self.tx, cfg.image_size)
        if self.checkpointer.latest_step() is not None:
            logging.info("resuming from checkpoint step %d", self.checkpointer.latest_step())
            abstract = steps.abstract_state(*setup, cfg.ema_decay > 0, self.mesh)
            return self.checkpointer.restore(abstract)
        variables = None
        if cfg.init_from:
            from ca_flax.training.finetune import load_init_variables

            fresh = steps.fresh_variables(self.model, cfg.image_size, cfg.seed)
            variables = load_init_variables(cfg.init_from, fresh, cfg.model, cfg.width_mult)
        return steps.init_state(*setup, cfg.seed, cfg.ema_decay > 0, self.mesh, variables)

    def _check_finite(self) -> None:
        bad = int(jax.device_get(self.state.bad_step))
        if bad >= 0:
            raise NonFiniteLossError(
                f"training loss became NaN/inf at step {bad + 1} (state.step {bad}); stopping. "
                f"Nothing from that step on was saved; the latest checkpoint is step "
                f"{self.checkpointer.latest_step()}."
            )

    def _save(self, metrics: dict[str, float] | None = None) -> None:
        self._check_finite()
        self.checkpointer.save(self.state, metrics)

    def _evaluate(self, step: int) -> dict[str, float]:
        results = {"step": step, "epoch": step / self.steps_per_epoch}
        names = [("eval", False)] + ([("eval_ema", True)] if self.config.ema_decay > 0 else [])
        for prefix, ema in names:
            metrics = evaluate(self.eval_step, self.state.variables(ema), self.dataset, self.mesh)
            self.writer.write_scalars(step, {f"{prefix}/{k}": v for k, v in metrics.items()})
            results.update({f"{prefix}/{k}": v for k, v in metrics.items()})
            logging.log_if(
                logging.INFO,
                "%s step %d: top1 %.4f top5 %.4f loss %.4f (%d images)",
                jax.process_index() == 0, prefix, step, metrics["top1"], metrics["top5"],
                metrics["loss"], metrics["count"],
            )  # fmt: skip
        if jax.process_index() == 0:
            with open(self.workdir / EVAL_HISTORY_FILE, "a") as f:
                f.write(json.dumps(results) + "\n")
        return results

    def run(self) -> dict[str, Any]:
        """Train to `total_steps` (or until SIGTERM); returns the summary."""
        cfg = self.config
        start = int(jax.device_get(self.state.step))
        flag = PreemptionFlag().install()
        progress = Progress(self.total_steps, self.steps_per_epoch, cfg.batch_size, start)
        check_every = 1 if jax.process_count() == 1 else cfg.log_every_steps
        batches = self.dataset.train_batches(start)
        logging.info(
            "training %s: steps %d..%d, %d steps/epoch, global batch %d on %d devices",
            cfg.model, start, self.total_steps, self.steps_per_epoch, cfg.batch_size,
            jax.device_count(),
        )  # fmt: skip
        try:
            for step in range(start + 1, self.total_steps + 1):
                self._train_step(next(batches), progress)
                if step % cfg.log_every_steps == 0 or step == self.total_steps:
                    progress.report(step, self.writer)
                    self._check_finite()
                self._end_of_step(step)
                if step % check_every == 0 and flag.should_stop():
                    logging.info("SIGTERM: saving step %d and exiting", step)
                    self._save()
                    return {"preempted": True, "step": step}
            self._check_finite()
            return self._write_summary(progress)
        finally:
            flag.uninstall()
            self.checkpointer.close()
            self.writer.flush()

    def _train_step(self, local: dict[str, Any], progress: Progress) -> None:
        """Dispatch one step on this process's rows of the global batch (no host sync)."""
        batch = {"image": local["image"], "label": local["label"].astype("int32")}
        self.state, metrics = self.train_step(self.state, steps.global_batch(batch, self.mesh))
        progress.add(metrics)

    def _end_of_step(self, step: int) -> None:
        """Evaluate at epoch ends; checkpoint every N steps and at epoch ends."""
        cfg, last = self.config, step == self.total_steps
        epoch_end = step % self.steps_per_epoch == 0 or last
        eval_metrics = None
        if epoch_end and (
            math.ceil(step / self.steps_per_epoch) % cfg.eval_every_epochs == 0 or last
        ):
            self._check_finite()
            eval_metrics = self._evaluate(step)
        if epoch_end or step % cfg.checkpoint_every_steps == 0:
            self._save({"top1": eval_metrics["eval/top1"]} if eval_metrics else None)

    def _images_per_second(self, progress: Progress) -> float:
        """This process's training rate; a re-run of a finished run trains nothing, so it
        keeps the rate its summary already holds."""
        previous = self.workdir / SUMMARY_FILE
        if progress.last_step == progress.start_step and previous.exists():
            return json.loads(previous.read_text()).get("images_per_second", 0.0)
        return progress.images_per_second()

    def _write_summary(self, progress: Progress) -> dict[str, Any]:
        history = []
        path = self.workdir / EVAL_HISTORY_FILE
        if path.exists():
            history = [json.loads(line) for line in path.read_text().splitlines() if line]
        final = history[-1] if history else {}
        best = max(history, key=lambda h: h["eval/top1"]) if history else {}
        summary = {
            "final": final,
            "best": best,
            "steps": self.total_steps,
            "images_per_second": self._images_per_second(progress),
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            "best_checkpoint_step": self.checkpointer.best_step(),
            "config": self.config.to_dict(),
        }
        if jax.process_index() == 0:
            (self.workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        logging.info("done: %s", json.dumps({k: summary[k] for k in ("final", "best", "steps")}))
        return summary


def train_and_evaluate(config: Any, workdir: str | Path) -> dict[str, Any]:
    """Run (or resume) training in `workdir`; returns the summary written to summary.json."""
    return Trainer(config, workdir).run()
