"""Built-in data: bundled photos, split, crops, degradations, seeding."""

import pytest
import torch

pytest.importorskip("skimage")

from spark_ext.data import (  # noqa: E402
    HELD_OUT_PHOTOS,
    TRAIN_PHOTOS,
    RandomCropBatches,
    RandomCropDataset,
    RestorationTask,
    bicubic_downsample,
    held_out_pairs,
    load_photo,
)


def test_split_is_disjoint_and_photos_load_offline():
    assert not set(TRAIN_PHOTOS) & set(HELD_OUT_PHOTOS)
    for name in ("chelsea", "camera", "motorcycle"):
        img = load_photo(name)
        assert img.dtype == torch.float32 and img.shape[0] == 3
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    with pytest.raises(ValueError, match="photo"):
        load_photo("eagle")  # needs a download: not offered


def test_denoise_batches_shapes_noise_and_seed():
    task = RestorationTask("denoise", sigma=0.1)
    a = RandomCropBatches(task, crop=16, batch_size=3, seed=5, photos=("camera", "coins"))
    b = RandomCropBatches(task, crop=16, batch_size=3, seed=5, photos=("camera", "coins"))
    x1, y1 = next(a)
    x2, y2 = next(b)
    assert x1.shape == y1.shape == (3, 3, 16, 16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert 0.05 < float((x1 - y1).std()) < 0.2
    state = a.state_dict()
    nxt = next(a)
    a.load_state_dict(state)
    again = next(a)
    assert torch.equal(nxt[0], again[0]) and torch.equal(nxt[1], again[1])


def test_sr_batches_are_downsampled():
    task = RestorationTask("sr", scale=2)
    x, y = next(RandomCropBatches(task, crop=16, batch_size=2, seed=0, photos=("camera",)))
    assert x.shape == (2, 3, 8, 8) and y.shape == (2, 3, 16, 16)
    assert torch.allclose(x, bicubic_downsample(y, 2))
    with pytest.raises(ValueError, match="multiple of 2"):
        RandomCropBatches(task, crop=15, photos=("camera",))


def test_map_style_dataset_is_deterministic_per_index():
    ds = RandomCropDataset(RestorationTask(), crop=8, length=4, seed=1, photos=("coins",))
    assert torch.equal(ds[2][0], ds[2][0]) and not torch.equal(ds[1][1], ds[2][1])
    with pytest.raises(IndexError):
        ds[4]


def test_held_out_pairs_fixed():
    task = RestorationTask("denoise")
    p1, p2 = held_out_pairs(task, size=32), held_out_pairs(task, size=32)
    assert [n for n, _, _ in p1] == list(HELD_OUT_PHOTOS)
    for (_, x1, y1), (_, x2, y2) in zip(p1, p2):
        assert x1.shape == y1.shape == (1, 3, 32, 32) and torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(ValueError, match="task"):
        RestorationTask("deblur")
