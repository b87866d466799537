"""Attention-map CLI: the sown gates equal a hand computation; the PNG is the right size; a
training workdir and validation digits in, readable colour bars for nearly constant gates."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ca_flax import create_model
from ca_flax.attention_maps import (
    AttentionMapError,
    BlockMaps,
    batch_ca_maps,
    ca_maps,
    select_blocks,
)
from ca_flax.pretrained import save_pretrained
from ca_flax.visualize import (
    MIN_SPAN,
    load_workdir,
    main,
    plot_maps,
    validation_digits,
)
from tests.helpers.tiny_models import random_variables

KWARGS = {"width_mult": 0.35}
SIZE = 64


def hand_gates(x, p, stats):
    """CoordAttention's a_h and a_w from its input, in numpy (pool, conv1+BN+h_swish, sigmoid)."""
    x = np.asarray(x, np.float64)
    h = x.shape[1]
    y = np.concatenate([x.mean(axis=2), x.mean(axis=1)], axis=1)  # (N, H + W, C)
    y = y @ np.asarray(p["conv1"]["kernel"])[0, 0] + np.asarray(p["conv1"]["bias"])
    mean, var = np.asarray(stats["bn1"]["mean"]), np.asarray(stats["bn1"]["var"])
    y = (y - mean) / np.sqrt(var + 1e-5) * np.asarray(p["bn1"]["scale"]) + np.asarray(
        p["bn1"]["bias"]
    )
    y = y * np.clip(y + 3, 0, 6) / 6

    def gate(part, name):
        z = part @ np.asarray(p[name]["kernel"])[0, 0] + np.asarray(p[name]["bias"])
        return 1 / (1 + np.exp(-z))

    return gate(y[:, :h], "conv2"), gate(y[:, h:], "conv3")


@pytest.mark.parametrize(
    ("name", "block", "ca", "before"),
    [
        ("mobilenetv2_ca", "features_2", "conv_6", "conv_4"),
        ("mobilenext_ca", "features_1", "conv_3", "conv_1"),
    ],
)
def test_maps_equal_hand_computed_gates(name, block, ca, before):
    model = create_model(name, **KWARGS)
    variables = random_variables(model)
    x = jax.random.normal(jax.random.key(3), (1, SIZE, SIZE, 3))
    maps = {m.block: m for m in ca_maps(model, variables, x)}
    capture = jax.jit(
        lambda v, x: model.apply(
            v,
            x,
            train=False,
            capture_intermediates=lambda mdl, _: mdl.name == before,
            mutable=["intermediates"],
        )
    )
    _, state = capture(variables, x)
    ca_input = np.clip(np.asarray(state["intermediates"][block][before]["__call__"][0]), 0, 6)
    a_h, a_w = hand_gates(
        ca_input, variables["params"][block][ca], variables["batch_stats"][block][ca]
    )
    m = maps[block]
    assert m.path == f"{block}/{ca}"
    np.testing.assert_allclose(m.a_h, a_h[0], atol=1e-5)
    np.testing.assert_allclose(m.a_w, a_w[0], atol=1e-5)
    np.testing.assert_allclose(m.product(), (a_h[0][:, None] * a_w[0][None]).mean(-1), atol=1e-5)
    assert m.a_h.std() > 1e-3 and m.a_w.std() > 1e-3


