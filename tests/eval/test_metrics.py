"""Y-channel PSNR/SSIM: unit values, an independent SSIM reference, and the published bicubic
baselines (docs/method.md §7c) reproduced from the shared Set5/Set14."""
import math

import numpy as np
import pytest
import torch
from scipy.signal import correlate2d

from hdnas.eval.metrics import gaussian_window, psnr, quantize, rgb_to_y, ssim
from hdnas.testing.shared import shared_dir




def test_rgb_to_y_matlab_values():
    px = torch.tensor([[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]],
                      dtype=torch.float64).T[:, :, None]  # (3, 5, 1)
    y = rgb_to_y(px)[:, 0]
    torch.testing.assert_close(y, torch.tensor([235.0, 16.0, 16 + 65.481, 16 + 128.553,
                                                16 + 24.966], dtype=torch.float64))


def test_psnr_known_mse_and_quantisation():
    hr = np.zeros((20, 20), np.uint8)
    assert psnr(np.full((20, 20), 1.0), hr) == pytest.approx(10 * math.log10(255 ** 2))
    assert psnr(np.full((20, 20), 0.49), hr) == math.inf  # rounds to 0
    assert psnr(np.full((20, 20), -7.0), hr) == math.inf  # clamps to 0
    sr = hr.copy()
    sr[:2] = 200  # error only inside the shaved border
    assert psnr(sr, hr, shave=2) == math.inf
    assert psnr(sr, hr, shave=1) < 20


def test_numpy_hwc_equals_torch_chw():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    ta, tb = torch.from_numpy(a).permute(2, 0, 1), torch.from_numpy(b).permute(2, 0, 1)
    assert psnr(a, b, 2) == pytest.approx(psnr(ta, tb, 2), abs=1e-12)
    assert ssim(a, b, 2) == pytest.approx(ssim(ta, tb, 2), abs=1e-12)


def _ssim_reference(x, y):
    """Wang's ssim_index.m transcribed with scipy (full 2-D window, 'valid')."""
    w = gaussian_window().numpy()
    f = lambda a: correlate2d(a, w, mode="valid")  # noqa: E731
    C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    return np.mean(((2 * mx * my + C1) * (2 * sxy + C2)) / ((mx ** 2 + my ** 2 + C1) * (sxx + syy + C2)))


def test_ssim_matches_reference_and_bounds():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (48, 37)).astype(np.float64)
    y = np.clip(x + rng.normal(0, 20, x.shape), 0, 255)
    y = np.floor(y + 0.5)
    assert ssim(y, x) == pytest.approx(_ssim_reference(y, x), abs=1e-12)
    assert ssim(x, x) == pytest.approx(1.0)
    assert 0 < ssim(y, x) < 0.99
    w = gaussian_window()
    assert w.shape == (11, 11) and float(w.sum()) == pytest.approx(1.0)
    assert float(w[5, 5] / w[5, 6]) == pytest.approx(math.exp(1 / (2 * 1.5 ** 2)))


def test_shape_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(np.zeros((10, 10)), np.zeros((10, 12)))
    with pytest.raises(ValueError, match="too small"):
        psnr(np.zeros((4, 4)), np.zeros((4, 4)), shave=2)
    with pytest.raises(ValueError, match="11x11"):
        ssim(np.zeros((12, 12)), np.zeros((12, 12)), shave=2)
    assert float(quantize(np.array([254.6, 255.4]))[1]) == 255


# Published bicubic rows (docs/method.md §7c): (PSNR, SSIM)
PUBLISHED = {
    (2, "Set5"): (33.66, 0.9299), (2, "Set14"): (30.24, 0.8688),
    (3, "Set5"): (30.39, 0.8682), (3, "Set14"): (27.55, 0.7742),
    (4, "Set5"): (28.42, 0.8104), (4, "Set14"): (26.00, 0.7027),
}


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_baselines_match_published(scale):
    """x2 within 0.01 dB / 0.0005 SSIM; x3, x4 within 0.03 dB (their SSIM within 0.001)."""
    from hdnas.data.benchmark import BenchmarkSet
    from hdnas.eval.protocol import bicubic_matlab_y

    root = shared_dir() / "data"
    if not (root / "Set5").is_dir() or not (root / "Set14").is_dir():
        pytest.skip(f"shared Set5/Set14 not found under {root}")
    tol_db, tol_ssim = (0.01, 0.0005) if scale == 2 else (0.03, 0.001)
    for name in ("Set5", "Set14"):
        scores = [bicubic_matlab_y(item["hr"], scale)
                  for item in BenchmarkSet(root / name, scale, gray="keep")]
        p, s = np.mean(scores, axis=0)
        pub_p, pub_s = PUBLISHED[(scale, name)]
        print(f"bicubic x{scale} {name}: {p:.4f}/{s:.5f} (published {pub_p}/{pub_s})")
        assert abs(p - pub_p) <= tol_db, (name, p, pub_p)
        assert abs(s - pub_s) <= tol_ssim, (name, s, pub_s)
