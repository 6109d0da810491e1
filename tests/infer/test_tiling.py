"""Tiled upscaling (hdnas.infer.tiling): the receptive radius, framed ESA, tile spans, and tiled
equal to untiled with the receptive overlap."""
import numpy as np
import pytest
import torch

from hdnas.infer.tiling import (ALIGN, ESA_RADIUS, TILE_TOLERANCE, Frame, FramedESA, TileError,
                                receptive_radius, tile_overlap, tile_spans, upscale_tensor)
from hdnas.model.cell import ESA, MIN_LR_SIZE
from hdnas.model.genotype import Genotype
from hdnas.model.network import DerivedNet

torch.set_num_threads(2)

G2 = Genotype([["conv_1x1", "conv_3x3", "dil_conv_3x3"]], [], channels=8, num_cells=2, name="g2")
G3 = Genotype([["sep_conv_3x3", "conv_1x1", "dil_conv_5x5"]], [[1, 0]], channels=8, num_cells=3)


def net(g=G2, seed=0):
    torch.manual_seed(seed)
    m = DerivedNet(g).eval()
    with torch.no_grad():  # larger than init weights, so that distant pixels matter
        for p in m.parameters():
            p.mul_(1.5)
    return m


def test_receptive_radius_counts_the_longest_path():
    # head 1; cell: ops (0 + 1 + 2) + c4 1 + ESA 41 = 45; 2 cells; LR_conv 1, upsampler 1
    assert receptive_radius(G2) == 1 + 2 * 45 + 2
    # cell 3 reads cells 2 and 1: ops 2 + 0 + 4, so 48 per cell, three in a row
    assert receptive_radius(G3) == 1 + 3 * 48 + 2


def test_esa_radius_bounds_the_index_arithmetic():
    """For every LR size, the rows ESA's attention at row g reads (framed bilinear source rows,
    three 3x3 convs on the pooled map, max-pool 7/3, conv 3/2) lie within ESA_RADIUS of g."""
    worst = 0
    for H in range(MIN_LR_SIZE, 3000):
        P = ((H - 3) // 2 + 1 - 7) // 3 + 1
        g = np.arange(H, dtype=np.float32)
        src = np.maximum(np.float32(P) / np.float32(H) * (g + np.float32(0.5)) - np.float32(0.5), 0)
        i0 = np.floor(src).astype(int)
        i1 = np.where(i0 < P - 1, i0 + 1, i0)
        lo = 6 * np.maximum(i0 - 3, 0)
        hi = np.minimum(6 * np.minimum(i1 + 3, P - 1) + 14, H - 1)
        worst = max(worst, int((g - lo).max()), int((hi - g).max()))
    assert 38 <= worst <= ESA_RADIUS


def test_framed_esa_with_the_whole_frame_is_esa():
    torch.manual_seed(1)
    esa = ESA(8)
    x = torch.randn(2, 8, 37, 50)
    with torch.no_grad():
        ref = esa(x)
        got = FramedESA(esa, Frame(0, 0, 37, 50))(x)
    assert (got - ref).abs().max() < 1e-5


@pytest.mark.parametrize("n,tile,overlap", [(263, 240, 93), (100, 40, 8), (500, 64, 0), (37, 20, 0),
                                            (30, 100, 5)])
def test_tile_spans_cover_with_context(n, tile, overlap):
    spans = tile_spans(n, tile, overlap)
    assert spans[0][2] == 0 and spans[-1][3] == n
    for (s, e, c0, c1), nxt in zip(spans, spans[1:] + [None]):
        assert s % ALIGN == 0 and s <= c0 < c1 <= e <= n
        assert e - s <= tile or len(spans) == 1
        assert e - s >= min(n, MIN_LR_SIZE)
        assert c0 - s >= min(overlap, c0) and e - c1 >= min(overlap, n - c1)
        if nxt is not None:
            assert nxt[2] == c1


def test_tile_too_small_for_its_overlap():
    with pytest.raises(TileError, match=r"--tile 100 leaves no room for --tile-overlap 93.*197"):
        tile_spans(300, 100, 93)
    with pytest.raises(TileError, match="smaller than the network's smallest input"):
        tile_spans(300, 19, 0)


@pytest.mark.parametrize("shape", [(40, 400), (400, 40)], ids=["wide", "tall"])
def test_tiled_equals_untiled_with_the_receptive_overlap(shape):
    """Tiles along one axis at a time (a tile must be > 2 R wide, so 2-D tiling of an image
    that shows it is slow); the spans are the same function on both axes."""
    m = net()
    R = receptive_radius(G2)
    torch.manual_seed(2)
    x = torch.rand(1, 3, *shape) * 255
    with torch.no_grad():
        ref = m(x)
    tile = 2 * R + 11 + 48
    tiled = upscale_tensor(m, x, tile=tile)  # the overlap defaults to R
    assert len(tile_spans(max(shape), tile, R)) >= 5
    assert (tiled - ref).abs().max() <= TILE_TOLERANCE
    # the check can fail: a small overlap changes the result by much more than the tolerance
    loose = upscale_tensor(m, x, tile=64, overlap=4)
    assert (loose - ref).abs().max() > 20 * TILE_TOLERANCE


def test_too_small_image_is_refused():
    with pytest.raises(ValueError, match="too small"):
        upscale_tensor(net(), torch.rand(1, 3, 14, 40) * 255)


def test_tile_overlap_defaults_to_the_radius_and_warns_below_it():
    R = receptive_radius(G2)
    assert tile_overlap(G2, 0, None) == R
    assert tile_overlap(G2, 2 * R + 11, None) == R
    with pytest.warns(UserWarning, match=f"below the receptive radius \\({R} LR"):
        assert tile_overlap(G2, 64, 4) == 4
    with pytest.raises(TileError, match="must be >= 0"):
        tile_overlap(G2, -1, None)
    with pytest.raises(TileError, match="leaves no room for --tile-overlap"):
        tile_overlap(G2, 100, None)
