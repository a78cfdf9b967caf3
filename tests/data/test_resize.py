"""MATLAB-style bicubic downscale (spark_ext.data.resize): hand-computed weights, PIL in the interior."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spark_ext.data import bicubic_downsample, imresize_matlab
from spark_ext.data.resize import cubic_kernel

# Keys' cubic (a = -0.5) at the tap distances of a x1/2 resize (kernel stretched by 2), by hand:
# W(t) = 1.5t^3 - 2.5t^2 + 1 (t <= 1), -0.5t^3 + 2.5t^2 - 4t + 2 (1 < t <= 2).
C025, C075, C125, C175 = 0.8671875, 0.2265625, -0.0703125, -0.0234375


def test_cubic_kernel_values():
    x = torch.tensor([0.0, 0.25, -0.75, 1.0, 1.25, -1.75, 2.0, 2.5], dtype=torch.float64)
    want = torch.tensor([1.0, C025, C075, 0.0, C125, C175, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(cubic_kernel(x), want, rtol=0, atol=1e-15)


def test_four_to_two_pixels_by_hand_with_mirrored_borders():
    # Output pixel 1 sits at input coordinate 1.5 (1-based), taps at input -2..5, mirrored
    # (-2 -> 3, -1 -> 2, 0 -> 1, 5 -> 4), weights W(d/2)/2 at distances d = 3.5, 2.5, ..., -3.5.
    x1, x2, x3, x4 = 0.1, 0.7, 0.3, 0.9
    out1 = 0.5 * (C175 * x3 + C125 * x2 + C075 * x1 + C025 * x1 + C025 * x2 + C075 * x3 + C125 * x4 + C175 * x4)
    out2 = 0.5 * (C175 * x1 + C125 * x1 + C075 * x2 + C025 * x3 + C025 * x4 + C075 * x4 + C125 * x3 + C175 * x2)
    col = torch.tensor([x1, x2, x3, x4], dtype=torch.float64)
    img = col[:, None].expand(4, 2)[None, None]  # constant along W: the W pass leaves it alone
    got = imresize_matlab(img, 2)
    assert got.shape == (1, 1, 2, 1)
    torch.testing.assert_close(got[0, 0, :, 0], torch.tensor([out1, out2], dtype=torch.float64), rtol=0, atol=1e-12)
    # Same along W (the operator is separable and treats both axes alike).
    torch.testing.assert_close(imresize_matlab(img.transpose(-1, -2), 2), got.transpose(-1, -2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_interior_matches_pil_bicubic(scale):
    # PIL's BICUBIC downscale uses the same a = -0.5 kernel stretched by the scale; it only differs at
    # the borders (PIL renormalises the truncated kernel, MATLAB mirrors the image).
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(scale)
    h, w = 12 * scale, 10 * scale
    img = rng.random((h, w)).astype(np.float32)
    pil = np.asarray(Image.fromarray(img, mode="F").resize((w // scale, h // scale), Image.BICUBIC))
    ours = imresize_matlab(torch.from_numpy(img).double()[None, None], scale)[0, 0].numpy()
    m = 2  # output pixels whose kernel reaches past the border: 2 on each side
    np.testing.assert_allclose(ours[m:-m, m:-m], pil[m:-m, m:-m], rtol=0, atol=2e-6)
    assert np.abs(ours - pil).max() > 1e-4  # and the borders do differ (mirroring)


def test_interior_matches_torch_antialiased_bicubic_and_constants_are_kept():
    img = torch.rand(2, 3, 24, 16, dtype=torch.float64)
    ours = imresize_matlab(img, 2)
    ref = F.interpolate(img, size=(12, 8), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(ours[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2], rtol=0, atol=1e-10)
    flat = torch.full((1, 1, 9, 6), 0.37, dtype=torch.float64)
    torch.testing.assert_close(imresize_matlab(flat, 3), torch.full((1, 1, 3, 2), 0.37, dtype=torch.float64))


def test_dtype_device_scale_one_and_gradient():
    img = torch.rand(1, 3, 8, 8, requires_grad=True)
    out = imresize_matlab(img, 2)
    assert out.dtype == torch.float32 and out.shape == (1, 3, 4, 4)
    out.sum().backward()
    assert torch.allclose(img.grad.sum(), torch.tensor(16.0 * 3), atol=1e-4)  # weights sum to 1 per output
    assert torch.equal(imresize_matlab(img, 1), img)


def test_degradation_is_clamped_and_on_8bit_levels():
    lr = bicubic_downsample(torch.rand(2, 3, 16, 16), 2)
    assert lr.min() >= 0 and lr.max() <= 1
    torch.testing.assert_close(lr * 255, (lr * 255).round(), rtol=0, atol=1e-4)


def test_bad_arguments():
    with pytest.raises(TypeError, match="images"):
        imresize_matlab(np.zeros((4, 4)), 2)
    with pytest.raises(TypeError, match="floating"):
        imresize_matlab(torch.zeros(4, 4, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="multiple of scale"):
        imresize_matlab(torch.zeros(1, 1, 5, 4), 2)
    with pytest.raises(ValueError, match="scale"):
        imresize_matlab(torch.zeros(1, 1, 4, 4), 0)
    with pytest.raises(ValueError, match="at least 2"):
        imresize_matlab(torch.zeros(4), 2)
