"""Converter CLI, wrapped checkpoints, load_pretrained round trip, and bad input."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

import ca_flax
from ca_flax.convert import ConversionError, load_torch_checkpoint, sha256_of, torch_reference

NAME, WIDTH = "mobilenetv2_ca", 0.35
SMALL = {"width_mult": WIDTH}


@pytest.fixture(scope="module")
def small_ref():
    return torch_reference.randomize(torch_reference.build(NAME, width=WIDTH).eval(), seed=11)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, small_ref):
    path = tmp_path_factory.mktemp("ckpt") / "mbv2_ca.pth"
    torch.save(small_ref.state_dict(), path)
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ca_flax.convert", *args], capture_output=True, text=True
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_cli_writes_checkpoint_that_load_pretrained_reads(ckpt, small_ref, tmp_path):
    out = tmp_path / "converted"
    proc = run_cli(str(ckpt), "--model", NAME, "--width-mult", str(WIDTH), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "ca_flax.json").read_text())
    assert meta["model"] == NAME and meta["model_kwargs"]["width_mult"] == WIDTH
    assert meta["source_sha256"] == sha256_of(ckpt)
    model, variables = ca_flax.load_pretrained(out)
    direct = load_torch_checkpoint(ckpt, NAME, **SMALL)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(direct), strict=True):
        np.testing.assert_array_equal(a, b)  # the orbax round trip is bit-exact
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = small_ref(x).numpy()
    got = model.apply(variables, x.permute(0, 2, 3, 1).numpy())
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-3)  # exactness: parity tests


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "ddp", "ddp-nested", "ema"])
def test_wrapped_and_prefixed_checkpoints_convert(wrapper, small_ref, tmp_path):
    sd = small_ref.state_dict()
    decoy = {k: torch.zeros_like(v) for k, v in sd.items()}
    obj = {
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd},
        "ddp": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        "ddp-nested": {f"module.module.{k}": v for k, v in sd.items()},
        "ema": {"state_dict": decoy, "state_dict_ema": sd},
    }[wrapper]
    path = tmp_path / "wrapped.pth.tar"
    torch.save(obj, path)
    variables = load_torch_checkpoint(path, NAME, ema=wrapper == "ema", **SMALL)
    kernel = variables["params"]["features_0"]["0"]["kernel"]
    np.testing.assert_array_equal(kernel, sd["features.0.0.weight"].numpy().transpose(2, 3, 1, 0))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("nan", r"key 'features.1.conv.1.running_var' holds 1 NaN/inf values"),
        ("twice", r"key 'features.0.0.weight' appears twice"),
    ],
)
def test_nonfinite_and_duplicate_keys_are_named(damage, message, small_ref, tmp_path):
    sd = dict(small_ref.state_dict())
    if damage == "nan":
        sd["features.1.conv.1.running_var"] = sd["features.1.conv.1.running_var"].clone()
        sd["features.1.conv.1.running_var"][0] = float("nan")
    else:
        sd["module.features.0.0.weight"] = sd["features.0.0.weight"]
    path = tmp_path / "damaged.pth"
    torch.save(sd, path)
    with pytest.raises(ConversionError, match=message):
        load_torch_checkpoint(path, NAME, **SMALL)


def test_missing_and_unexpected_keys_listed_with_count(small_ref, tmp_path):
    sd = dict(small_ref.state_dict())
    removed = [k for k in sd if k.startswith("features.5.") and "num_batches" not in k]
    for k in removed:
        del sd[k]
    sd["extra.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(ConversionError) as err:
        load_torch_checkpoint(path, NAME, **SMALL)
    msg = str(err.value)
    assert str(path) in msg and f"missing keys: {len(removed)} (features.5." in msg
    assert "unexpected keys: 1 (extra.weight)" in msg


def test_wrong_shape_names_key_and_shapes(small_ref, tmp_path):
    sd = dict(small_ref.state_dict())
    sd["classifier.1.weight"] = torch.zeros(10, 1280)
    path = tmp_path / "shape.pth"
    torch.save(sd, path)
    shapes = r"classifier.1.weight.*\(10, 1280\).*\(1000, 1280\) \(check --num-classes\)"
    with pytest.raises(ConversionError, match=shapes):
        load_torch_checkpoint(path, NAME, **SMALL)
    sd = dict(small_ref.state_dict())
    sd["features.0.0.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save(sd, path)
    with pytest.raises(ConversionError, match=r"features.0.0.weight.*\(check --width-mult\)"):
        load_torch_checkpoint(path, NAME, **SMALL)


def test_checkpoint_of_other_family_is_named(tmp_path):
    ref = torch_reference.build("mobilenext", width=WIDTH)
    path = tmp_path / "next.pth"
    torch.save({"state_dict": ref.state_dict()}, path)
    proc = run_cli(
        str(path), "--model", NAME, "--width-mult", str(WIDTH), "--out", str(tmp_path / "o")
    )
    assert_one_line_error(proc, "mobilenext checkpoint", "'mobilenext'")
    assert not (tmp_path / "o").exists()


def test_truncated_file_and_unknown_model_fail_cleanly(ckpt, tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    out = tmp_path / "out"
    assert_one_line_error(run_cli(str(truncated), "--model", NAME, "--out", str(out)), "truncated")
    assert_one_line_error(
        run_cli(str(ckpt), "--model", "resnet", "--out", str(out)), "mobilenext_ca"
    )
    assert_one_line_error(run_cli(str(tmp_path / "nope.pth"), "--model", NAME, "--out", str(out)))
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


class _Exploit:
    """A pickle that would create a file if it were ever executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_code_carrying_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": _Exploit(marker)}}, path, pickle_module=pickle)
    proc = run_cli(str(path), "--model", NAME, "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "refused")
    assert not marker.exists()
    assert not (tmp_path / "o").exists()


def test_existing_output_directory_is_not_overwritten(ckpt, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_cli(str(ckpt), "--model", NAME, "--width-mult", str(WIDTH), "--out", str(out))
    assert_one_line_error(proc, "already exists")
    assert (out / "keep.txt").read_text() == "mine"
