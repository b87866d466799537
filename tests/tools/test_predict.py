"""Prediction CLI: torchvision-equal preprocessing, any image mode, one-line errors, exit status."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from ca_flax import create_model
from ca_flax.classes import imagenet_classes
from ca_flax.predict import main
from ca_flax.preprocess import ImageError, load_image, preprocess, preprocess_file
from ca_flax.pretrained import save_pretrained
from tests.helpers.tiny_models import random_variables

KWARGS = {"width_mult": 0.35}


def reference_transform(img: Image.Image) -> np.ndarray:
    """torchvision Resize(256) + CenterCrop(224) + ToTensor + Normalize, in plain PIL + numpy."""
    img = img.convert("RGB")
    w, h = img.size
    if w <= h:
        size = (256, int(256 * h / w))
    else:
        size = (int(256 * w / h), 256)
    img = img.resize(size, Image.BILINEAR)
    w, h = img.size
    top, left = int(round((h - 224) / 2.0)), int(round((w - 224) / 2.0))
    x = np.asarray(img, np.float32)[top : top + 224, left : left + 224] / 255.0
    return (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array(
        [0.229, 0.224, 0.225], np.float32
    )


def random_image(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


@pytest.mark.parametrize("size", [(640, 480), (300, 257), (199, 500), (256, 256), (100, 150)])
def test_preprocess_equals_reference(size):
    img = random_image(size, seed=size[0])
    out = preprocess(img)
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, reference_transform(img), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "1", "I;16", "LA"])
def test_any_image_mode_loads_as_rgb(mode, tmp_path):
    img = random_image((90, 70), mode)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    img.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (90, 70)
    np.testing.assert_allclose(preprocess_file(path), reference_transform(Image.open(path)))


def test_unreadable_files_raise_one_line_image_errors(tmp_path):
    good = tmp_path / "good.png"
    random_image((64, 64)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    (tmp_path / "empty.jpg").write_bytes(b"")
    cases = {
        "truncated.png": "not a readable image",
        "empty.jpg": "unknown format",
        "": "not a file",
    }
    for name, message in cases.items():
        with pytest.raises(ImageError, match=message) as info:
            load_image(tmp_path / name)
        assert "\n" not in str(info.value)


def test_class_list_is_shipped():
    names = imagenet_classes()
    assert len(names) == 1000 and names[0].startswith("tench") and names[999].startswith("toilet")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = create_model("mobilenetv2_ca", **KWARGS)
    variables = random_variables(model)
    path = save_pretrained(
        tmp_path_factory.mktemp("ckpt") / "tiny", "mobilenetv2_ca", variables, KWARGS
    )
    return path, model, variables


def test_cli_prints_top5_matching_the_model(checkpoint, tmp_path, capsys):
    path, model, variables = checkpoint
    images = [tmp_path / "a.jpg", tmp_path / "b.png"]
    random_image((320, 240), seed=1).save(images[0])
    random_image((200, 260), "L", seed=2).save(images[1])
    assert main(["--checkpoint", str(path), *map(str, images)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(images[0]) and lines[6] == str(images[1]) and len(lines) == 12
    x = np.stack([preprocess_file(p) for p in images])
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    probs = np.asarray(jax.nn.softmax(logits))
    names = imagenet_classes()
    for i in range(2):
        best = int(np.argmax(probs[i]))
        assert lines[6 * i + 1].split(None, 1)[1] == names[best]
        assert float(lines[6 * i + 1].split("%")[0]) == pytest.approx(
            100 * probs[i, best], abs=0.006
        )


def test_cli_reports_bad_files_and_keeps_going(checkpoint, tmp_path):
    path = checkpoint[0]
    good, text = tmp_path / "good.png", tmp_path / "notes.txt"
    random_image((64, 64), "RGBA").save(good)
    text.write_text("not an image\n")
    argv = ["--checkpoint", str(path), str(tmp_path / "missing.jpg"), str(text), str(good)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "ca_flax.predict", *argv], capture_output=True, text=True, env=env
    )
    assert result.returncode == 1
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 2
    assert (
        "missing.jpg: no such file" in errors[0] and "notes.txt: not a readable image" in errors[1]
    )
    assert "Traceback" not in result.stderr
    out = result.stdout.splitlines()
    assert out[0] == str(good) and len(out) == 6


def test_cli_bad_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path), str(tmp_path / "x.jpg")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a ca_flax checkpoint" in err[0]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda meta: "{model: oops", "not valid JSON"),
        (lambda meta: json.dumps({"model_kwargs": meta["model_kwargs"]}), "needs keys"),
        (
            lambda meta: json.dumps({**meta, "model_kwargs": {"width_mult": 0.5}}),
            "is stored as",
        ),
    ],
    ids=["invalid-json", "no-model", "wrong-width"],
)
def test_cli_damaged_metadata_is_one_line(checkpoint, tmp_path, capsys, edit, message):
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint[0], damaged)
    meta_file = damaged / "ca_flax.json"
    meta_file.write_text(edit(json.loads(meta_file.read_text())))
    assert main(["--checkpoint", str(damaged), str(tmp_path / "x.jpg")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(damaged) in err[0], err
