"""The plan of a mixed op: its candidates' indices by family and the stencils of the two
depthwise stages, read from op specs (anything with ``family``, ``kernel`` and ``dilation``:
the DLSR search space's ``OpSpec`` or a DARTS candidate's spec). One class for every fused
composition (``hdnas.mixed.merged`` for DLSR cells, ``hdnas.darts.mixed`` for DARTS edges), so
their launches, and the AOT compile matrix built from them, cannot drift apart."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from hdnas.model.space import get_op

#: The families a DLSR cell's merged composition computes (``OpSpec.family``).
DLSR_FAMILIES = ("conv", "sep", "dil", "skip")


class Plan:
    """The candidates of a mixed op by family (index lists in candidate order) and the stencils:
    stage 1 is the first depthwise conv of every sep candidate, then of every dil candidate
    (``st1_ksizes``/``st1_dils``, slot ``st1_kmax``); stage 2 the second depthwise conv of the
    sep candidates (``st2_ksizes``, ``st2_kmax``). ``unknown``: names whose family is not in
    ``families``, the ones the consuming composition computes."""

    def __init__(self, op_names, specs, families=DLSR_FAMILIES):
        self.op_names = tuple(op_names)
        self.specs = list(specs)
        fam = [s.family for s in self.specs]
        by = lambda f: [i for i, x in enumerate(fam) if x == f]  # noqa: E731
        self.conv, self.sep, self.dil, self.skip = by("conv"), by("sep"), by("dil"), by("skip")
        self.max_pool, self.avg_pool, self.none = by("max_pool"), by("avg_pool"), by("none")
        self.unknown = [n for n, f in zip(self.op_names, fam) if f not in families]
        # every max below takes its empty-case value as one more item, not ``default=``:
        # Dynamo cannot trace that keyword, and merged.py builds plans inside a compiled
        # forward (torch.compile around the supernet: tests/engine/test_compile.py)
        self.conv_k = max([self.specs[i].kernel for i in self.conv] + [0])
        self.st1 = self.sep + self.dil
        self.st1_ksizes = tuple(self.specs[i].kernel for i in self.st1)
        self.st1_dils = tuple(self.specs[i].dilation for i in self.st1)
        self.st1_kmax = max(self.st1_ksizes + (0,))
        self.st2_ksizes = tuple(self.specs[i].kernel for i in self.sep)
        self.st2_kmax = max(self.st2_ksizes + (0,))

    def stage1_extent(self) -> tuple[int, int, int]:
        """(groups G, taps per group T, radius) of stage 1: what a depthwise kernel must serve."""
        G = max(len(self.st1), 1)
        T = max([k * k for k in self.st1_ksizes] + [1])
        radius = max([d * (k // 2) for k, d in zip(self.st1_ksizes, self.st1_dils)] + [0])
        return G, T, radius


@functools.lru_cache(maxsize=None)
def plan_of(op_names) -> Plan:
    """The plan of a DLSR op set (names of ``hdnas.model.space``)."""
    names = tuple(op_names)
    return Plan(names, [get_op(n) for n in names])


def pad_to(k: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last two dims of a centred odd kernel to ``size`` x ``size``."""
    p = (size - k.shape[-1]) // 2
    return F.pad(k, (p, p, p, p)) if p else k
