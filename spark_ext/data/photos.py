"""The photos bundled with scikit-image (no download), as float tensors.

Every name below is shipped inside the scikit-image wheel (``skimage/data/*``)
and loads offline; images that ``skimage.data`` would fetch from the network
(``brain``, ``eagle``, ``lily``, ``skin``, ...) are deliberately not used.

Split (fixed; held-out photos are never cropped for training):

* train: astronaut, rocket, hubble_deep_field, immunohistochemistry,
  motorcycle (left view of ``stereo_motorcycle``), retina, grass, gravel,
  brick, moon, coins, page, text, clock;
* held out: chelsea (cat, colour), coffee (colour), camera (grey).

Grey photos are replicated to 3 channels so that every network sees RGB.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Union

import numpy as np
import torch

TRAIN_PHOTOS = (
    "astronaut",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "motorcycle",
    "retina",
    "grass",
    "gravel",
    "brick",
    "moon",
    "coins",
    "page",
    "text",
    "clock",
)
HELD_OUT_PHOTOS = ("chelsea", "coffee", "camera")


def _loader(name: str) -> Callable[[], np.ndarray]:
    import skimage.data  # optional dependency (the "demo" extra)

    if name == "motorcycle":
        # stereo_motorcycle returns (left, right, disparity); the right view is
        # a near-duplicate, so only the left one is used (and only for training).
        return lambda: skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)


def available_photos() -> tuple[str, ...]:
    """All photo names this module knows (train then held out)."""
    return TRAIN_PHOTOS + HELD_OUT_PHOTOS


@functools.cache
def _load_uint8(name: str) -> np.ndarray:
    img = np.asarray(_loader(name)())
    if img.dtype != np.uint8:
        raise ValueError(f"photo {name!r} is {img.dtype}, expected uint8")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.shape[2] == 4:  # RGBA: drop alpha
        img = img[:, :, :3]
    img.setflags(write=False)
    return img


def load_photo(name: str) -> torch.Tensor:
    """Photo ``name`` as a float32 ``[3, H, W]`` tensor in ``[0, 1]`` (a fresh copy)."""
    if name not in available_photos():
        raise ValueError(f"photo must be one of {available_photos()}, got {name!r}")
    img = _load_uint8(name)
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def image_files(directory: Union[str, Path]) -> list[Path]:
    """The PNG/JPEG files directly in ``directory`` (sorted by name; suffix case ignored).

    Raises ``ValueError`` if ``directory`` is not a folder or holds no such file.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise ValueError(f"image folder {str(folder)!r} does not exist or is not a directory")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder {str(folder)!r} has no {'/'.join(IMAGE_SUFFIXES)} files")
    return files


def load_image_folder(directory: Union[str, Path]) -> list[tuple[str, torch.Tensor]]:
    """Every PNG/JPEG photo in ``directory`` as ``(file name, float32 [3, H, W] in [0, 1])``.

    8-bit images only (grey is replicated to 3 channels, alpha dropped, palette
    converted); a file that cannot be read raises ``ValueError`` naming it.
    """
    from PIL import Image  # comes with the "demo" extra (scikit-image, matplotlib)

    out = []
    for path in image_files(directory):
        try:
            with Image.open(path) as im:
                if im.mode not in ("L", "LA", "RGB", "RGBA", "P"):
                    raise ValueError(f"8-bit grey/RGB expected, got PIL mode {im.mode!r}")
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:  # a bomb: over PIL's pixel limit
            raise ValueError(f"cannot read image {str(path)!r}: {exc}") from None
        out.append((path.name, torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div_(255.0)))
    return out
