"""Learning-rate schedule and optimizer of the paper's recipe, built from optax pieces.

Weight decay is PyTorch-SGD style (added to the gradient before momentum), optionally skipping
BatchNorm parameters, biases and depthwise kernels.
"""

from __future__ import annotations

from typing import Any

import jax
import optax


def peak_learning_rate(config: Any) -> float:
    """base_learning_rate per lr_batch_size images, scaled linearly to the global batch."""
    return config.base_learning_rate * config.batch_size / config.lr_batch_size


def learning_rate_schedule(config: Any, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to 0 at `total_steps`."""
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_learning_rate(config),
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=0.0,
    )


def is_decayed(path: tuple[Any, ...], leaf: Any) -> bool:
    """False for BatchNorm scale/bias, any bias and depthwise (3, 3, 1, C) kernels."""
    name = getattr(path[-1], "key", str(path[-1]))
    if leaf.ndim <= 1 or name != "kernel":
        return False
    return not (leaf.ndim == 4 and tuple(leaf.shape[:3]) == (3, 3, 1))


def weight_decay_mask(params: Any) -> Any:
    """Pytree of bools: which parameters get weight decay when exclusion is on."""
    return jax.tree_util.tree_map_with_path(is_decayed, params)


def create_optimizer(config: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD with momentum (nesterov optional) and L2 weight decay."""
    mask = weight_decay_mask if config.weight_decay_exclude else None
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=mask),
        optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
    )
