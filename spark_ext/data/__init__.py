"""Built-in data for the demo: scikit-image's bundled photos, split and degraded.

* :func:`load_photo`, :data:`TRAIN_PHOTOS`, :data:`HELD_OUT_PHOTOS` — the photos
  (offline, no download) and the fixed train / held-out split;
* :class:`RestorationTask` — Gaussian denoising or bicubic x2 super-resolution;
* :class:`RandomCropBatches` (seeded, checkpointable iterator) and
  :class:`RandomCropDataset` (map-style, for ``DistributedSampler``) — training crops;
* :func:`held_out_pairs` — the fixed evaluation pairs; :func:`image_folder_pairs` — pairs
  from any folder of PNG/JPEG photos;
* :func:`imresize_matlab` — MATLAB-style bicubic downscale (the SR degradation).
"""

from .datasets import (
    RandomCropBatches,
    RandomCropDataset,
    RestorationTask,
    evaluation_pairs,
    held_out_pairs,
    image_folder_pairs,
)
from .degradations import add_gaussian_noise, bicubic_downsample, bicubic_upsample, crop_to_multiple
from .photos import HELD_OUT_PHOTOS, TRAIN_PHOTOS, available_photos, image_files, load_image_folder, load_photo
from .resize import imresize_matlab

__all__ = [
    "HELD_OUT_PHOTOS",
    "TRAIN_PHOTOS",
    "RandomCropBatches",
    "RandomCropDataset",
    "RestorationTask",
    "add_gaussian_noise",
    "available_photos",
    "bicubic_downsample",
    "bicubic_upsample",
    "crop_to_multiple",
    "evaluation_pairs",
    "held_out_pairs",
    "image_files",
    "image_folder_pairs",
    "imresize_matlab",
    "load_image_folder",
    "load_photo",
]
