"""Model structure: parameter counts, the conv formulations, the public API, pure-JAX programs,
and checkpoints written before the redesign."""

from __future__ import annotations

from functools import partial

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ca_flax
from ca_flax.cpu.blocking import chunk_size
from ca_flax.models.layers import make_divisible
from ca_flax.ops import (
    active_formulation,
    conv_formulation,
    im2col_conv3x3,
    lax_conv,
    windows_depthwise3x3,
)
from ca_flax.summary import count_params
from tests.helpers import DATA
from tests.helpers.tiny_models import random_variables

LEGACY = DATA / "legacy"

# Exact counts of the released layouts; SE/CBAM/MobileNeXt+CA as derived in summary.py.
EXACT = {
    "mobilenetv2": 3_504_872,
    "mobilenetv2_ca": 3_950_648,
    "mobilenext": 3_535_416,
    "mobilenetv2_se": 3_888_208,
}
SEED_TABLE = {  # (params in the paper's table, allowed relative deviation)
    "mobilenetv2_se": (3.89e6, 0.02),
    "mobilenetv2_cbam": (3.89e6, 0.02),
    "mobilenext_se": (3.89e6, 0.02),
    "mobilenext_ca": (4.09e6, 0.04),
}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_parameter_counts(name):
    assert count_params(name) == EXACT[name]


@pytest.mark.parametrize("name", sorted(SEED_TABLE))
def test_parameter_counts_near_seed_table(name):
    target, tolerance = SEED_TABLE[name]
    assert abs(count_params(name) - target) <= tolerance * target


def test_make_divisible_rounding_rules():
    assert make_divisible(16 * 0.35) == 8
    assert make_divisible(32 * 0.75) == 24
    assert make_divisible(1280 * 1.4) == 1792
    assert make_divisible(214, 16) == 208
    assert make_divisible(36) == 40  # never below 90% of the value


