"""A small DARTS search network, written from the published description (DARTS' CIFAR search
model: ``cnn/model_search.py``, docs/method.md §9), for tests, examples and benchmarks.

* A cell has ``steps`` = 4 intermediate nodes; node i sums one mixed op per earlier state (the two
  cell inputs and nodes < i): 2 + 3 + 4 + 5 = 14 edges. The inputs are preprocessed by
  ReLUConvBN 1x1 (FactorizedReduce after a reduction cell), all BN non-affine; the output is the
  concatenation of the last ``multiplier`` = 4 nodes.
* ``layers`` = 8 cells; cells ``layers // 3`` and ``2 * layers // 3`` are reduction cells (their
  edges from the cell inputs have stride 2, and the channels double). Stem: 3x3 conv to
  ``stem_multiplier * C`` channels + BN; head: global average pool + linear classifier.
* Architecture: ``alphas_normal`` / ``alphas_reduce`` of shape (14, #candidates), ``1e-3 * randn``,
  shared by all cells of a type; for PC-DARTS also ``betas_normal`` / ``betas_reduce`` (14,).
* ``weighting``: 'softmax' (DARTS), 'sigmoid' (FairDARTS), 'gdas' (hard Gumbel-softmax, only the
  sampled candidate of each edge runs; temperature ``tau``), 'pcdarts' (partial channels with
  K = ``partial_k`` = 4 and edge normalisation).
* ``genotype()``: DARTS' derivation rule: per node, the two incoming edges with the largest
  strongest non-'none' weight, each with its strongest non-'none' op (PC-DARTS: weights times the
  normalised edge weights); ``concat = range(2 + steps - multiplier, steps + 2)``.

The mixed ops are the plain ``PlainMixedOp`` (DARTS' loop); ``hdnas.darts.patch(model)`` swaps them.
"""
from __future__ import annotations

from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn

from hdnas.nas.architect import Architect
from hdnas.darts.operations import (PRIMITIVES, FactorizedReduce, PlainMixedOp, ReLUConvBN,
                                    check_primitives)
from hdnas.darts.weighting import (WEIGHTINGS, edge_weights, gdas_weights, sigmoid_weights,
                                   softmax_weights)

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")


class Cell(nn.Module):
    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev,
                 primitives=PRIMITIVES, partial_k: int = 1):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self._steps = steps
        self._multiplier = multiplier
        self._ops = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self._ops.append(PlainMixedOp(C, stride, primitives, partial_k))

    def forward(self, s0, s1, weights, edge_w=None, index=None):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self._steps):
            parts = []
            for j, h in enumerate(states):
                op = self._ops[offset + j]
                if index is None:
                    y = op(h, weights[offset + j])
                else:
                    y = op.forward_gdas(h, weights[offset + j], int(index[offset + j]))
                parts.append(y if edge_w is None else edge_w[offset + j] * y)
            offset += len(states)
            states.append(sum(parts))
        return torch.cat(states[-self._multiplier:], dim=1)


