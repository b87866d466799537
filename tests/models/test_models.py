"""Model structure: parameter counts, the depthwise formulation, the public API."""

from __future__ import annotations

from functools import partial

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ca_flax
from ca_flax import cpu_kernels
from ca_flax.blocking import chunk_size
from ca_flax.convolutions import conv3x3_im2col, depthwise_conv3x3, xla_conv
from ca_flax.layers import active_conv_formulation, conv_formulation, make_divisible
from ca_flax.summary import count_params
from tests.helpers.tiny_models import random_variables

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
def test_shifted_window_convs_equal_xla_convolution(depthwise, stride, hw):
    """Nine shifted multiplies (depthwise) and nine windows as one matmul (dense stem) are the
    same convolutions as XLA's, forward and backward (where grouped convs are slowest)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, *hw, 5)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 1 if depthwise else 5, 5 if depthwise else 7)))

    def ours(x, k):
        return depthwise_conv3x3(x, k, stride) if depthwise else conv3x3_im2col(x, k, stride)

    def lax_conv(x, k):
        return xla_conv(x, k, stride, depthwise=depthwise)

    np.testing.assert_allclose(ours(x, k), lax_conv(x, k), atol=1e-5)
    grad = jax.grad(lambda x, k: jnp.sum(ours(x, k) ** 2), (0, 1))(x, k)
    grad_ref = jax.grad(lambda x, k: jnp.sum(lax_conv(x, k) ** 2), (0, 1))(x, k)
    for a, b in zip(grad, grad_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["mobilenetv2_ca", "mobilenext"])
def test_conv_formulations_are_the_same_model(name):
    """'windows' (CPU speed forms) and 'xla' (lax convs, cuDNN on GPU) give the same logits from
    the same variables, and the switch really switches. Their gradients are compared layer by
    layer above: through a whole random network, ReLU6 kinks make per-element fp32 gradients
    a lottery (one seed put either formulation 6e-3 from float64, another both at 2e-5)."""
    model = ca_flax.create_model(name, num_classes=7, width_mult=0.35, inference_block_mb=0)
    x = jax.random.normal(jax.random.key(0), (2, 33, 40, 3))
    variables = random_variables(model)
    logits, convs = {}, {}
    for formulation in ("windows", "xla"):
        with conv_formulation(formulation):
            assert active_conv_formulation() == formulation
            apply = partial(model.apply, variables)
            convs[formulation] = str(jax.make_jaxpr(apply)(x)).count("conv_general_dilated")
            logits[formulation] = jax.jit(apply)(x)
    assert active_conv_formulation() == "windows"  # the CPU default, restored after the block
    assert convs["windows"] == 0 and convs["xla"] > 0
    np.testing.assert_allclose(logits["windows"], logits["xla"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="windows"):
        with conv_formulation("cudnn"):
            pass


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
    np.testing.assert_array_equal(out, x * a_h * a_w)  # bitwise, through the CPU gate kernel
    assert variables["params"]["conv1"]["kernel"].shape == (1, 1, 16, 8)  # mip = max(8, C // 32)


@pytest.mark.parametrize(
    ("block", "gates"),
    [
        (ca_flax.CoordAttention, 1),
        (lambda: ca_flax.SqueezeExcite(4), 1),
        (lambda: ca_flax.CBAM(4), 2),
    ],
    ids=["ca", "se", "cbam"],
)
def test_cpu_inference_gates_are_their_own_computation(block, gates):
    """Under 'windows' at inference each attention gate (CBAM has two) runs inside a `cond`, so
    XLA:CPU reads the gated activation as written instead of re-running its producer (see
    `apply_gates`), or, for CA where ca_flax's CPU kernels run, as the gate kernel (opaque to
    XLA as well); training and the 'xla' formulation keep the plain product."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 10, 16))
    variables = block().init(jax.random.key(1), x)

    def program(formulation: str, train: bool) -> str:
        with conv_formulation(formulation):
            apply = partial(block().apply, variables, train=train, mutable=["batch_stats"])
            return str(jax.make_jaxpr(apply)(x))

    kernel_gates = program("windows", train=False).count(cpu_kernels.GATE_TARGET)
    assert kernel_gates == (block is ca_flax.CoordAttention)
    assert program("windows", train=False).count("cond[") == gates - kernel_gates
    with cpu_kernels.use_kernels(False):
        assert program("windows", train=False).count("cond[") == gates
    for text in (program("windows", train=True), program("xla", train=False)):
        assert text.count("cond[") == text.count(cpu_kernels.GATE_TARGET) == 0


