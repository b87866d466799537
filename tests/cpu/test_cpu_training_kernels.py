"""CPU training with ca_flax's kernels: the depthwise kernel gradient in one pass
(`kernels.depthwise3x3_kernel_grad`) and the stride-2 input gradient
(`kernels.depthwise3x3_input_grad_stride2`) give autodiff's numbers, alone and in whole train
steps traced inside `ca_flax.cpu.training_ops()`, and only training there uses them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ca_flax
from ca_flax import cpu, ops
from ca_flax.cpu import kernels
from ca_flax.cpu.training import depthwise_conv3x3_train, kernels_apply_to_training
from ca_flax.ops import strided, windows_depthwise3x3
from tests.helpers.tiny_models import random_variables

TARGET, INPUT_TARGET = kernels.KERNEL_GRAD_TARGET, kernels.INPUT_GRAD_TARGET


def calls(text: str, target: str) -> int:
    """Calls of kernel `target` in a lowered program."""
    return text.count(f"@{target}(")


def kernel_grad_float64(x: np.ndarray, g: np.ndarray, stride: int) -> np.ndarray:
    """The (3, 3, 1, C) kernel gradient summed in float64 with numpy, window by window."""
    x, g = x.astype(np.float64), g.astype(np.float64)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = g.shape[1:3]
    taps = [
        np.einsum(
            "nhwc,nhwc->c", padded[:, i : i + stride * h : stride, j : j + stride * w : stride], g
        )
        for i in range(3)
        for j in range(3)
    ]
    return np.stack(taps).reshape(3, 3, 1, -1)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(
    "shape",
    [(2, 9, 13, 37), (1, 8, 8, 29), (3, 1, 5, 8), (1, 2, 1, 3), (0, 4, 4, 5)],
    ids=["16+16+5lanes", "16+8+5lanes", "one_row", "tiny", "no_images"],
)
def test_kernel_gradient_matches_float64(shape, stride):
    """Every lane width (16, 8, single), the image borders, odd sizes and an empty batch: the
    kernel's sums are autodiff's to float32 rounding (its row totals add up in float64)."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out_shape = (shape[0], strided(shape[1], stride), strided(shape[2], stride), shape[3])
    g = np.random.default_rng(1).standard_normal(out_shape).astype(np.float32)
    got = jax.jit(kernels.depthwise3x3_kernel_grad, static_argnums=2)(x, g, stride)
    want = kernel_grad_float64(x, g, stride)
    assert got.shape == (3, 3, 1, shape[3]) and got.dtype == jnp.float32
    np.testing.assert_allclose(
        got, want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max(initial=0))
    )


@pytest.mark.parametrize(
    "shape",
    [(2, 9, 13, 37), (1, 8, 8, 29), (3, 1, 5, 8), (1, 2, 1, 3), (0, 4, 4, 5)],
    ids=["16+16+5lanes", "16+8+5lanes", "one_row", "tiny", "no_images"],
)
def test_stride2_input_gradient_matches_float64(shape):
    """Odd and even sizes (the last input column reached by one output column or two), every
    lane width and an empty batch: the input gradient is autodiff's, taken in float64."""
    rng = np.random.default_rng(0)
    out_shape = (shape[0], strided(shape[1], 2), strided(shape[2], 2), shape[3])
    g = rng.standard_normal(out_shape).astype(np.float32)
    k = rng.standard_normal((3, 3, 1, shape[3])).astype(np.float32)
    got = jax.jit(kernels.depthwise3x3_input_grad_stride2, static_argnums=2)(g, k, shape)
    with jax.enable_x64():
        x = jnp.zeros(shape, jnp.float64)
        _, vjp = jax.vjp(lambda x: windows_depthwise3x3(x, jnp.asarray(k, jnp.float64), 2), x)
        want = np.asarray(vjp(jnp.asarray(g, jnp.float64))[0])
    assert got.shape == shape and got.dtype == jnp.float32
    np.testing.assert_allclose(
        got, want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max(initial=0))
    )


def test_kernel_gradient_refuses_a_gradient_of_another_shape():
    x, g = jnp.ones((1, 8, 8, 4)), jnp.ones((1, 8, 8, 4))
    with pytest.raises(ValueError, match=r"g \(1, 8, 8, 4\) is not the output shape"):
        kernels.depthwise3x3_kernel_grad(x, g, 2)
    with pytest.raises(ValueError, match=r"g \(1, 8, 8, 4\) is not the stride-2 output shape"):
        kernels.depthwise3x3_input_grad_stride2(g, jnp.ones((3, 3, 1, 4)), (1, 8, 8, 4))


@pytest.mark.parametrize("stride", [1, 2])
def test_train_depthwise_has_autodiffs_gradients_and_batches(stride):
    """`depthwise_conv3x3_train`: the same forward, input and kernel gradients as autodiff of
    the windows, one kernel-gradient call in its gradient's program (and at stride 2 one
    input-gradient call), and per-example gradients (vmap)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 10, 7, 21)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 1, 21)), jnp.float32)

    def loss(conv):  # noqa: ANN001, ANN202
        return lambda x, k: jnp.sum(jnp.sin(conv(x, k, stride)))

    grad_fn = jax.grad(loss(depthwise_conv3x3_train), (0, 1))
    got, want = jax.jit(grad_fn)(x, k), jax.grad(loss(windows_depthwise3x3), (0, 1))(x, k)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
    program = jax.jit(grad_fn).lower(x, k).as_text()
    assert program.count(TARGET) == 1 and program.count(INPUT_TARGET) == (stride == 2)
    np.testing.assert_allclose(
        depthwise_conv3x3_train(x, k, stride), windows_depthwise3x3(x, k, stride), rtol=1e-6
    )
    per_example = jax.vmap(lambda x: grad_fn(x[None], k)[1])(x)
    np.testing.assert_allclose(per_example.sum(0), want[1], rtol=1e-4, atol=1e-4)


def test_training_ops_take_train_mode_shifted_windows_only():
    """Inside `training_ops()` a train-mode depthwise layer of the 'shifted_windows' form takes
    its gradients from the kernels; inference and the 'lax_conv' form are left as they are."""
    x, k = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 1, 16))

    def program(train: bool, formulation: str) -> str:
        with cpu.training_ops(), ops.conv_formulation(formulation):
            loss = lambda x, k: jnp.sum(ops.depthwise_conv3x3(x, k, 2, train))  # noqa: E731
            return jax.jit(jax.grad(loss, (0, 1))).lower(x, k).as_text()

    text = program(True, "shifted_windows")
    assert calls(text, TARGET) == calls(text, INPUT_TARGET) == 1
    for text in (program(False, "shifted_windows"), program(True, "lax_conv")):
        assert "ca_flax_" not in text


def train_gradients(model, variables, x, labels):  # noqa: ANN001, ANN201
    """Parameter gradients and BatchNorm updates of one train step (dropout off)."""

    def loss(params):  # noqa: ANN001, ANN202
        logits, new = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
            mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)},
        )  # fmt: skip
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new

    return jax.grad(loss, has_aux=True)(variables["params"])


@pytest.mark.parametrize("name", ["mobilenetv2_ca", "mobilenext"])
def test_train_steps_use_the_kernel_gradient_with_the_same_numbers(name):
    """A whole train step traced inside `training_ops()` has the gradients and BatchNorm
    updates of one traced outside it (XLA's loops); there every depthwise layer calls the
    kernel gradient (the stride-2 ones the input gradient too), and inference none; outside it,
    or inside with `use_kernels(False)`, nothing calls them. Tolerance: 2e-4 relative, or 1e-6 of
    the largest gradient: a BatchNorm bias before another BatchNorm has a true gradient of 0,
    and its float32 values are rounding noise of that size either way."""
    model = ca_flax.create_model(name, num_classes=7, width_mult=0.35, dropout_rate=0.0)
    variables = random_variables(model)
    x = jax.random.normal(jax.random.key(0), (4, 32, 40, 3))
    labels = jnp.arange(4) % 7
    args = (variables, x, labels)

    def lower_step() -> jax.stages.Lowered:
        """The train step traced afresh (jit caches traces, not the ops in force)."""
        return jax.jit(lambda *a: train_gradients(model, *a)).lower(*args)

    with cpu.training_ops():
        assert kernels_apply_to_training()
        fused = lower_step()
        inference = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x)
    plain = lower_step()
    got, want = fused.compile()(*args), plain.compile()(*args)
    leaves = jax.tree_util.tree_leaves
    largest = max(float(jnp.abs(b).max()) for b in leaves(want))
    for a, b in zip(leaves(got), leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6 * largest)
    depthwise = sum(leaf.shape[:3] == (3, 3, 1) for leaf in leaves(variables["params"]))
    program = fused.as_text()
    assert depthwise > 0 and calls(program, TARGET) == depthwise
    assert calls(program, INPUT_TARGET) == 4  # both families' stride-2 depthwise layers
    for text in (inference.as_text(), plain.as_text()):
        assert "ca_flax_" not in text
    with cpu.use_kernels(False), cpu.training_ops():
        assert not kernels_apply_to_training()
        assert "ca_flax_" not in lower_step().as_text()
