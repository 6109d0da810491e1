"""The merged dense conv by FFT (hdnas.mixed.dense) against its twin ``conv_same`` (F.conv2d),
forward and backward; the native backend with the FFT route forced against the fp64 reference
(the fuzz harness, norm-wise bound); the route switch and the timed choice."""
from __future__ import annotations

import functools

import pytest
import torch

from hdnas.mixed import dense, get_backend
from hdnas.mixed.dense import conv_same, conv_same_fft
from hdnas.testing import fuzz

U32 = 2.0 ** -24
TOL = 64  # the fuzz harness's bound, in u times the largest magnitude of the tensor

SHAPES = [  # N, I, O, H, W, K
    (3, 5, 7, 9, 13, 7), (2, 4, 4, 1, 1, 5), (1, 3, 2, 6, 4, 3), (2, 6, 6, 3, 17, 7),
    (4, 8, 8, 32, 32, 7), (2, 3, 5, 11, 2, 5), (1, 1, 1, 1, 1, 1), (2, 6, 3, 8, 8, 9)]


def _run(fn, x, w, g):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = fn(x, w)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    return y.detach(), gx, gw


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_fft_equals_direct_in_fp64(shape):
    N, I, O, H, W, K = shape
    torch.manual_seed(sum(shape))
    x, w = torch.randn(N, I, H, W, dtype=torch.float64), torch.randn(O, I, K, K, dtype=torch.float64)
    g = torch.randn(N, O, H, W, dtype=torch.float64)
    for got, want in zip(_run(conv_same_fft, x, w, g), _run(conv_same, x, w, g)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())


def test_fft_gradient_of_one_input_alone():
    """Only x needs a gradient (a frozen weight), or only w (a first layer's input)."""
    torch.manual_seed(5)
    x, w = torch.randn(3, 4, 9, 7, dtype=torch.float64), torch.randn(5, 4, 5, 5, dtype=torch.float64)
    g = torch.randn(3, 5, 9, 7, dtype=torch.float64)
    for which in (0, 1):
        ins = [x.clone().requires_grad_(which == 0), w.clone().requires_grad_(which == 1)]
        got = torch.autograd.grad(conv_same_fft(*ins), ins[which], g)[0]
        want = torch.autograd.grad(conv_same(*ins), ins[which], g)[0]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _normwise_ulps(got, x, w, g):
    """Largest |error| of each fp32 result (y, dx, dw) against the fp64 twin, in units of u times
    the largest magnitude (the twin on |x|, |w|, |g|) of that tensor."""
    truth = _run(conv_same, x.double(), w.double(), g.double())
    mag = _run(conv_same, x.double().abs(), w.double().abs(), g.double().abs())
    return [((a.double() - t).abs().max() / (U32 * m.max())).item()
            for a, t, m in zip(got, truth, mag)]


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_fft_fp32_within_the_normwise_bound(shape):
    N, I, O, H, W, K = shape
    torch.manual_seed(1 + sum(shape))
    x, w, g = torch.randn(N, I, H, W), torch.randn(O, I, K, K), torch.randn(N, O, H, W)
    ulps = _normwise_ulps(_run(conv_same_fft, x, w, g), x, w, g)
    assert max(ulps) <= TOL, ulps


def test_the_normwise_bound_catches_an_error():
    """A result off by one part in 10^4 of the output's scale (a wrong tap, say) fails it."""
    torch.manual_seed(0)
    x, w, g = torch.randn(4, 8, 16, 16), torch.randn(8, 8, 7, 7), torch.randn(4, 8, 16, 16)
    y, gx, gw = _run(conv_same_fft, x, w, g)
    y = y.clone()
    y[0, 0, 5, 5] += 1e-4 * y.abs().max()
    assert _normwise_ulps((y, gx, gw), x, w, g)[0] > TOL
    w2 = w.clone()
    w2[0, 0, 0, 0] += 1e-2  # one tap of 2,401 changed: y and dx move, dw does not
    assert min(_normwise_ulps(_run(conv_same_fft, x, w2, g), x, w, g)[:2]) > TOL


