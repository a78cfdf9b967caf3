"""spark_ext.metrics: BasicSR-convention PSNR / SSIM, cross-checked against torchmetrics and scikit-image."""

import math

import pytest
import torch

from spark_ext.metrics import crop_border, gaussian_window, psnr, restoration_metrics, rgb_to_y, ssim, to_uint8_levels


def _photo_like(n=2, c=3, h=40, w=36, seed=0):
    """Smooth structure plus noise on the 0..255 scale (SSIM of pure noise says little)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 6, h), torch.linspace(0, 5, w), indexing="ij")
    base = 127 + 90 * torch.sin(yy + xx)[None, None] * torch.linspace(0.5, 1, c)[None, :, None, None]
    return (base.expand(n, c, h, w) + 20 * torch.randn(n, c, h, w, generator=g)).clamp(0, 255).round().double()


def test_psnr_by_hand():
    a = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    b = a.clone()
    b[0, 0, 0, 0] = 16.0  # MSE 16 -> PSNR 10 log10(255^2 / 16)
    b[1] += 1.0  # MSE 1
    want = torch.tensor([10 * math.log10(255**2 / 16), 20 * math.log10(255)], dtype=torch.float64)
    torch.testing.assert_close(psnr(b, a), want)
    assert psnr(a, a).isinf().all()


def test_y_channel_bt601():
    rgb = torch.tensor([[0.0, 0.0, 0.0], [255.0, 255.0, 255.0], [255.0, 0.0, 0.0]], dtype=torch.float64)
    y = rgb_to_y(rgb.t().reshape(1, 3, 3, 1)).flatten()
    torch.testing.assert_close(y, torch.tensor([16.0, 235.0, 16.0 + 65.481], dtype=torch.float64))


def test_uint8_levels_round_and_clamp():
    x = torch.tensor([-0.1, 0.0, 0.5 / 255, 0.49, 1.2]).view(1, 1, 1, 5)
    torch.testing.assert_close(
        to_uint8_levels(x).flatten(), torch.tensor([0.0, 0.0, 1.0, 125.0, 255.0], dtype=torch.float64)
    )
    u8 = torch.tensor([0, 7, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    assert to_uint8_levels(u8).dtype == torch.float64 and to_uint8_levels(u8).flatten().tolist() == [0.0, 7.0, 255.0]


def test_gaussian_window():
    win = gaussian_window()
    assert win.shape == (11, 11) and abs(float(win.sum()) - 1) < 1e-12
    g = torch.exp(-torch.tensor([25.0, 0.0], dtype=torch.float64) / (2 * 1.5**2))
    assert abs(float(win[0, 5] / win[5, 5]) - float(g[0] / g[1])) < 1e-12  # sigma 1.5


def test_ssim_identity_and_range():
    x = _photo_like()
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    y = _photo_like(seed=1)
    s = ssim(x, y)
    assert ((s > 0) & (s < 1)).all()


def test_ssim_and_psnr_match_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.image")
    x, y = _photo_like(seed=2), _photo_like(seed=3)
    # torchmetrics (1.x) reflect-pads by 5 and averages the whole map; BasicSR (and we) average only the
    # windows that fit inside the image: that is torchmetrics' map without its 5-pixel frame.
    _, full_map = tm.structural_similarity_index_measure(
        x,
        y,
        gaussian_kernel=True,
        sigma=1.5,
        kernel_size=11,
        data_range=255.0,
        reduction="none",
        return_full_image=True,
    )
    assert full_map.shape == x.shape
    want = full_map[..., 5:-5, 5:-5].double().flatten(2).mean(2).mean(1)
    torch.testing.assert_close(ssim(x, y), want, rtol=0, atol=1e-6)
    want_psnr = tm.peak_signal_noise_ratio(x, y, data_range=255.0, reduction="none", dim=(1, 2, 3))
    torch.testing.assert_close(psnr(x, y), want_psnr.double(), rtol=0, atol=1e-5)  # it sums in float32


def test_ssim_matches_scikit_image_gaussian_ssim():
    metrics = pytest.importorskip("skimage.metrics")
    x, y = _photo_like(n=1, seed=4), _photo_like(n=1, seed=5)
    want = metrics.structural_similarity(
        x[0].permute(1, 2, 0).numpy(),
        y[0].permute(1, 2, 0).numpy(),
        data_range=255.0,
        channel_axis=2,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert abs(float(ssim(x, y)[0]) - want) < 1e-6


def test_restoration_metrics_sr_uses_y_and_crops_the_scale_border():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(1, 3, 32, 32, generator=g)
    out = target.clone()
    out[..., :3, :] = 1 - out[..., :3, :]  # damage only inside a 3-pixel border
    sr3 = restoration_metrics(out, target, "sr", 3)
    assert sr3["psnr"].isinf().all() and float(sr3["ssim"][0]) == pytest.approx(1.0)
    assert restoration_metrics(out, target, "sr", 2)["psnr"].isfinite().all()
    assert restoration_metrics(out, target, "denoise")["psnr"].isfinite().all()
    # Same as doing the steps by hand.
    noisy = (target + 0.05 * torch.randn(1, 3, 32, 32, generator=g)).clamp(0, 1)
    a, b = to_uint8_levels(noisy), to_uint8_levels(target)
    want = psnr(crop_border(rgb_to_y(a), 2), crop_border(rgb_to_y(b), 2))
    torch.testing.assert_close(restoration_metrics(noisy, target, "sr", 2)["psnr"], want)
    den = restoration_metrics(noisy, target, "denoise")
    torch.testing.assert_close(den["psnr"], psnr(a, b))
    torch.testing.assert_close(den["ssim"], ssim(a, b))


def test_bad_arguments():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(TypeError, match="output"):
        psnr(x.numpy(), x)
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, x[..., :8])
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        ssim(x[0], x[0])
    with pytest.raises(ValueError, match="at least 11"):
        ssim(x[..., :8, :8], x[..., :8, :8])
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, x, data_range=0)
    with pytest.raises(ValueError, match="task"):
        restoration_metrics(x, x, "deblur")
    with pytest.raises(ValueError, match="scale is required"):
        restoration_metrics(x, x, "sr")
    with pytest.raises(ValueError, match="border"):
        restoration_metrics(x, x, "sr", 8)
    with pytest.raises(ValueError, match="RGB"):
        restoration_metrics(x[:, :1], x[:, :1], "denoise")
    with pytest.raises(TypeError, match="floating"):
        to_uint8_levels(torch.zeros(1, 3, 4, 4, dtype=torch.int32))