def scan_depth(jaxpr: jax.extend.core.Jaxpr) -> int:
    """How deeply `scan`s nest in `jaxpr` (0: no scan)."""
    depth = 0
    for eqn in jaxpr.eqns:
        inner = [scan_depth(p.jaxpr) for p in eqn.params.values() if hasattr(p, "jaxpr")]
        depth = max(depth, (eqn.primitive.name == "scan") + max(inner, default=0))
    return depth


@pytest.mark.parametrize("name", ["mobilenetv2_ca", "mobilenext"])
def test_cache_blocked_inference_is_the_same_computation(name):
    # float64, so that the comparison sees the computation, not float32 rounding (in float32
    # both paths are ~1e-4 from the float64 truth on this random 20-block network).
    with jax.enable_x64(True):
        model = ca_flax.create_model(
            name, width_mult=0.35, num_classes=10, inference_block_mb=0.0, dtype=jnp.float64
        )
        x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 24, 3)))
        variables = jax.tree_util.tree_map(jnp.float64, random_variables(model))
        want = jax.jit(model.apply)(variables, x)
        # A budget this small gives chunks from one image up to the whole batch.
        blocked = model.clone(inference_block_mb=0.015)
        assert scan_depth(jax.make_jaxpr(blocked.apply)(variables, x).jaxpr) == 2  # nested
        got = jax.jit(blocked.apply)(variables, x)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
        # Training never blocks (batch statistics span the batch): same outputs and updates.
        kwargs = {"train": True, "mutable": ["batch_stats"], "rngs": {"dropout": jax.random.key(1)}}
        out_a, upd_a = jax.jit(partial(model.apply, **kwargs))(variables, x)
        out_b, upd_b = jax.jit(partial(blocked.apply, **kwargs))(variables, x)
    np.testing.assert_array_equal(out_a, out_b)
    chex.assert_trees_all_equal(upd_a, upd_b)


@pytest.mark.parametrize("block_mb", [None, 0.0], ids=["blocked", "unblocked"])
def test_empty_batch_gives_empty_logits(block_mb):
    """An empty batch (a last partial batch of nothing) is no error, blocked or not, CA included."""
    model = ca_flax.create_model("mobilenetv2_ca", num_classes=7, width_mult=0.35,
                                 inference_block_mb=block_mb)  # fmt: skip
    variables = ca_flax.init_variables(model, jax.random.key(0), jnp.ones((1, 32, 32, 3)))
    assert model.apply(variables, jnp.ones((0, 32, 32, 3))).shape == (0, 7)


def test_symbolic_batch_exports_with_default_blocking():
    """jax.export with a polymorphic batch runs unblocked (no chunk size divides `b`)."""
    model = ca_flax.create_model("mobilenetv2_ca", num_classes=7, width_mult=0.35)
    variables = ca_flax.init_variables(model, jax.random.key(0), jnp.ones((1, 32, 32, 3)))
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 32, 32, 3"), jnp.float32)
    exported = jax.export.export(jax.jit(lambda x: model.apply(variables, x)))(spec)
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    np.testing.assert_allclose(exported.call(x), model.apply(variables, x), atol=1e-5)


def test_chunk_size_is_the_largest_divisor_within_budget():
    mb = 2**20
    assert chunk_size(16, 3 * mb, 3.0) == 1
    assert chunk_size(16, mb, 3.0) == 2
    assert chunk_size(12, mb, 3.0) == 3
    assert chunk_size(16, mb // 8, 3.0) == 16
    assert chunk_size(16, 10 * mb, 3.0) == 1  # never below one image
