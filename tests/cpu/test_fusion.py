"""The CPU backend's inference plan (`ca_flax.cpu.make_plan`): each block's layer list read into
ca_flax's kernels (`fusion`), cache-blocked (`blocking`), with the plain model's logits and
gradients; and what it does for a model it cannot run (`why_not`, `make_inference_fn`)."""

from __future__ import annotations

import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ca_flax
from ca_flax import cpu, ops
from ca_flax.cpu import fusion, inference, kernels
from ca_flax.cpu.blocking import Blocked
from ca_flax.cpu.spread import CPU_COMPILER_OPTIONS
from tests.helpers.tiny_models import random_variables

# At 64x64 the stem's output is 32x32 (over FUSED_EXPAND_MIN_PIXELS: the one block expanding
# there takes its 1x1 conv into the depthwise kernel) and every later block is under it. With
# this budget the first stages run one image a chunk inside a loop over two, the rest whole.
IMAGES = (4, 64, 64, 3)
BLOCK_MB = 0.1

# The empty placeholders of the depthwise kernel's optional `expand` operand and sum results.
NO_EXPAND, NO_SUMS = "tensor<0x0xf32>", "tensor<0x0x0xf32>"

# The parameter children of each attention module, to count them in a parameter tree.
CA = {"conv1", "bn1", "conv2", "conv3"}
SE, CBAM = {"fc1", "fc2"}, {"fc1", "fc2", "spatial_conv", "spatial_bn"}


def count_modules(params: dict, names: set[str]) -> int:
    """Submodules in a parameter tree whose children are exactly `names`."""
    if not isinstance(params, dict):
        return 0
    return (set(params) == names) + sum(count_modules(v, names) for v in params.values())


def calls(text: str, target: str) -> list[str]:
    """The lines of a lowered program that call kernel `target`."""
    return [line for line in text.splitlines() if f"@{target}(" in line]


def scan_depth(jaxpr: jax.extend.core.Jaxpr) -> int:
    """How deeply `scan`s nest in `jaxpr` (0: no scan)."""
    depth = 0
    for eqn in jaxpr.eqns:
        inner = [scan_depth(p.jaxpr) for p in eqn.params.values() if hasattr(p, "jaxpr")]
        depth = max(depth, (eqn.primitive.name == "scan") + max(inner, default=0))
    return depth


def plain_logits(model, variables, x):  # noqa: ANN001, ANN201
    """The model's own inference, jitted afresh."""
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)


