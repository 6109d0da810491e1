"""HFEN (hdnas.nas.losses) against an independent computation and closed forms, and its gradient
where the max-normalisation has a zero or negative max.

The reference is built from scipy.signal.correlate2d and numpy, plane by plane, from the
definition (the release's HFEN): a 5x5 Gaussian (sigma 1.5, normalised to sum 1) correlated
with each colour channel without padding ('valid'), the 3x3 Laplacian [[0,1,0],[1,-4,1],[0,1,0]]
correlated with each blurred channel with zero padding 1 and summed over the channels, the
response divided by its max over the batch (unless that max is 0), and the mean absolute
difference of the two responses.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hdnas.nas.losses import SRLoss, _log_response, hfen

signal = pytest.importorskip("scipy.signal")


def _gaussian_5x5(sigma=1.5):
    u = np.arange(5) - 2.0
    g = np.exp(-(u[:, None] ** 2 + u[None, :] ** 2) / (2 * sigma ** 2))
    return g / g.sum()


LAPLACIAN = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def log_reference(img: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N, 1, H-4, W-4) max-normalised LoG response, with scipy."""
    g = _gaussian_5x5()
    out = []
    for planes in img:
        lap = sum(signal.correlate2d(signal.correlate2d(p, g, mode="valid"), LAPLACIAN,
                                     mode="same", boundary="fill", fillvalue=0.0) for p in planes)
        out.append(lap[None])
    r = np.stack(out)
    m = r.max()
    return r / m if m != 0 else r


def hfen_reference(sr: np.ndarray, hr: np.ndarray) -> float:
    return float(np.abs(log_reference(sr) - log_reference(hr)).mean())


def _random(shape, seed):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 255


@pytest.mark.parametrize("shape", [(2, 3, 20, 17), (1, 1, 9, 12), (3, 2, 5, 5)])
def test_hfen_matches_scipy_reference(shape):
    sr, hr = _random(shape, 0), _random(shape, 1)
    np.testing.assert_allclose(_log_response(sr).numpy(), log_reference(sr.numpy()),
                               rtol=1e-12, atol=1e-12)
    ref = hfen_reference(sr.numpy(), hr.numpy())
    assert ref > 0.01  # random images: far from zero, so the relative check below means something
    assert float(hfen(sr, hr)) == pytest.approx(ref, rel=1e-12)
    assert float(hfen(hr, hr)) == 0.0
    loss = SRLoss(0.2)(sr, hr)
    assert float(loss) == pytest.approx(float((sr - hr).abs().mean()) + 0.2 * ref, rel=1e-12)


def _grid(h, w):
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                          indexing="ij")
    return y, x


def test_linear_ramp_has_zero_interior_response():
    """The discrete Laplacian of a linear ramp is 0, and the Gaussian (symmetric, sum 1) keeps
    a ramp a ramp: the response is 0 away from the zero-padded border. The ramps are negative,
    so the border response (minus the missing neighbour) is positive and sets the max; with a
    positive ramp the max would be the interior's round-off, which normalises to about 1."""
    y, x = _grid(16, 19)
    img = -torch.stack([3 * x + 2 * y + 10, -x + 5 * y + 200, 0.5 * x + 40]).unsqueeze(0)
    r = _log_response(img)
    assert r.shape == (1, 1, 12, 15)
    torch.testing.assert_close(r[..., 1:-1, 1:-1], torch.zeros(1, 1, 10, 13, dtype=torch.float64), rtol=0, atol=1e-12)
    assert r[..., 0, :].abs().min() > 0.01 and r[..., :, -1].abs().min() > 0.01


def test_paraboloid_has_constant_negative_response():
    """Channel c = K_c - a_c (x^2 + y^2): blurring adds a constant, the discrete Laplacian of
    x^2 + y^2 is 4, so the interior response is -4 * sum(a_c) < 0 everywhere; the border (a
    missing, zero-padded neighbour of a large positive value) is more negative. The max is thus
    the interior value, and the normalised interior is exactly 1, the border above 1."""
    y, x = _grid(14, 13)
    q = (x - 6) ** 2 + (y - 7) ** 2
    a = (0.5, 1.0, 2.0)
    img = torch.stack([1000 - ac * q for ac in a]).unsqueeze(0)
    r = _log_response(img)
    torch.testing.assert_close(r[..., 1:-1, 1:-1], torch.ones(1, 1, 8, 7, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    border = torch.cat([r[0, 0, 0], r[0, 0, -1], r[0, 0, :, 0], r[0, 0, :, -1]])
    assert border.min() > 1.1
    np.testing.assert_allclose(r.numpy(), log_reference(img.numpy()), rtol=1e-12)


def _finite_grad(sr, hr):
    sr = sr.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(hfen(sr, hr), sr)
    assert torch.isfinite(g).all(), f"{int((~torch.isfinite(g)).sum())} non-finite gradient values"
    return g


@pytest.mark.parametrize("value", [0.0, 100.0])
def test_gradient_finite_where_max_is_zero(value):
    """A constant image's response is 0 inside and <= 0 on the zero-padded border: its max is 0,
    the response stays unnormalised, and the gradient is finite (the old r / m gave NaN)."""
    sr = torch.full((2, 3, 12, 11), value, dtype=torch.float64)
    hr = _random((2, 3, 12, 11), 2)
    assert float(_log_response(sr).max()) == 0.0
    assert float(hfen(sr, hr)) == pytest.approx(hfen_reference(sr.numpy(), hr.numpy()), rel=1e-12)
    g = _finite_grad(sr, hr)
    assert g.abs().sum() > 0


def test_gradient_finite_where_max_is_negative():
    y, x = _grid(12, 12)
    sr = (900 - ((x - 5) ** 2 + (y - 6) ** 2)).expand(1, 3, 12, 12)
    hr = _random((1, 3, 12, 12), 3)
    # raw max -4*3 < 0 (interior): normalised, the interior is 1 and the border above 1
    assert float(_log_response(sr).min()) == pytest.approx(1.0, rel=1e-12)
    assert float(hfen(sr, hr)) == pytest.approx(hfen_reference(sr.numpy(), hr.numpy()), rel=1e-12)
    assert _finite_grad(sr, hr).abs().sum() > 0


def test_gradcheck_random():
    sr = _random((1, 2, 9, 8), 4).requires_grad_(True)
    hr = _random((1, 2, 9, 8), 5)
    torch.autograd.gradcheck(lambda s: hfen(s, hr), (sr,))