def test_block_selection_and_errors():
    model = create_model("mobilenetv2_ca", **KWARGS)
    variables = random_variables(model)
    maps = ca_maps(model, variables, jnp.zeros((1, 64, 64, 3)))
    assert [m.block for m in maps] == [f"features_{i}" for i in range(2, 18)]
    assert [m.block for m in select_blocks(maps, None)] == [
        "features_2",
        "features_7",
        "features_12",
        "features_17",
    ]
    # At 32x32 (the digits quickstart) features_14..17 are 1x1: the default skips them.
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    logits, per_image = batch_ca_maps(model, variables, x)
    expected = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    small = ca_maps(model, variables, x, index=1)
    for one, batched in zip(small, per_image[1], strict=True):
        np.testing.assert_array_equal(one.a_h, batched.a_h)
        np.testing.assert_array_equal(one.a_w, batched.a_w)
    assert not np.allclose(per_image[0][0].a_h, per_image[1][0].a_h)
    assert [m.a_h.shape[0] for m in small[-4:]] == [1, 1, 1, 1]
    assert [m.block for m in select_blocks(small, None)] == [
        "features_2",
        "features_6",
        "features_9",
        "features_13",
    ]
    assert [m.block for m in select_blocks(maps, ["3", "features_9"])] == [
        "features_3",
        "features_9",
    ]
    with pytest.raises(AttentionMapError, match="no CA block features_1;"):
        select_blocks(maps, ["features_1"])
    plain = create_model("mobilenetv2_se", **KWARGS)
    with pytest.raises(AttentionMapError, match="no Coordinate Attention"):
        ca_maps(plain, random_variables(plain), jnp.zeros((1, 32, 32, 3)))


