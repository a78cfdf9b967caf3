"""Training batches (random crops of the training photos) and the held-out set.

Everything is seeded with private ``torch.Generator`` objects, so the data a
run sees depends only on its seed (not on the global RNG or on what else the
process draws), and :class:`RandomCropBatches` can be checkpointed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Optional, Union

import torch

from .._validation import check_choice, check_int, check_real
from .degradations import add_gaussian_noise, bicubic_downsample, crop_to_multiple
from .photos import HELD_OUT_PHOTOS, TRAIN_PHOTOS, load_image_folder, load_photo

Device = Union[str, torch.device]


@dataclasses.dataclass(frozen=True)
class RestorationTask:
    """What degrades the clean photos.

    kind: ``"denoise"`` (AWGN of std ``sigma`` on the [0, 1] scale, unclipped)
        or ``"sr"`` (bicubic downsampling by ``scale``; the network upsamples).
    """

    kind: str = "denoise"
    sigma: float = 25.0 / 255.0
    scale: int = 2

    def __post_init__(self):
        check_choice(self.kind, "task", ("denoise", "sr"))
        if check_real(self.sigma, "sigma") < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if check_int(self.scale, "scale") < 1:
            raise ValueError(f"scale must be >= 1, got {self.scale}")

    @property
    def multiple(self) -> int:
        """Crop sizes must be multiples of this (the SR scale, or 1)."""
        return self.scale if self.kind == "sr" else 1

    def degrade(self, clean: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Network input for clean ``[B, 3, H, W]``: noisy ``[B,3,H,W]`` or low-res ``[B,3,H/s,W/s]``."""
        if self.kind == "denoise":
            return add_gaussian_noise(clean, self.sigma, generator)
        return bicubic_downsample(clean, self.scale)


def _augment(crop: torch.Tensor, code: int) -> torch.Tensor:
    """One of the 8 flips/rotations of a square ``[C, P, P]`` crop."""
    if code & 1:
        crop = crop.flip(-1)
    if code & 2:
        crop = crop.flip(-2)
    if code & 4:
        crop = crop.transpose(-1, -2)
    return crop


class RandomCropBatches:
    """Endless iterator of ``(inputs, targets)`` batches of random training crops.

    Each batch draws, from its own generator: a photo per sample (uniformly
    over ``photos``), a ``crop x crop`` window, one of 8 flips/rotations, and
    the degradation noise. ``targets`` is float32 ``[B, 3, crop, crop]`` in
    [0, 1]; ``inputs`` is the task's degraded version (same size for
    denoising, ``crop / scale`` for SR), both on ``device``.

    ``state_dict()`` / ``load_state_dict()`` save and restore the generator so
    a resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(
        self,
        task: RestorationTask,
        crop: int = 48,
        batch_size: int = 8,
        seed: int = 0,
        photos: Sequence[str] = TRAIN_PHOTOS,
        device: Device = "cpu",
    ):
        self.task = task
        self.crop = check_int(crop, "crop")
        self.batch_size = check_int(batch_size, "batch_size")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.crop < 1 or self.crop % task.multiple:
            raise ValueError(f"crop must be a positive multiple of {task.multiple} for task {task.kind!r}, got {crop}")
        self.images = [load_photo(name) for name in photos]
        if not self.images:
            raise ValueError("photos must name at least one photo")
        for name, img in zip(photos, self.images):
            if min(img.shape[-2:]) < self.crop:
                raise ValueError(f"crop={crop} is larger than photo {name!r} of size {tuple(img.shape[-2:])}")
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(check_int(seed, "seed"))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.generator
        picks = torch.randint(len(self.images), (self.batch_size,), generator=g).tolist()
        crops = []
        for i in picks:
            img = self.images[i]
            top = int(torch.randint(img.shape[1] - self.crop + 1, (1,), generator=g))
            left = int(torch.randint(img.shape[2] - self.crop + 1, (1,), generator=g))
            code = int(torch.randint(8, (1,), generator=g))
            crops.append(_augment(img[:, top : top + self.crop, left : left + self.crop], code))
        clean = torch.stack(crops).contiguous()
        degraded = self.task.degrade(clean, g)
        return degraded.to(self.device), clean.to(self.device)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class RandomCropDataset(torch.utils.data.Dataset):
    """Map-style version: item ``i`` is a deterministic function of ``(seed, i)``.

    Use it with ``DataLoader`` and ``DistributedSampler`` (each rank then gets
    distinct, reproducible crops). Items are ``(input [3,h,w], target [3,P,P])``.
    """

    def __init__(
        self,
        task: RestorationTask,
        crop: int = 48,
        length: int = 1024,
        seed: int = 0,
        photos: Sequence[str] = TRAIN_PHOTOS,
    ):
        self.length = check_int(length, "length")
        self.seed = check_int(seed, "seed")
        self._source = RandomCropBatches(task, crop, 1, seed, photos)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of length {self.length}")
        # A fresh seed per item (splitmix-style mixing keeps neighbouring seeds unrelated).
        self._source.generator.manual_seed((self.seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) % (2**63))
        inputs, targets = next(self._source)
        return inputs[0], targets[0]


def held_out_pairs(
    task: RestorationTask,
    size: Optional[int] = None,
    seed: int = 1234,
    photos: Sequence[str] = HELD_OUT_PHOTOS,
    device: Device = "cpu",
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """The held-out evaluation set: ``[(name, input [1,3,h,w], target [1,3,H,W]), ...]``.

    ``size``: a centred ``size x size`` crop of every photo (``None``: the whole
    photo, cropped to a multiple of the SR scale). The noise is fixed by
    ``seed`` and the photo's position, so every method sees identical inputs.
    """
    return evaluation_pairs(task, [(name, load_photo(name)) for name in photos], size, seed, device)


def image_folder_pairs(
    task: RestorationTask, directory, size: Optional[int] = None, seed: int = 1234, device: Device = "cpu"
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Evaluation pairs, as :func:`held_out_pairs`, from every PNG/JPEG photo in ``directory``
    (:func:`~spark_ext.data.photos.load_image_folder`; whole photos by default)."""
    return evaluation_pairs(task, load_image_folder(directory), size, seed, device)


def evaluation_pairs(
    task: RestorationTask,
    images: Sequence[tuple[str, torch.Tensor]],
    size: Optional[int] = None,
    seed: int = 1234,
    device: Device = "cpu",
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Degrade clean ``(name, float [3, H, W] in [0, 1])`` images into ``(name, input, target)`` pairs
    (batch dimension added), each target centre-cropped to ``size`` (if given) and to a multiple of
    the SR scale; image ``k``'s noise comes from seed ``seed + k``."""
    out = []
    for k, (name, img) in enumerate(images):
        if size is not None:
            size = check_int(size, "size")
            if size < 1 or size % task.multiple or size > min(img.shape[-2:]):
                raise ValueError(
                    f"size must be a multiple of {task.multiple} in [1, {min(img.shape[-2:])}] for {name!r}, got {size}"
                )
            top, left = (img.shape[1] - size) // 2, (img.shape[2] - size) // 2
            img = img[:, top : top + size, left : left + size]
        clean = crop_to_multiple(img, task.multiple)[None].contiguous()
        if min(clean.shape[-2:]) < 2 * task.multiple:
            raise ValueError(f"image {name!r} of size {tuple(img.shape[-2:])} is too small for task {task.kind!r}")
        g = torch.Generator().manual_seed(seed + k)
        out.append((name, task.degrade(clean, g).to(device), clean.to(device)))
    return out