def test_fft_rejects_bad_shapes_and_dtypes():
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="does not fit"):
        conv_same_fft(x, torch.randn(2, 3, 3, 3))
    with pytest.raises(ValueError, match="K odd"):
        conv_same_fft(x, torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="fp32/fp64"):
        conv_same_fft(x.half(), torch.randn(2, 4, 3, 3).half())


def test_fft_size_is_even_5_smooth_and_enough():
    for n in range(1, 300):
        L = dense.fft_size(n)
        assert L >= n and L % 2 == 0
        m = L
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        assert m == 1
        assert all(dense.fft_size(k) != k for k in range(n, L))  # the smallest one


def test_fft_gradcheck():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(conv_same_fft, (x, w))


# -- the route switch and the timed choice ----------------------------------------------------

@pytest.fixture
def fake_timer(monkeypatch):
    """dense._time replaced: each route's time from ``times``, calls counted."""
    calls, times = [], {"conv_same": 2.0, "conv_same_fft": 1.0}

    def fake(fn, x, w, backward, reps=2):
        calls.append((fn.__name__, tuple(x.shape), backward))
        return times[fn.__name__]
    monkeypatch.setattr(dense, "_time", fake)
    monkeypatch.setattr(dense, "_choices", {})
    return calls, times


def _spy(monkeypatch):
    used = []
    for name in ("conv_same", "conv_same_fft"):
        real = getattr(dense, name)

        @functools.wraps(real)
        def spy(x, w, _r=real, _n=name):
            used.append(_n)
            return _r(x, w)
        monkeypatch.setattr(dense, name, spy)
    return used


def test_auto_times_each_shape_once_and_takes_the_faster(monkeypatch, fake_timer):
    calls, times = fake_timer
    monkeypatch.setenv("HDNAS_DENSE_CONV", "auto")
    x, w = torch.randn(4, 6, 8, 8, requires_grad=True), torch.randn(6, 6, 7, 7)
    ref = conv_same(x, w)
    used = _spy(monkeypatch)
    for _ in range(3):
        torch.testing.assert_close(dense.dense_conv(x, w), ref, rtol=1e-5, atol=1e-5)
    assert [c[0] for c in calls] == ["conv_same", "conv_same_fft"]  # timed once
    assert calls[0][2] is True  # autograd on: timed with the backward
    assert used == ["conv_same_fft"] * 3
    assert list(dense.choices().values()) == ["fft"]
    # the same shape without autograd is another decision; here the direct conv is faster
    times["conv_same_fft"] = 3.0
    with torch.no_grad():
        dense.dense_conv(x, w)
    assert calls[-1] == ("conv_same_fft", (4, 6, 8, 8), False) and used[-1] == "conv_same"
    assert sorted(dense.choices().values()) == ["direct", "fft"]


@pytest.mark.parametrize("case", ["k3", "batch1", "fp16", "bf16"])
def test_auto_never_times_where_fft_is_not_eligible(monkeypatch, fake_timer, case):
    calls, _ = fake_timer
    monkeypatch.setenv("HDNAS_DENSE_CONV", "auto")
    N, K, dt = {"k3": (4, 3, torch.float32), "batch1": (1, 7, torch.float32),
                "fp16": (4, 7, torch.float16), "bf16": (4, 7, torch.bfloat16)}[case]
    x, w = torch.randn(N, 4, 6, 6).to(dt), torch.randn(4, 4, K, K).to(dt)
    used = _spy(monkeypatch)
    dense.dense_conv(x, w)
    assert calls == [] and used == ["conv_same"]


def test_forced_routes(monkeypatch, fake_timer):
    calls, _ = fake_timer
    x, w = torch.randn(1, 4, 6, 6), torch.randn(4, 4, 3, 3)  # not eligible for auto
    used = _spy(monkeypatch)
    monkeypatch.setenv("HDNAS_DENSE_CONV", "fft")
    dense.dense_conv(x, w)
    dense.dense_conv(x.half(), w.half())  # fp16 has no FFT route: direct
    monkeypatch.setenv("HDNAS_DENSE_CONV", "direct")
    dense.dense_conv(torch.randn(8, 4, 16, 16), torch.randn(4, 4, 7, 7))
    assert used == ["conv_same_fft", "conv_same", "conv_same"] and calls == []
    monkeypatch.setenv("HDNAS_DENSE_CONV", "fast")
    with pytest.raises(ValueError, match="HDNAS_DENSE_CONV='fast'.*auto, direct, fft"):
        dense.dense_conv(x, w)