class Network(nn.Module):
    """DARTS' search network (see the module docstring). ``criterion`` defaults to cross entropy."""

    def __init__(self, C: int = 16, num_classes: int = 10, layers: int = 8, criterion=None,
                 steps: int = 4, multiplier: int = 4, stem_multiplier: int = 3,
                 primitives=PRIMITIVES, weighting: str = "softmax", tau: float = 10.0,
                 partial_k: int = 4):
        super().__init__()
        self._init_args = dict(C=C, num_classes=num_classes, layers=layers, criterion=criterion,
                               steps=steps, multiplier=multiplier,
                               stem_multiplier=stem_multiplier, primitives=primitives,
                               weighting=weighting, tau=tau, partial_k=partial_k)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
        if layers < 1 or steps < 1 or not 1 <= multiplier <= steps:
            raise ValueError(f"need layers >= 1, steps >= 1, 1 <= multiplier <= steps (got "
                             f"{layers}, {steps}, {multiplier})")
        self._C, self._num_classes, self._layers = C, num_classes, layers
        self._steps, self._multiplier = steps, multiplier
        self._criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.primitives = check_primitives(primitives)
        self.weighting, self.tau = weighting, tau
        k = partial_k if weighting == "pcdarts" else 1
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            if C_curr % k:
                raise ValueError(f"cell {i} has C={C_curr} channels, not divisible by the "
                                 f"PC-DARTS partial-channel factor K={k}")
            self.cells.append(Cell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction,
                                   reduction_prev, self.primitives, k))
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        n_edges = sum(2 + i for i in range(steps))
        n_ops = len(self.primitives)
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(n_edges, n_ops))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(n_edges, n_ops))
        self._arch_names = ["alphas_normal", "alphas_reduce"]
        if weighting == "pcdarts":
            self.betas_normal = nn.Parameter(1e-3 * torch.randn(n_edges))
            self.betas_reduce = nn.Parameter(1e-3 * torch.randn(n_edges))
            self._arch_names += ["betas_normal", "betas_reduce"]

    # -- DARTS' model contract: arch_parameters(), weights-only parameters(), _loss(), new() ----
    # (hdnas.nas.architect uses weight_parameters/alphas/num_cells.) The alphas are registered
    # parameters, so .to()/.double()/state_dict() carry them, but ``parameters()`` and
    # ``named_parameters()`` list the weights only, as in DARTS (whose alphas are plain tensors):
    # a weight optimizer built over ``model.parameters()`` never updates them, and DARTS'
    # Architect flattens the same tensors it unrolls. ``all_parameters()`` gives both.
    def arch_parameters(self):
        return [getattr(self, n) for n in self._arch_names]

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True):
        arch = {f"{prefix}.{n}" if prefix else n for n in self._arch_names}
        for name, p in super().named_parameters(prefix, recurse, remove_duplicate):
            if name not in arch:
                yield name, p

    def weight_parameters(self):
        return list(self.parameters())

    def all_parameters(self):
        """The weights and the architecture parameters."""
        return self.weight_parameters() + self.arch_parameters()

    def new(self) -> "Network":
        """A fresh network of the same configuration holding a copy of the architecture
        parameters (DARTS' ``new()``, which its second-order Architect unrolls into)."""
        fresh = type(self)(**self._init_args)
        a = self.arch_parameters()[0]
        fresh.to(device=a.device, dtype=a.dtype)
        with torch.no_grad():
            for x, y in zip(fresh.arch_parameters(), self.arch_parameters()):
                x.copy_(y)
        return fresh

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the gradients of the weights and of the architecture parameters."""
        super().zero_grad(set_to_none)
        for p in self.arch_parameters():
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    @property
    def alphas(self):
        return self.alphas_normal

    @property
    def num_cells(self):
        return self._layers

    # -- forward ----------------------------------------------------------------------------
    def _cell_weights(self, kind: str):
        """(weights, edge weights or None, GDAS indices or None) of one cell type."""
        alpha = getattr(self, f"alphas_{kind}")
        if self.weighting == "sigmoid":
            return sigmoid_weights(alpha), None, None
        if self.weighting == "gdas":
            hardwts, index = gdas_weights(alpha, self.tau)
            return hardwts, None, index.tolist()
        w = softmax_weights(alpha)
        if self.weighting == "pcdarts":
            return w, edge_weights(getattr(self, f"betas_{kind}"), self._steps), None
        return w, None, None

    def forward(self, input):
        s0 = s1 = self.stem(input)
        cw = {k: self._cell_weights(k) for k in ("normal", "reduce")}
        for cell in self.cells:
            w, ew, idx = cw["reduce" if cell.reduction else "normal"]
            s0, s1 = s1, cell(s0, s1, w, ew, idx)
        out = self.global_pooling(s1)
        return self.classifier(out.view(out.size(0), -1))

    def _loss(self, input, target):
        return self._criterion(self(input), target)

    # -- derivation -------------------------------------------------------------------------
    def _derivation_weights(self, kind):
        alpha = getattr(self, f"alphas_{kind}")
        w = torch.sigmoid(alpha) if self.weighting == "sigmoid" else F.softmax(alpha, dim=-1)
        if self.weighting == "pcdarts":
            w = w * edge_weights(getattr(self, f"betas_{kind}"), self._steps)[:, None]
        return w.detach().cpu().tolist()

    def _parse(self, W):
        none = self.primitives.index("none") if "none" in self.primitives else -1
        gene, start = [], 0
        for i in range(self._steps):
            rows = W[start:start + 2 + i]
            strongest = lambda r: max(r[k] for k in range(len(r)) if k != none)  # noqa: E731
            edges = sorted(range(i + 2), key=lambda x: -strongest(rows[x]))[:2]
            for j in edges:
                k_best = None
                for k in range(len(rows[j])):
                    if k != none and (k_best is None or rows[j][k] > rows[j][k_best]):
                        k_best = k
                gene.append((self.primitives[k_best], j))
            start += 2 + i
        return gene

    def genotype(self) -> Genotype:
        concat = range(2 + self._steps - self._multiplier, self._steps + 2)
        return Genotype(normal=self._parse(self._derivation_weights("normal")), normal_concat=concat,
                        reduce=self._parse(self._derivation_weights("reduce")), reduce_concat=concat)


def make_architect(model: Network, unrolled: bool = False, arch_learning_rate: float = 3e-4,
                   arch_weight_decay: float = 1e-3, weight_decay: float = 3e-4):
    """DARTS' architect on ``hdnas.nas.architect.Architect``: Adam(3e-4, betas (0.5, 0.999), wd 1e-3) on
    the architecture parameters; first order ('darts1': a step on the validation loss) or second
    order ('darts2': the unrolled hypergradient by finite differences; its virtual step is plain
    SGD with weight decay, without DARTS' momentum term)."""
    return Architect(model, model._criterion, rule="darts2" if unrolled else "darts1",
                     lr=arch_learning_rate, betas=(0.5, 0.999), weight_decay=arch_weight_decay,
                     w_weight_decay=weight_decay)


def search_step(model: Network, architect, optimizer, train_batch, valid_batch, eta: float,
                grad_clip: float = 5.0) -> float:
    """One step of DARTS' ``train_search``: the architecture step on the validation batch first,
    then the weight step on the training batch (gradient norm clipped). Returns the train loss."""
    architect.step(train_batch, valid_batch, eta)
    optimizer.zero_grad()
    loss = model._loss(*train_batch)
    loss.backward()
    nn.utils.clip_grad_norm_(model.weight_parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach())
