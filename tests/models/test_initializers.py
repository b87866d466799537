"""`init_variables` is `model.init` with one random draw: same tree, same distributions."""

from __future__ import annotations

import itertools
import math
from dataclasses import field

import chex
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import ca_flax
from ca_flax.models.initializers import conv_init, dense_init

X = jnp.zeros((1, 32, 32, 3))


def random_bits_calls(fn, *args) -> int:  # noqa: ANN001
    """How many random draws the traced program makes, counted through nested jits."""

    def count(jaxpr: jax.extend.core.Jaxpr) -> int:
        calls = 0
        for eqn in jaxpr.eqns:
            calls += eqn.primitive.name == "random_bits"
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", param)  # ClosedJaxpr or Jaxpr
                calls += count(inner) if isinstance(inner, jax.extend.core.Jaxpr) else 0
        return calls

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def test_init_variables_is_model_init_drawn_at_once():
    """Same tree, shapes and dtypes as Flax's init (CBAM: nn.Conv, nn.Dense, our layers), from
    one random draw where Flax's init makes one per random parameter."""
    model = ca_flax.create_model("mobilenetv2_cbam", num_classes=7, width_mult=0.35)
    key = jax.random.key(0)
    variables = ca_flax.init_variables(model, key, X, train=False)
    expected = jax.eval_shape(lambda: model.init(key, X, train=False))
    chex.assert_trees_all_equal_shapes_and_dtypes(variables, expected)

    kernels = [a for p, a in jax.tree_util.tree_leaves_with_path(variables["params"])
               if p[-1].key == "kernel"]  # fmt: skip
    plain = random_bits_calls(lambda k: model.init(k, X, train=False), key)
    assert plain >= len(kernels) > 50
    assert random_bits_calls(lambda k: ca_flax.init_variables(model, k, X, train=False), key) == 1

    # Each kernel its own slice: no two same-shaped kernels share values.
    seen = {}
    for kernel in kernels:
        assert not any(np.array_equal(kernel, other) for other in seen.get(kernel.shape, []))
        seen.setdefault(kernel.shape, []).append(kernel)
    # Deterministic in the key, and the key matters.
    again = ca_flax.init_variables(model, key, X, train=False)
    other = ca_flax.init_variables(model, jax.random.key(1), X, train=False)
    leaf = lambda v: v["params"]["features_1"]["conv_0"]["kernel"]  # noqa: E731
    np.testing.assert_array_equal(leaf(again), leaf(variables))
    assert not np.array_equal(leaf(other), leaf(variables))


def test_drawn_parameters_follow_the_released_models_init():
    """He-normal (fan_out) convolutions including depthwise and CBAM's spatial conv, N(0, 0.01)
    classifier, BatchNorm at identity, zero biases: as the PyTorch models initialise."""
    model = ca_flax.create_model("mobilenetv2_cbam", num_classes=1000, width_mult=1.0)
    variables = ca_flax.init_variables(model, jax.random.key(3), X, train=False)
    checked = 0
    for path, value in jax.tree_util.tree_leaves_with_path(variables["params"]):
        name, value = jax.tree_util.keystr(path), np.asarray(value, np.float64)
        if path[-1].key == "kernel" and "classifier" in name:
            want = 0.01
        elif path[-1].key == "kernel":
            want = math.sqrt(2.0 / (math.prod(value.shape[:-2]) * value.shape[-1]))
        else:
            want = 1.0 if path[-1].key == "scale" else 0.0
            np.testing.assert_array_equal(value, want, err_msg=name)
            continue
        if value.size >= 20_000:  # sample std within ~5 standard errors
            assert abs(value.std() / want - 1) < 0.05, name
            assert abs(value.mean()) < 0.05 * want, name
            checked += 1
    assert checked > 25
    for path, value in jax.tree_util.tree_leaves_with_path(variables["batch_stats"]):
        np.testing.assert_array_equal(value, 1.0 if path[-1].key == "var" else 0.0)


def test_initializers_draw_with_their_own_key_outside_init_variables():
    """Plain `model.init` (and any Flax use) draws each parameter from its key, same law."""
    key = jax.random.key(5)
    kernel = conv_init(key, (3, 3, 64, 256))
    np.testing.assert_array_equal(kernel, conv_init(key, (3, 3, 64, 256)))
    assert abs(float(jnp.std(kernel)) / math.sqrt(2.0 / (9 * 256)) - 1) < 0.02
    assert abs(float(jnp.std(dense_init(key, (512, 1000)))) / 0.01 - 1) < 0.02


class GrowsEachTrace(nn.Module):
    """A module whose parameter count depends on state outside its arguments: one more He
    kernel each time it is traced (`step` > 0) or one fewer (`step` < 0)."""

    step: int
    traces: itertools.count = field(default_factory=itertools.count)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(3 + self.step * next(self.traces)):
            x = x + self.param(f"w{i}", conv_init, (1, 1, 3, 3)).sum()
        return x


@pytest.mark.parametrize("step", [1, -1], ids=["more", "fewer"])
def test_init_that_changes_between_traces_is_refused(step):
    """The draws are laid out by a first, abstract trace; a second trace asking for more or
    fewer values is named as the cause rather than handing out wrong slices."""
    with pytest.raises(RuntimeError, match="first trace drew 27 values .* depend on nothing"):
        ca_flax.init_variables(GrowsEachTrace(step), jax.random.key(0), X)
