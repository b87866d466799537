"""ImageNet eval preprocessing, equal to the PyTorch transform the released weights expect.

torchvision's `Resize(256)` (bilinear, PIL) + `CenterCrop(224)` + `ToTensor()` +
`Normalize(mean, std)`, after `Image.convert('RGB')` as `ImageFolder` loads images, but
returned as an NHWC-ready float32 array of shape (224, 224, 3).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ca_flax.models.inputs import normalize

RESIZE = 256
CROP = 224


class ImageError(ValueError):
    """An input that is missing or not a readable image; the message names the file."""


def load_image(path: str | Path) -> Image.Image:
    """Open any PIL-readable image (grayscale, CMYK, RGBA, palette, ...) as RGB."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not a readable image (unknown format)") from None
    except (Image.DecompressionBombError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ImageError(f"{path}: not a readable image: {first}") from None


def resized_size(width: int, height: int, size: int = RESIZE) -> tuple[int, int]:
    """(width, height) after torchvision `Resize(size)`: short side `size`, long side truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop_box(width: int, height: int, crop: int = CROP) -> tuple[int, int, int, int]:
    """PIL crop box of torchvision `CenterCrop(crop)`, with its round-half-to-even offsets."""
    top = int(round((height - crop) / 2.0))
    left = int(round((width - crop) / 2.0))
    return left, top, left + crop, top + crop


def crop_image(img: Image.Image, resize: int = RESIZE, crop: int = CROP) -> Image.Image:
    """Resize the shorter side to `resize` (bilinear) and center-crop to `crop` x `crop` pixels."""
    img = img.resize(resized_size(*img.size, resize), Image.Resampling.BILINEAR)
    return img.crop(center_crop_box(*img.size, crop))


def image_to_input(img: Image.Image) -> np.ndarray:
    """An 8-bit RGB image -> the models' float32 (H, W, 3) input (`models.inputs.normalize`)."""
    return normalize(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)


def preprocess(img: Image.Image, resize: int = RESIZE, crop: int = CROP) -> np.ndarray:
    """The full eval transform of one image: (crop, crop, 3) float32, ready to stack into NHWC."""
    return image_to_input(crop_image(img.convert("RGB"), resize, crop))


def preprocess_file(path: str | Path, resize: int = RESIZE, crop: int = CROP) -> np.ndarray:
    """`preprocess(load_image(path))`; raises ImageError for a missing or unreadable file."""
    return preprocess(load_image(path), resize, crop)