@pytest.mark.parametrize(
    "name", ["mobilenetv2_ca", "mobilenext_ca", "mobilenetv2_cbam"]
)  # SE: CBAM's path
def test_plan_runs_the_layers_through_the_kernels_with_the_models_logits(name):
    """Every depthwise + BatchNorm (+ ReLU6) of the plan is one kernel call, so is the stem; at
    32x32 the 1x1 conv before it runs inside (once here); each CA block's pooling comes from
    the depthwise kernel before it and its gate is the gate kernel, written over its input's
    buffer; SE and CBAM run as their own computation (a `cond`). Blocked in nested loops, the
    stem reads its chunk of the batch in place and each loop's output starts uninitialized.
    The logits are the model's. Planned under `use_kernels(False)`, no kernel is called, and
    it is still blocked and the model."""
    model = ca_flax.create_model(name, num_classes=7, width_mult=0.35)
    variables = random_variables(model)
    x = jax.random.normal(jax.random.key(0), IMAGES)
    want = plain_logits(model, variables, x)
    assert float(jnp.std(want)) > 0.1  # O(1) logits: a wrong layer would show

    plan = cpu.make_plan(model, variables, BLOCK_MB)
    traced = jax.jit(plan).trace(plan.variables, x)
    lowered = traced.lower()
    text = lowered.as_text()
    params = variables["params"]
    leaves = jax.tree_util.tree_leaves(params)
    depthwise = calls(text, kernels.DEPTHWISE_TARGET)
    assert len(depthwise) == sum(k.ndim == 4 and k.shape[:3] == (3, 3, 1) for k in leaves) > 0
    assert sum(NO_EXPAND not in line for line in depthwise) == 1
    (stem,) = calls(text, kernels.CONV_TARGET)
    assert "(tensor<4x64x64x3xf32>, tensor<i32>," in stem and "-> tensor<1x32x32x16xf32>" in stem
    assert scan_depth(traced.jaxpr.jaxpr) == 2
    assert len(calls(text, kernels.UNINITIALIZED_TARGET)) >= 2  # one per loop level
    gates = count_modules(params, CA)
    assert gates == {"mobilenetv2_ca": 16, "mobilenext_ca": 15}.get(name, 0)
    gate_calls = calls(text, kernels.GATE_TARGET)
    assert len(gate_calls) == gates and all("output_operand_alias" in c for c in gate_calls)
    assert sum(NO_SUMS not in line for line in depthwise) == gates
    isolated = count_modules(params, SE) + count_modules(params, CBAM)
    assert isolated == (16 if name in ("mobilenetv2_se", "mobilenetv2_cbam") else 0)
    assert text.count("stablehlo.case") == isolated
    for target in (kernels.KERNEL_GRAD_TARGET, kernels.INPUT_GRAD_TARGET):
        assert f"@{target}(" not in text
    np.testing.assert_allclose(lowered.compile()(plan.variables, x), want, rtol=1e-4, atol=1e-4)

    with cpu.use_kernels(False):  # what the plan is made of is fixed when it is made
        bare = cpu.make_plan(model, variables, BLOCK_MB)
    traced = jax.jit(bare).trace(bare.variables, x)
    lowered = traced.lower()
    text = lowered.as_text()
    assert "ca_flax_" not in text and "stablehlo.case" not in text
    assert scan_depth(traced.jaxpr.jaxpr) == 2
    np.testing.assert_allclose(lowered.compile()(bare.variables, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mobilenetv2_ca", "mobilenext_ca"])
def test_blocked_stages_are_the_same_computation(name):
    """The blocked loops over the model's own layers (nested, chunks from one image up to the
    whole batch), in float64 so that the comparison sees the computation rather than float32
    rounding: the model's logits to 1e-10."""
    with jax.enable_x64(True):
        model = ca_flax.create_model(name, width_mult=0.35, num_classes=10, dtype=jnp.float64)
        x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 24, 3)))
        variables = jax.tree_util.tree_map(jnp.float64, random_variables(model))
        layers = inference.body_layers(model.bind(variables))
        stages = [fusion.block_stage(layer, fused=False) for layer in layers]
        body = Blocked(stages, budget_mb=0.015, use_kernels=False)
        stage_variables = [fusion.sub(variables, stage.name) for stage in stages]
        head = variables["params"]["classifier_1"]

        def logits(v, x):  # noqa: ANN001, ANN202
            features = jnp.mean(body(v, x), axis=(1, 2))
            return features @ head["kernel"] + head["bias"]

        assert scan_depth(jax.make_jaxpr(logits)(stage_variables, x).jaxpr) == 2
        got = jax.jit(logits)(stage_variables, x)
        want = plain_logits(model, variables, x)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("name", "block_mb"), [("mobilenetv2_ca", 0.015)])  # nested loops