def test_real_timing_decides_for_a_search_shape(monkeypatch):
    """Unfaked: ``auto`` measures both routes once and records a choice."""
    monkeypatch.setenv("HDNAS_DENSE_CONV", "auto")
    monkeypatch.setattr(dense, "_choices", {})
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    w = torch.randn(8, 8, 7, 7, requires_grad=True)
    y = dense.dense_conv(x, w)
    torch.testing.assert_close(y, conv_same(x, w), rtol=1e-4, atol=1e-4)
    assert list(dense.choices().values())[0] in ("fft", "direct")


# -- the native backend with the FFT route, against the fp64 reference ------------------------

FUZZ_CASES = 30


@pytest.mark.parametrize("index", range(FUZZ_CASES))
def test_native_with_fft_route_against_the_reference(nat, monkeypatch, index):
    """Random op sets, shapes, dtypes, layouts, weightings, distillation steps and gradient
    targets (hdnas.testing.fuzz), every output and gradient within TOL u of its tensor's largest
    magnitude. The elementwise bound of test_fuzz.py does not hold for this route: outputs whose
    own terms are tiny (taps that never touch a 1-pixel image, say) get the FFT's round-off of
    the tensor's scale, e.g. 1e-20 instead of an exact 0."""
    monkeypatch.setenv("HDNAS_DENSE_CONV", "fft")
    r = fuzz.run_case(fuzz.DEFAULT_SEED, index, "native", "cpu", bound="normwise")
    if r.status == "skipped":
        pytest.skip(r.detail)
    assert r.ok, r.report()


def test_native_supernet_with_fft_route_matches_the_reference(nat, monkeypatch):
    """A whole supernet (all 9 candidates, 6 cells, beta), fp64: loss and every gradient."""
    from hdnas.model.network import SuperNet

    monkeypatch.setenv("HDNAS_DENSE_CONV", "fft")
    torch.manual_seed(0)
    ref = SuperNet(C=8, backend=get_backend("reference")).double()
    fast = SuperNet(C=8, backend=get_backend("native")).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.rand(2, 3, 16, 15, dtype=torch.float64)
    outs = []
    for net in (ref, fast):
        y = net(x)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()
        grads = torch.autograd.grad(loss, list(net.parameters()))
        outs.append((loss.detach(), grads))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-10, atol=1e-10)
    for (name, _), a, b in zip(ref.named_parameters(), outs[0][1], outs[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10, msg=name)


def test_search_command_takes_the_timed_route(nat, tmp_path, monkeypatch):
    """``python -m hdnas.search --backend native`` with the default route: the dense conv's
    route is decided by timing and the run completes with finite losses."""
    import csv
    import math

    from hdnas.search import main as search_main

    monkeypatch.setenv("HDNAS_DENSE_CONV", "auto")
    monkeypatch.setenv("HDNAS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(dense, "_choices", {})
    args = ["--channels", "8", "--cells", "3", "--batch", "4", "--patch", "32", "--steps", "2",
            "--warmup", "0", "--ops", "conv_1x1", "conv_7x7", "sep_conv_3x3", "--log-every", "1",
            "--val-every", "0", "--quiet", "--threads", "1", "--backend", "native",
            "--out", str(tmp_path / "run")]
    assert search_main(args) == 0
    decided = dense.choices()
    assert decided and set(decided.values()) <= {"fft", "direct"}
    assert all(k[1][-1] == 7 and k[3] for k in decided)  # the 7x7 merged kernel, with backward
    with (tmp_path / "run" / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(math.isfinite(float(r["loss_train"])) for r in rows)
