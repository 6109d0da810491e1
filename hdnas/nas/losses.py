"""Search and training losses: L1, the release's HFEN term, and a complexity penalty that has a
gradient (the release computes its penalty from ``.data``, so it never reaches alpha), in params,
Multi-Adds or measured latency (``LatencyPenalty``, from an ``hdnas.latency`` table)."""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from hdnas.model.space import get_op
from hdnas.nas.latency import LatencyTableError, check_table, load_table


def _check_weight(name: str, v, positive: bool = False) -> float:
    """``v`` as a float: a finite real number, >= 0 (> 0 if ``positive``); else ValueError."""
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, "
                         f"got {v!r}")
    return float(v)


def _gaussian(size=5, sigma=1.5, device=None, dtype=None):
    ax = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * sigma * sigma))
    return g / g.sum()


_LAPLACE = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


def _log_response(img):
    """The release's LoG: 5x5 Gaussian per channel (no padding), then a 3x3 Laplacian summed over
    the colour channels (its conv weight spans all input channels), divided by its max over the
    batch unless that max is 0. Dividing by 1 in that case (rather than selecting between r / m
    and r) keeps the gradient finite: the unselected r / 0 would make it NaN."""
    C = img.shape[1]
    g = _gaussian(device=img.device, dtype=img.dtype).expand(C, 1, 5, 5)
    blurred = F.conv2d(img, g, groups=C)
    lap = torch.tensor(_LAPLACE, device=img.device, dtype=img.dtype).expand(1, C, 3, 3)
    r = F.conv2d(blurred, lap, padding=1)
    m = r.max()
    return r / torch.where(m != 0, m, torch.ones_like(m))


def hfen(sr, hr):
    """High-frequency error norm as in the release: L1 between max-normalised LoG responses."""
    return F.l1_loss(_log_response(sr), _log_response(hr))


class SRLoss:
    """L1 + ``hfen_weight`` * HFEN (the release uses 0.2; 0 gives plain L1)."""

    def __init__(self, hfen_weight: float = 0.2):
        self.hfen_weight = _check_weight("the HFEN weight (--hfen)", hfen_weight)

    def __call__(self, sr, hr):
        loss = F.l1_loss(sr, hr)
        if self.hfen_weight:
            loss = loss + self.hfen_weight * hfen(sr, hr)
        return loss


class ComplexityPenalty:
    """Expected cost of the searchable ops under softmax(alpha), with a gradient.

    Without a budget it is the release's form, ``weight * sum_rows sum_k w_k p_k / sum_k p_k``.
    With a budget (whole-network params, or Multi-Adds at a 1280x720 output) it is a hinge,
    ``weight * max(0, expected_total / budget - 1)``: free under budget, linear above it. The
    fixed part of the total (everything but the searchable ops) is measured once on a derived
    network, so the budget means what the evaluation table will report.
    """

    def __init__(self, op_names, C: int, weight: float = 1.0, budget: float | None = None,
                 kind: str = "params", fixed_cost: float = 0.0, pixels: float = 1.0):
        if kind not in ("params", "macs"):
            raise ValueError(f"penalty kind must be 'params' or 'macs', got {kind!r}")
        if budget is not None:
            budget = _check_weight("budget (--budget)", budget, positive=True)
        self.per_op = torch.tensor([float(get_op(n).params(C)) for n in op_names])
        self.weight, self.budget, self.kind = _check_weight("penalty", weight), budget, kind
        self.fixed_cost, self.pixels = fixed_cost, pixels

    def expected_op_cost(self, alphas, num_cells: int):
        """Expected params of all searchable ops (Multi-Adds per LR pixel are the same number)."""
        w = F.softmax(alphas, dim=-1)
        cost = (w * self.per_op.to(w)).sum()
        return cost * num_cells if w.dim() == 2 else cost

    def expected_total(self, alphas, num_cells: int):
        return self.fixed_cost + self.expected_op_cost(alphas, num_cells) * self.pixels

    def __call__(self, alphas, num_cells: int):
        if not self.weight:
            return alphas.new_zeros(())
        if self.budget is None:
            w = F.softmax(alphas, dim=-1)
            per_op = self.per_op.to(w)
            value = (w * per_op).sum() / per_op.sum()
            if w.dim() == 3:  # one alpha per cell: average the cells to keep the release's scale
                value = value / w.shape[0]
            return self.weight * value
        return self.weight * F.relu(self.expected_total(alphas, num_cells) / self.budget - 1)


class LatencyPenalty(ComplexityPenalty):
    """Expected latency under softmax(alpha) from a measured table (``hdnas.latency``), with a
    gradient; called like ``ComplexityPenalty``: ``penalty(alphas, num_cells)``.

    Expected latency (ms) = ``table['fixed_ms']`` + sum over cells and steps of
    ``softmax(alpha) . ops_ms``; for a derived (one-hot) alpha it is ``hdnas.nas.latency.predict_ms``.
    Without a budget the penalty is the release's normalised form on latencies,
    ``weight * sum_rows sum_k w_k t_k / sum_k t_k``; with ``budget_ms`` it is the hinge
    ``weight * max(0, expected_ms / budget_ms - 1)``. The table must be for the search's op set,
    channel count and number of cells (its fixed part was measured with that many cells).
    """

    def __init__(self, table, op_names, weight: float = 1.0, budget_ms: float | None = None,
                 channels: int | None = None):
        source = "the latency table" if isinstance(table, dict) else f"latency table {table}"
        if not isinstance(table, dict):
            table = load_table(table)
        check_table(table, source)
        missing = [n for n in op_names if n not in table["ops_ms"]]
        if missing:
            raise LatencyTableError(f"the latency table has no entry for the ops {missing}")
        if channels is not None and channels != table["channels"]:
            raise LatencyTableError(f"the latency table was measured at {table['channels']} "
                                    f"channels, the search uses {channels}")
        if budget_ms is not None:
            budget_ms = _check_weight("latency budget (--budget-ms)", budget_ms, positive=True)
        self.table = table
        self.per_op = torch.tensor([float(table["ops_ms"][n]) for n in op_names])
        self.weight, self.budget, self.kind = _check_weight("penalty", weight), budget_ms, "latency"
        self.fixed_cost, self.pixels = float(table["fixed_ms"]), 1.0

    def expected_total(self, alphas, num_cells: int):
        """Expected latency in ms of the derived network."""
        if num_cells != self.table["cells"]:
            raise LatencyTableError(f"the latency table's fixed part is for {self.table['cells']} "
                                    f"cells, the network has {num_cells}")
        return super().expected_total(alphas, num_cells)