def test_gradients_through_the_plan_are_the_models(name, block_mb, monkeypatch):
    """The kernels take their derivatives from XLA's form of the same layers, so gradients of
    the plan (saliency maps, frozen BatchNorm), with respect to its variables and its input,
    equal those of the plain model: the 1x1 convs inside the kernel (all of them here,
    MobileNeXt's linear BatchNorm folded into them), CA's pooling from it, and
    (mobilenetv2_ca) the blocked loops (nested, outputs uninitialized, the stem reading in
    place) included."""
    monkeypatch.setattr(fusion, "FUSED_EXPAND_MIN_PIXELS", 0)
    model = ca_flax.create_model(name, num_classes=7, width_mult=0.35)
    x = jax.random.normal(jax.random.key(0), (2, 32, 40, 3))
    variables = random_variables(model)

    def loss(f):  # noqa: ANN001, ANN202
        return lambda v, x: jnp.sum(jnp.sin(f(v, x)))

    plan = cpu.make_plan(model, variables, block_mb)
    text = jax.jit(plan).lower(plan.variables, x).as_text()
    # A 1x1 conv goes in before a depthwise in every block but mobilenetv2's first (17 blocks)
    # and the two of mobilenext's 20 that widen at stride 1 (no 3x3 after their 1x1 convs).
    expanding = {"mobilenetv2_ca": 16, "mobilenext_ca": 18}[name]
    depthwise = calls(text, kernels.DEPTHWISE_TARGET)
    assert sum(NO_EXPAND not in line for line in depthwise) == expanding
    assert len(calls(text, kernels.UNINITIALIZED_TARGET)) == (2 if block_mb else 0)
    got = jax.jit(jax.grad(loss(plan), argnums=(0, 1)))(plan.variables, x)
    # The model in the form the kernels take their derivatives from (its gradient compiles in
    # half the time of the shifted windows'; the forms are the same model, tests/models).
    with ops.conv_formulation("lax_conv"):
        model_loss = loss(partial(model.apply, train=False))
        by_variable, by_input = jax.jit(jax.grad(model_loss, argnums=(0, 1)))(variables, x)
    # The model's variable gradients cut as the plan's variables are.
    stages = [fusion.sub(by_variable, stage.name) for stage in plan.body.stages]
    want = ({"stages": stages, "head": by_variable["params"]["classifier_1"]}, by_input)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(got), leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))
    assert float(jnp.abs(by_input).max()) > 0  # the input gradient is not trivially zero


def test_a_model_the_backend_cannot_run_runs_as_itself_with_one_warning(monkeypatch):
    """`why_not` names what the backend cannot run (a bf16 model, a model of no family it
    knows), `make_plan` refuses it with that reason, and `make_inference_fn` says it once and
    runs the plain model: its logits, no kernel in its program."""
    monkeypatch.setattr(inference, "_said", set())  # as in a fresh process
    assert cpu.why_not(ca_flax.create_model("mobilenext_ca", width_mult=0.35)) is None
    assert "no plan for CoordAttention" in cpu.why_not(ca_flax.CoordAttention())
    model = ca_flax.create_model(
        "mobilenetv2_ca", num_classes=7, width_mult=0.35, dtype=jnp.bfloat16
    )
    variables = random_variables(model)
    reason = "its plans are float32 and the model computes in bfloat16"
    assert cpu.why_not(model) == reason
    with pytest.raises(ValueError, match=reason):
        cpu.make_plan(model, variables)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        infer = cpu.make_inference_fn(model, variables)
        cpu.make_inference_fn(model, variables)
    said = [str(w.message) for w in caught if "ca_flax.cpu" in str(w.message)]
    assert said == [f"ca_flax.cpu: {reason}; running the plain model"]
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    assert "ca_flax_" not in infer.jitted.lower(infer.variables, x).as_text()
    want = jax.jit(
        lambda v, x: model.apply(v, x, train=False), compiler_options=CPU_COMPILER_OPTIONS
    )(variables, x)
    got = infer(x)
    assert got.shape == (2, 7) and got.dtype == want.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_an_empty_batch_gives_empty_logits():
    """An empty batch (a last partial batch of nothing) is no error for the backend."""
    model = ca_flax.create_model("mobilenetv2_ca", num_classes=7, width_mult=0.35)
    infer = cpu.make_inference_fn(model, random_variables(model))
    assert infer(jnp.ones((0, 32, 32, 3))).shape == (0, 7)
