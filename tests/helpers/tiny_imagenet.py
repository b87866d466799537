"""A tiny ImageNet manual directory with the real archive layout, and the TFDS build from it.

`ILSVRC2012_img_train.tar` holds one `<wnid>.tar` per class with `<wnid>_<i>.JPEG` files;
`ILSVRC2012_img_val.tar` holds `ILSVRC2012_val_<8 digits>.JPEG`, labelled by TFDS's shipped
validation_labels.txt in sorted-name order. Each class is a solid colour, so pixels can be checked.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

CLASSES = ("n01440764", "n01443537", "n01484850", "n01491361")  # labels 0..3 of imagenet2012
TRAIN_PER_CLASS = 8
NUM_VAL = 10


def colour(label: int) -> tuple[int, int, int]:
    """The solid RGB colour of images of class `label` (any of the 1000)."""
    rng = np.random.default_rng(label)
    return tuple(int(v) for v in rng.integers(20, 236, size=3))


def _jpeg(rgb: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def validation_labels(n: int = NUM_VAL) -> list[str]:
    """The wnids TFDS assigns to ILSVRC2012_val_00000001..n (its shipped labels file)."""
    path = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt")
    return path.read_text().split()[:n]


def write_manual_dir(manual: Path) -> None:
    """ILSVRC2012_img_train.tar (tar of per-class tars) and ILSVRC2012_img_val.tar."""
    manual.mkdir(parents=True, exist_ok=True)
    names = tfds.builder_cls("imagenet2012")().info.features["label"].names
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as outer:
        for wnid in CLASSES:
            inner_buf = io.BytesIO()
            with tarfile.open(fileobj=inner_buf, mode="w") as inner:
                for i in range(TRAIN_PER_CLASS):
                    size = (40 + 4 * i, 36 + 3 * (i % 3))
                    _add(inner, f"{wnid}_{i + 1}.JPEG", _jpeg(colour(names.index(wnid)), size))
            _add(outer, f"{wnid}.tar", inner_buf.getvalue())
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as tar:
        for i, wnid in enumerate(validation_labels()):
            size = (48, 40) if i % 2 else (40, 56)
            _add(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(colour(names.index(wnid)), size))


def prepare(data_dir: Path) -> tfds.core.DatasetBuilder:
    """Build imagenet2012 from `<data_dir>/downloads/manual`, the TFDS default manual dir."""
    write_manual_dir(data_dir / "downloads" / "manual")
    builder = tfds.builder("imagenet2012", data_dir=str(data_dir))
    builder.download_and_prepare()
    return builder
