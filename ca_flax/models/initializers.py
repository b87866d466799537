"""Parameter initialisers, and `init_variables`: `model.init` with every draw made at once.

Flax hands each parameter its own key, and XLA compiles each parameter's random draw as its
own code: `jax.jit(model.init)` of these ~100-tensor networks compiles a random draw per tensor
(compile times: docs/performance.md). `init_variables` records the draws, makes them as one
standard-normal vector and gives each initialiser its slice: the same distributions, one draw.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Shape = Sequence[int]


class _Draws:
    """Standard-normal values for one `init`: shapes recorded first, then handed out in order."""

    def __init__(self, values: jax.Array | None = None) -> None:
        self.values, self.offset, self.shapes = values, 0, []

    def take(self, shape: Shape, dtype: Any) -> jax.Array:
        if self.values is None:  # recording
            self.shapes.append(tuple(shape))
            return jnp.zeros(shape, dtype)
        size = math.prod(shape)
        if self.offset + size > self.values.size:
            raise _traces_differ(self.values.size, f"a {tuple(shape)} parameter beyond them")
        out = self.values[self.offset : self.offset + size]
        self.offset += size
        return out.reshape(shape).astype(dtype)


def _traces_differ(recorded: int, asked: str) -> RuntimeError:
    return RuntimeError(
        f"init_variables: the model's first trace drew {recorded} values and its second asked "
        f"for {asked}; its parameters must depend on nothing but the init arguments"
    )


_DRAWS: contextvars.ContextVar[_Draws | None] = contextvars.ContextVar(
    "ca_flax_draws", default=None
)


@contextlib.contextmanager
def _drawing_from(draws: _Draws) -> Iterator[_Draws]:
    token = _DRAWS.set(draws)
    try:
        yield draws
    finally:
        _DRAWS.reset(token)


def scaled_normal(std: Callable[[Shape], float]) -> nn.initializers.Initializer:
    """N(0, std(shape)^2): drawn with the parameter's own key, or from `init_variables`' draw."""

    def init(key: jax.Array, shape: Shape, dtype: Any = jnp.float32) -> jax.Array:
        draws = _DRAWS.get()
        unit = jax.random.normal(key, shape, dtype) if draws is None else draws.take(shape, dtype)
        return unit * jnp.asarray(std(shape), dtype)

    return init


def _he_fan_out_std(shape: Shape) -> float:
    """PyTorch's kaiming_normal_(mode='fan_out', relu): fan_out = window * output channels."""
    return math.sqrt(2.0 / (math.prod(shape[:-2]) * shape[-1]))


# How the released PyTorch models initialise: He-normal (fan_out) convolutions, N(0, 0.01) Linear.
conv_init = scaled_normal(_he_fan_out_std)
dense_init = scaled_normal(lambda shape: 0.01)


def abstract_variables(
    model: nn.Module, image_size: int = 64, dtype: Any = jnp.float32
) -> dict[str, Any]:
    """The shapes and dtypes of `model.init`'s variables (`jax.ShapeDtypeStruct`s), computing
    nothing: what a checkpoint restore or a layout check needs."""
    image = jnp.zeros((1, image_size, image_size, 3), dtype)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), image, train=False))


def init_variables(model: nn.Module, key: jax.Array, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """`model.init(key, *args, **kwargs)`, jitted, with every `scaled_normal` parameter cut from
    one standard-normal draw: one draw to compile where `jax.jit(model.init)` has one per tensor.

    Works eagerly or inside a jitted function (e.g. one that places the state on a mesh).
    """
    return jax.jit(functools.partial(_init, model, **kwargs))(key, *args)


def _init(model: nn.Module, key: jax.Array, *args: Any, **kwargs: Any) -> dict[str, Any]:
    draw_key, init_key = jax.random.split(key)
    with _drawing_from(_Draws()) as recorded:
        jax.eval_shape(functools.partial(model.init, **kwargs), init_key, *args)
    total = sum(math.prod(shape) for shape in recorded.shapes)
    with _drawing_from(_Draws(jax.random.normal(draw_key, (total,)))) as draws:
        variables = model.init(init_key, *args, **kwargs)
    if draws.offset != total:
        raise _traces_differ(total, f"only {draws.offset}")
    return variables