def test_cli_writes_labelled_png(tmp_path, capsys):
    model = create_model("mobilenetv2_ca", **KWARGS)
    ckpt = save_pretrained(tmp_path / "ckpt", "mobilenetv2_ca", random_variables(model), KWARGS)
    rng = np.random.default_rng(0)
    image = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "maps.png"
    argv = ["--checkpoint", str(ckpt), str(image), "--out", str(out), "--blocks", "2", "17"]
    assert main([*argv, "--dpi", "50"]) == 0
    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape == (2 * 150, 3 * 150, 3)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "maps.png", "photo.jpg"]
    assert png.std() > 20 and len(np.unique(png.reshape(-1, 3), axis=0)) > 1000
    assert main([*argv[:-3], "--blocks", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("error: no CA block 1;")
    assert main(["--checkpoint", str(ckpt), str(tmp_path / "nope.jpg"), "--out", str(out)]) == 1
    assert "nope.jpg: no such file" in capsys.readouterr().err


def colour_bars(fig):
    """The colour bars of a drawn figure, each with its map's data."""
    fig.draw_without_rendering()
    return [(im.colorbar, im.get_array()) for ax in fig.axes for im in ax.images[1:]]


def test_nearly_constant_gates_get_plain_colour_bar_ticks():
    rng = np.random.default_rng(0)
    crop = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    flat = BlockMaps(  # a saturated block: its ticks were labelled `1e-9+4.98394e-1` and -5..5
        "features_2/conv_6",
        0.498394 + 1e-8 * rng.standard_normal((8, 16)),
        0.4983941 + 1e-8 * rng.standard_normal((8, 16)),
    )
    single = BlockMaps("features_17/conv_6", np.full((1, 16), 0.5), np.full((1, 16), 0.5))
    low = BlockMaps("features_9/conv_6", np.full((2, 16), 1e-7), np.full((2, 16), 1e-7))
    spread = BlockMaps(
        "features_3/conv_6", rng.uniform(0.2, 0.8, (8, 16)), rng.uniform(size=(8, 16))
    )
    bars = colour_bars(plot_maps(crop, [flat, single, low, spread], dpi=50))
    assert len(bars) == 12
    for cbar, data in bars:
        assert cbar.ax.yaxis.get_offset_text().get_text() == ""
        vmin, vmax = cbar.mappable.get_clim()
        assert 0.0 <= vmin <= data.min() <= data.max() <= vmax <= 1.0
        assert vmax - vmin >= MIN_SPAN * (1 - 1e-9)
        labels = [t.get_text() for t in cbar.ax.yaxis.get_ticklabels()]
        shown = [
            label
            for tick, label in zip(cbar.get_ticks(), labels, strict=True)
            if vmin <= tick <= vmax
        ]
        assert len(set(shown)) == len(shown) >= 3, labels
        for tick, label in zip(cbar.get_ticks(), labels, strict=True):
            assert "e" not in label.lower() and len(label) <= 6, labels
            assert abs(float(label.replace("\N{MINUS SIGN}", "-")) - tick) < 1e-3, labels
    # A map that spans more than MIN_SPAN keeps its own range.
    for cbar, data in bars[9:]:
        np.testing.assert_allclose(cbar.mappable.get_clim(), (data.min(), data.max()))


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """A train.py workdir written by the trainer's own code (checkpoints, summary.json), with
    two steps: step 1 the best by eval top-1, step 2 the latest, with other weights. Nothing is
    trained, so no train step is compiled."""
    from ca_flax.training.progress import Progress
    from ca_flax.training.trainer import Trainer
    from tests.helpers.training import config

    workdir = tmp_path_factory.mktemp("run") / "quickstart"
    cfg = config("quickstart")
    cfg.batch_size, cfg.num_train_steps, cfg.keep_checkpoints = 8, 2, 2
    trainer = Trainer(cfg, workdir)
    saved = {}
    for step, top1 in ((1, 0.75), (2, 0.25)):
        trainer.state = trainer.state.replace(
            step=jnp.asarray(step, jnp.int32),
            params=jax.tree.map(lambda x, s=step: x + 0.01 * s, trainer.state.params),
        )
        trainer._save({"top1": top1})
        saved[step] = jax.device_get(trainer.state.variables())
        with open(workdir / "eval_history.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "eval/top1": top1}) + "\n")
    trainer.checkpointer.wait()
    trainer._write_summary(Progress(2, trainer.steps_per_epoch, cfg.batch_size, 2))
    eval_images = trainer.dataset.eval_images[:5]
    trainer.checkpointer.close()
    trainer.writer.close()
    return workdir, saved, eval_images


def test_workdir_loads_best_checkpoint_and_draws_digits(trained_workdir, tmp_path, capsys):
    workdir, saved, eval_images = trained_workdir
    assert json.loads((workdir / "summary.json").read_text())["best_checkpoint_step"] == 1
    model, variables, run = load_workdir(workdir)
    assert (run.step, run.top1, run.config["image_size"]) == (1, 0.75, 32)
    assert model.width_mult == 0.35 and model.num_classes == 10
    jax.tree.map(np.testing.assert_array_equal, variables, saved[1])
    images, labels = validation_digits(3, 32)  # the trainer's own validation images
    np.testing.assert_array_equal(images, eval_images[:3])
    assert len(labels) == 3 and all(0 <= y < 10 for y in labels)

    out = tmp_path / "maps.png"
    assert main(["--workdir", str(workdir), "--digits", "2", "--out", str(out), "--dpi", "20"]) == 0
    said = capsys.readouterr().out.strip()
    assert said == f"wrote {out} (model: {workdir} step 1, eval top-1 0.7500)"
    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape == (2 * 4 * 60, 3 * 60, 3)  # 2 digits x 4 blocks, 3 in panels at 20 dpi
    assert png.std() > 20
    # With the best checkpoint gone, the latest.
    best = workdir / "checkpoints" / "1"
    best.rename(workdir / "moved")
    try:
        assert load_workdir(workdir)[2].step == 2
    finally:
        (workdir / "moved").rename(best)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_workdir_and_digits_errors(trained_workdir, tmp_path, capsys):
    workdir, _, _ = trained_workdir
    out = str(tmp_path / "maps.png")

    def run(*argv: str) -> str:
        assert main([*argv, "--out", out]) == 1
        return one_line_error(capsys)

    missing = tmp_path / "nope"
    assert run("--workdir", str(missing), "--digits", "1") == (
        f"error: {missing}: no such training workdir"
    )
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    assert run("--workdir", str(empty), "--digits", "1").startswith(
        f"error: {empty}: no checkpoint in checkpoints/"
    )
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    (unfinished / "checkpoints" / "1").symlink_to(workdir / "checkpoints" / "1")
    assert run("--workdir", str(unfinished), "--digits", "1").startswith(
        f"error: {unfinished}: no summary.json with the run's config"
    )
    assert run("--workdir", str(workdir), "--digits", "361") == (
        "error: --digits 361: choose 1 to 360 validation digits"
    )
    assert not Path(out).exists()
    for argv in (
        ["--workdir", str(workdir)],
        ["--workdir", str(workdir), "x.png", "--digits", "2"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--out", out])
        assert exit_info.value.code == 2
        assert "give an image file or --digits N" in capsys.readouterr().err
