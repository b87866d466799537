"""Export CLI: TFLite and SavedModel outputs compute the JAX model's logits within 1e-4."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest

from ca_flax import create_model
from ca_flax.export import main
from ca_flax.pretrained import save_pretrained
from tests.helpers.tiny_models import random_variables

SIZE = 64
KWARGS = {"width_mult": 0.35}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = create_model("mobilenetv2_ca", **KWARGS)
    variables = random_variables(model, seed=1)
    ckpt = save_pretrained(root / "ckpt", "mobilenetv2_ca", variables, KWARGS)
    x = np.random.default_rng(0).normal(size=(1, SIZE, SIZE, 3)).astype(np.float32)
    expected = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
    assert np.abs(expected).max() > 0.1  # a meaningful comparison, not near-zero logits
    return root, ckpt, x, expected


def tflite_interpreter(path):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806 - deprecated but present in TF 2.21
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Interpreter(model_path=str(path))


def test_tflite_matches_jax(setup, capsys):
    root, ckpt, x, expected = setup
    out = root / "model.tflite"
    assert (
        main(
            [
                "--checkpoint",
                str(ckpt),
                "--format",
                "tflite",
                "--out",
                str(out),
                "--size",
                str(SIZE),
            ]
        )
        == 0
    )
    assert "bytes" in capsys.readouterr().out
    interpreter = tflite_interpreter(out)
    interpreter.allocate_tensors()
    (inp,), (outp,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert tuple(inp["shape"]) == (1, SIZE, SIZE, 3)
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    got = interpreter.get_tensor(outp["index"])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert "DEPTHWISE_CONV_2D" in ops


def test_saved_model_matches_jax(setup):
    import tensorflow as tf

    root, ckpt, x, expected = setup
    out = root / "saved"
    assert (
        main(
            [
                "--checkpoint",
                str(ckpt),
                "--format",
                "saved_model",
                "--out",
                str(out),
                "--size",
                str(SIZE),
            ]
        )
        == 0
    )
    serve = tf.saved_model.load(str(out)).signatures["serving_default"]
    got = serve(images=tf.constant(x))["logits"].numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_existing_output_and_bad_checkpoint_are_one_line_errors(setup, capsys):
    root, ckpt, _, _ = setup
    taken = root / "taken.tflite"
    taken.write_bytes(b"keep me")
    assert main(["--checkpoint", str(ckpt), "--format", "tflite", "--out", str(taken)]) == 1
    assert (
        main(["--checkpoint", str(root / "none"), "--format", "tflite", "--out", str(root / "y")])
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "already exists" in err[0] and "not a ca_flax checkpoint" in err[1]
    assert taken.read_bytes() == b"keep me"
