"""Train state and the jitted train/eval steps, sharded over a 1-D 'data' mesh.

Parameters, optimizer state and BatchNorm statistics are replicated; batches are split over
the 'data' axis. The model sees the global batch, so BatchNorm statistics span all devices
and processes (XLA inserts the cross-device reductions).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from ca_flax.models.initializers import init_variables
from ca_flax.sharding import batch_split, data_mesh, replicated

Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds; the data position is `step` itself."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema: Any  # {'params', 'batch_stats'} when EMA is on, else {}
    bad_step: jax.Array  # first step whose loss was NaN/inf, or -1; state stops updating there

    def variables(self, ema: bool = False) -> dict[str, Any]:
        """{'params', 'batch_stats'} of the raw weights (or the EMA weights)."""
        if ema:
            return dict(self.ema)
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_mesh(devices: list | None = None) -> Mesh:
    """`devices` (default: all devices of all processes) on one 'data' axis."""
    return data_mesh(devices or jax.devices())


def fresh_variables(model: nn.Module, image_size: int, seed: int) -> dict[str, Any]:
    """The model's random initial variables for `seed` (what `init_from` starts from, too)."""
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return init_variables(model, jax.random.key(seed), dummy, train=False)


def init_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    image_size: int,
    seed: int,
    use_ema: bool,
    mesh: Mesh,
    variables: dict[str, Any] | None = None,
) -> TrainState:
    """A fresh, replicated state; `variables` (e.g. pretrained) replace the random init."""

    def make(variables: dict[str, Any] | None) -> TrainState:
        if variables is None:
            variables = fresh_variables(model, image_size, seed)
        params, batch_stats = variables["params"], variables["batch_stats"]
        ema = {"params": params, "batch_stats": batch_stats} if use_ema else {}
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=tx.init(params),
            ema=ema,
            bad_step=jnp.full((), -1, jnp.int32),
        )

    return jax.jit(make, out_shardings=replicated(mesh))(variables)


def abstract_state(
    model: nn.Module, tx: optax.GradientTransformation, image_size: int, use_ema: bool, mesh: Mesh
) -> TrainState:
    """`init_state`'s shapes, dtypes and (replicated) shardings, computing nothing: what a
    checkpoint restore fills in."""
    shapes = jax.eval_shape(lambda: init_state(model, tx, image_size, 0, use_ema, mesh))
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)), shapes
    )


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy(logits, targets)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    config: Any,
    schedule: optax.Schedule,
    backend_ops: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, Metrics]]:
    """One SGD step on a global batch; a non-finite loss freezes the state at the last good one.

    The model's forward and backward are traced inside `backend_ops()`: the backend's own
    training ops, if it has any (`ca_flax.cpu.training_ops`; the trainer picks them).
    """
    num_classes, smoothing = config.num_classes, config.label_smoothing
    mixup_alpha, ema_decay = config.mixup_alpha, config.ema_decay
    base_key = jax.random.key(config.seed)

    def step_fn(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, Metrics]:
        key = jax.random.fold_in(base_key, state.step)
        dropout_key, mixup_key = jax.random.split(key)
        images, labels = batch["image"], batch["label"]
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
        if mixup_alpha > 0:
            lam = jax.random.beta(mixup_key, mixup_alpha, mixup_alpha)
            images = lam * images + (1 - lam) * images[::-1]
            targets = lam * targets + (1 - lam) * targets[::-1]

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
            variables = {"params": params, "batch_stats": state.batch_stats}
            with backend_ops():
                logits, updated = model.apply(
                    variables,
                    images,
                    train=True,
                    mutable=["batch_stats"],
                    rngs={"dropout": dropout_key},
                )
            return cross_entropy(logits, targets).mean(), (logits, updated["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema_decay > 0:
            ema = optax.incremental_update(
                {"params": params, "batch_stats": batch_stats}, state.ema, 1.0 - ema_decay
            )
        ok = jnp.isfinite(loss) & (state.bad_step < 0)
        new = state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state, ema=ema)
        kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
        bad_step = jnp.where(ok | (state.bad_step >= 0), state.bad_step, state.step)
        kept = kept.replace(step=state.step + 1, bad_step=bad_step)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return kept, {"loss": loss, "accuracy": accuracy, "lr": schedule(state.step)}

    return step_fn


def make_eval_step(model: nn.Module) -> Callable[[dict[str, Any], dict[str, jax.Array]], Metrics]:
    """Sums of loss, top-1 and top-5 hits and example count over the unmasked rows."""

    def eval_fn(variables: dict[str, Any], batch: dict[str, jax.Array]) -> Metrics:
        logits = model.apply(variables, batch["image"], train=False)
        labels, mask = batch["label"], batch["mask"]
        onehot = jax.nn.one_hot(labels, logits.shape[-1])
        top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        return {
            "loss": jnp.sum(cross_entropy(logits, onehot) * mask),
            "top1": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
            "top5": jnp.sum(jnp.any(top5 == labels[:, None], -1) * mask),
            "count": jnp.sum(mask),
        }

    return eval_fn


def jit_steps(train_fn: Callable, eval_fn: Callable, mesh: Mesh) -> tuple[Callable, Callable]:
    """jit with explicit shardings: state replicated and donated, batches split over 'data'."""
    rep, dat = replicated(mesh), batch_split(mesh)
    train = jax.jit(train_fn, in_shardings=(rep, dat), out_shardings=(rep, rep), donate_argnums=0)
    evaluate = jax.jit(eval_fn, in_shardings=(rep, dat), out_shardings=rep)
    return train, evaluate


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble the global batch from each process's local rows."""
    sharding = batch_split(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }
