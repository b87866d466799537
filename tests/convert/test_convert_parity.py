"""The converter reproduces the released PyTorch layouts exactly (logits, blocks, keys)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ca_flax
from ca_flax.convert import convert_state_dict, expected_layout, torch_reference, torch_shape
from tests.helpers.reference import read_keys_tsv

RELEASED = {"mobilenetv2_ca": "mbv2_ca.keys.tsv", "mobilenext": "mobilenext.keys.tsv"}


def torch_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {
        k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")
    }


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_reference_and_flax_layouts_equal_released_keys(name, reference_dir):
    released = read_keys_tsv(reference_dir / RELEASED[name])
    ref = torch_reference.build(name)
    assert {k: tuple(v.shape) for k, v in torch_state(ref).items()} == released
    flax_layout = {k: torch_shape(shape) for k, (_, _, shape) in expected_layout(name).items()}
    assert flax_layout == released


def capture_flax_blocks(model, variables, x):
    """Logits and the output of every `features_k` block."""
    logits, state = model.apply(
        variables,
        x,
        train=False,
        capture_intermediates=lambda mdl, method: (
            (mdl.name or "").startswith("features_") and method == "__call__"
        ),
        mutable=["intermediates"],
    )
    inter = state["intermediates"]
    blocks = {k: np.asarray(v["__call__"][0]) for k, v in inter.items()}
    return np.asarray(logits), blocks


def capture_torch_blocks(model, x):
    outputs = {}
    hooks = [
        block.register_forward_hook(
            lambda _m, _i, out, k=i: outputs.__setitem__(f"features_{k}", out.detach())
        )
        for i, block in enumerate(model.features)
    ]
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    return logits.numpy(), {k: v.permute(0, 2, 3, 1).numpy() for k, v in outputs.items()}


@pytest.mark.parametrize(
    "name,shape",
    [
        ("mobilenetv2_ca", (3, 224, 224)),
        ("mobilenetv2_ca", (2, 192, 160)),
        ("mobilenext", (3, 224, 224)),
        ("mobilenext", (2, 192, 160)),
    ],
)
def test_converted_logits_and_blocks_match_pytorch(name, shape):
    ref = torch_reference.randomize(torch_reference.build(name).eval(), seed=1)
    variables = convert_state_dict(torch_state(ref), name)
    n, h, w = shape
    x = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(2))
    t_logits, t_blocks = capture_torch_blocks(ref, x)
    model = ca_flax.create_model(name)
    f_logits, f_blocks = capture_flax_blocks(model, variables, x.permute(0, 2, 3, 1).numpy())
    assert sorted(f_blocks) == sorted(t_blocks)
    for k in t_blocks:  # blocks first, so a failure names the first wrong block
        scale = max(1.0, float(np.abs(t_blocks[k]).max()))
        np.testing.assert_allclose(f_blocks[k], t_blocks[k], atol=1e-4 * scale, err_msg=k)
    np.testing.assert_allclose(f_logits, t_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "name,width", [("mobilenetv2", 0.5), ("mobilenext_ca", 0.75), ("mobilenetv2_ca", 1.4)]
)
def test_other_layouts_and_widths_convert_exactly(name, width):
    """Judged against float64 PyTorch: at most PyTorch's own float32 error (or 1e-4)."""
    ref = torch_reference.randomize(torch_reference.build(name, width=width).eval(), seed=3)
    variables = convert_state_dict(torch_state(ref), name, width_mult=width)
    x = torch.randn(2, 3, 96, 80, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch32 = ref(x).numpy()
        truth = ref.double()(x.double()).numpy()
    model = ca_flax.create_model(name, width_mult=width)
    got = np.asarray(model.apply(variables, x.permute(0, 2, 3, 1).numpy(), train=False))
    torch_error = np.abs(torch32 - truth).max()
    assert np.abs(got - truth).max() <= max(1e-4, 2 * torch_error)