@pytest.mark.parametrize("depthwise", [True, False], ids=["depthwise", "dense"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(8, 8), (7, 9), (6, 5)])
def test_shifted_window_convs_equal_lax_convolution(depthwise, stride, hw):
    """Nine shifted multiplies (depthwise) and nine windows as one matmul (dense stem) are the
    same convolutions as lax's, forward and backward (where grouped convs are slowest)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, *hw, 5)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 1 if depthwise else 5, 5 if depthwise else 7)))

    def ours(x, k):
        return windows_depthwise3x3(x, k, stride) if depthwise else im2col_conv3x3(x, k, stride)

    def reference(x, k):
        return lax_conv(x, k, stride, depthwise=depthwise)

    np.testing.assert_allclose(ours(x, k), reference(x, k), atol=1e-5)
    grad = jax.grad(lambda x, k: jnp.sum(ours(x, k) ** 2), (0, 1))(x, k)
    grad_ref = jax.grad(lambda x, k: jnp.sum(reference(x, k) ** 2), (0, 1))(x, k)
    for a, b in zip(grad, grad_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["mobilenetv2_ca", "mobilenext"])
def test_conv_formulations_are_the_same_model(name):
    """'shifted_windows' (CPU speed forms) and 'lax_conv' (lax convs, cuDNN on GPU) give the
    same logits from the same variables, and the switch really switches. Their gradients are
    compared layer by layer above: through a whole random network, ReLU6 kinks make per-element
    fp32 gradients a lottery (one seed put either formulation 6e-3 from float64, another both
    at 2e-5)."""
    model = ca_flax.create_model(name, num_classes=7, width_mult=0.35)
    x = jax.random.normal(jax.random.key(0), (2, 33, 40, 3))
    variables = random_variables(model)
    logits, convs = {}, {}
    for formulation in ("shifted_windows", "lax_conv"):
        with conv_formulation(formulation):
            assert active_formulation() == formulation
            apply = partial(model.apply, variables)
            convs[formulation] = str(jax.make_jaxpr(apply)(x)).count("conv_general_dilated")
            logits[formulation] = jax.jit(apply)(x)
    assert active_formulation() == "shifted_windows"  # the CPU default, restored after the block
    assert convs["shifted_windows"] == 0 and convs["lax_conv"] > 0
    np.testing.assert_allclose(logits["shifted_windows"], logits["lax_conv"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="shifted_windows"):
        with conv_formulation("cudnn"):
            pass


@pytest.mark.parametrize("name", ["mobilenetv2_ca", "mobilenetv2_cbam", "mobilenext_ca"])
def test_plain_apply_on_cpu_is_pure_jax(name):
    """A jitted `model.apply` on the CPU is plain JAX, in inference and in training: no call
    of ca_flax's CPU kernels and no `cond` (gates), even with the kernels built. Those belong
    to the CPU backend (`ca_flax.cpu.make_plan`), whose program shows them, as a control that
    the strings looked for are the ones a kernel call or a cond leaves."""
    from ca_flax import cpu

    assert jax.default_backend() == "cpu"
    model = ca_flax.create_model(name, num_classes=7, width_mult=0.35)
    variables = random_variables(model)
    x = jnp.ones((2, 32, 32, 3))
    kernel_call = 'custom_call_target="ca_flax_'

    def texts(fn, *args):
        """The jaxpr's text and the lowered program's HLO text of `jax.jit(fn)(*args)`."""
        jitted = jax.jit(fn)
        return str(jax.make_jaxpr(jitted)(*args)), jitted.lower(*args).as_text(dialect="hlo")

    built = cpu.kernels_available()
    rngs = {"dropout": jax.random.key(1)}
    for train in (False, True):
        apply = partial(model.apply, train=train, mutable=["batch_stats"], rngs=rngs)
        jaxpr, hlo = texts(apply, variables, x)
        assert "cond[" not in jaxpr, train
        assert "ca_flax_" not in jaxpr and kernel_call not in hlo, train
    if built:
        plan = cpu.make_plan(model, variables)
        assert kernel_call in texts(plan, plan.variables, x)[1]


@pytest.mark.parametrize("name", ca_flax.list_models())
def test_every_model_runs_train_and_eval_at_small_width(name):
    model = ca_flax.create_model(name, num_classes=7, width_mult=0.35)
    x = jnp.ones((2, 32, 48, 3))
    variables = ca_flax.init_variables(model, jax.random.key(0), x)
    logits = model.apply(variables, x)  # eagerly, as in a notebook
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    out, state = model.apply(
        variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}
    )
    assert out.shape == (2, 7)
    old = variables["batch_stats"]
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state["batch_stats"], old)
    assert any(jax.tree.leaves(changed))


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="mobilenetv2_ca"):
        ca_flax.create_model("resnet50")


@pytest.mark.parametrize(
    "block", [ca_flax.CoordAttention, lambda: ca_flax.SqueezeExcite(4), lambda: ca_flax.CBAM(4)]
)
def test_attention_blocks_drop_into_any_network(block):
    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Conv(16, (3, 3))(x)
            return block()(x, train)

    x = jnp.ones((2, 6, 10, 3))
    variables = Tiny().init(jax.random.key(0), x)
    assert Tiny().apply(variables, x).shape == (2, 6, 10, 16)


def test_coord_attention_gates_by_height_and_width():
    x = jax.random.normal(jax.random.key(0), (2, 6, 10, 16))
    block = ca_flax.CoordAttention()
    variables = block.init(jax.random.key(1), x)
    out, state = block.apply(variables, x, mutable=["intermediates"])
    a_h, a_w = state["intermediates"]["a_h"][0], state["intermediates"]["a_w"][0]
    assert a_h.shape == (2, 6, 1, 16) and a_w.shape == (2, 1, 10, 16)
    np.testing.assert_array_equal(out, x * a_h * a_w)  # bitwise: the gates, multiplied in
    assert variables["params"]["conv1"]["kernel"].shape == (1, 1, 16, 8)  # mip = max(8, C // 32)
    # `gates` is the attention alone, from the pooled strips.
    x_h, x_w = jnp.mean(x, axis=2, keepdims=True), jnp.mean(x, axis=1, keepdims=True)
    gates = block.apply(variables, x_h, x_w, method=ca_flax.CoordAttention.gates)
    np.testing.assert_array_equal(gates[0], a_h)
    np.testing.assert_array_equal(gates[1], a_w)


def test_empty_batch_gives_empty_logits():
    """An empty batch (a last partial batch of nothing) is no error, CA included."""
    model = ca_flax.create_model("mobilenetv2_ca", num_classes=7, width_mult=0.35)
    variables = ca_flax.init_variables(model, jax.random.key(0), jnp.ones((1, 32, 32, 3)))
    assert model.apply(variables, jnp.ones((0, 32, 32, 3))).shape == (0, 7)


def test_symbolic_batch_exports():
    """jax.export with a polymorphic batch: the exported model runs any batch size."""
    model = ca_flax.create_model("mobilenetv2_ca", num_classes=7, width_mult=0.35)
    variables = ca_flax.init_variables(model, jax.random.key(0), jnp.ones((1, 32, 32, 3)))
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 32, 32, 3"), jnp.float32)
    exported = jax.export.export(jax.jit(lambda x: model.apply(variables, x)))(spec)
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    np.testing.assert_allclose(exported.call(x), model.apply(variables, x), atol=1e-5)


@pytest.mark.parametrize("name", ["mobilenetv2_ca", "mobilenetv2_cbam", "mobilenext_ca"])
def test_checkpoints_written_before_the_redesign_load_exactly(name):
    """Converted-checkpoint directories written by the code before the redesign
    (tests/data/legacy/make_legacy.py) load into the new models and give the logits that code
    computed, and hold the tree `init_variables` makes: the redesign kept every parameter path."""
    expected = np.load(LEGACY / "expected.npz")
    images = jnp.asarray(expected["images"])
    model, variables = ca_flax.load_pretrained(LEGACY / name)
    logits = jax.jit(partial(model.apply, train=False))(variables, images)
    assert logits.shape == expected[name].shape
    assert np.max(np.abs(np.asarray(logits) - expected[name])) <= 1e-6
    fresh = ca_flax.init_variables(model, jax.random.key(0), images[:1], train=False)
    chex.assert_trees_all_equal_shapes_and_dtypes(variables, fresh)


# The CPU backend's cache blocking (`ca_flax.cpu.blocking`); a pure function of sizes.
def test_chunk_size_is_the_largest_divisor_within_budget():
    mb = 2**20
    assert chunk_size(16, 3 * mb, 3.0) == 1
    assert chunk_size(16, mb, 3.0) == 2
    assert chunk_size(12, mb, 3.0) == 3
    assert chunk_size(16, mb // 8, 3.0) == 16
    assert chunk_size(16, 10 * mb, 3.0) == 1  # never below one image
