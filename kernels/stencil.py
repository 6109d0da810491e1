"""Tap tables and stencils of depthwise kernels (pure Python and torch; no Triton): the one place
that lays the k x k (dilated) taps of each kernel group out, for the native kernels' gather
tables (``grouped_table``, ``union_table``) and for the Triton kernels' tap flags and union
kernels (``square_taps``, ``union_layout``)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import lru_cache

import torch


def group_taps(k: int, d: int):
    """The taps of a centred k x k kernel with dilation d: (i, j, dy, dx) per tap, row-major."""
    r = k // 2
    for i in range(k):
        for j in range(k):
            yield i, j, (i - r) * d, (j - r) * d


@dataclass(frozen=True)
class Table:
    """A tap table as Python data: the 0/1 gather ``[G, KMAX*KMAX, T]`` (its shape and the
    indices of its ones), the tap offsets, the taps per group and the radius. ``key`` is the
    value it is built from, so caches keyed by it never confuse two tables (an ``id()`` can be
    reused once a table is dropped). No tensor is made here, so a first call under
    FakeTensorMode caches nothing fake."""

    key: tuple  # (kind, ksizes, dilations, kmax)
    shape: tuple
    nz: tuple  # (g, k, t) of each one
    offs: tuple  # (dy, dx) per tap, flattened
    ntaps: tuple
    radius: int


@functools.lru_cache(maxsize=256)
def grouped_table(ksizes: tuple, dilations: tuple, kmax: int) -> Table:
    """Each group's k x k (dilated) taps, padded to T = max k*k taps per group."""
    G = len(ksizes)
    T = max(k * k for k in ksizes)
    nz, offs, ntaps, radius = [], [], [], 0
    for g, (k, d) in enumerate(zip(ksizes, dilations)):
        o = (kmax - k) // 2
        for t, (i, j, dy, dx) in enumerate(group_taps(k, d)):
            nz.append((g, (o + i) * kmax + o + j, t))
            offs += [dy, dx]
        offs += [0, 0] * (T - k * k)
        ntaps.append(k * k)
        radius = max(radius, (k // 2) * d)
    return Table(("grouped", ksizes, dilations, kmax), (G, kmax * kmax, T), tuple(nz),
                 tuple(offs), tuple(ntaps), radius)


@functools.lru_cache(maxsize=256)
def union_table(ksizes: tuple, dilations: tuple, kmax: int) -> Table:
    """The union stencil of all groups: one group of U distinct taps (in order of first use)."""
    taps: dict = {}
    nz = []
    for g, (k, d) in enumerate(zip(ksizes, dilations)):
        o = (kmax - k) // 2
        for i, j, dy, dx in group_taps(k, d):
            nz.append((g, (o + i) * kmax + o + j, taps.setdefault((dy, dx), len(taps))))
    offs = [v for tap in taps for v in tap]  # dicts keep insertion (= index) order
    radius = max(max(abs(dy), abs(dx)) for dy, dx in taps)
    return Table(("union", ksizes, dilations, kmax), (len(ksizes), kmax * kmax, len(taps)),
                 tuple(nz), tuple(offs), (len(taps),), radius)


def square_taps(ksizes, kmax):
    """Tap flags of centred k x k kernels in kmax x kmax slots, flattened (G*kmax*kmax)."""
    out = []
    for k in ksizes:
        flags = [0] * (kmax * kmax)
        o = (kmax - k) // 2
        for i, j, _, _ in group_taps(k, 1):
            flags[(o + i) * kmax + o + j] = 1
        out += flags
    return out


@lru_cache(maxsize=128)
def union_layout(ksizes: tuple, dilations: tuple, kmax: int, skip_center: bool):
    """(S, taps, scatter) for merging dilated kernels into one S x S union kernel:
    scatter[g] is a (kmax*kmax, S*S) 0/1 matrix placing group g's taps at their dilated offsets."""
    R = max(d * (k // 2) for k, d in zip(ksizes, dilations))
    S = 2 * R + 1
    scat = torch.zeros(len(ksizes), kmax * kmax, S * S, dtype=torch.float64)
    active = [0] * (S * S)
    for g, (k, d) in enumerate(zip(ksizes, dilations)):
        o = (kmax - k) // 2
        for i, j, dy, dx in group_taps(k, d):
            u = (R + dy) * S + (R + dx)
            scat[g, (o + i) * kmax + o + j, u] = 1.0
            active[u] = 1
    if skip_center:
        active[R * S + R] = 1
    return S, tuple(active), scat
