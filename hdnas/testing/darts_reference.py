"""DARTS' own search code, as quark0/darts writes it (``cnn/model_search.py``, ``cnn/architect.py``),
made CPU-runnable (no ``.cuda()``, ``p.data.add_(v, alpha=R)`` for the removed positional form):
a ``Network`` whose alphas are plain tensors with ``requires_grad`` and whose ``new()`` builds a
fresh network, and the ``Architect`` whose second-order step builds the unrolled model with
``model.new()``. Used by the tests of ``hdnas.darts.patch`` to check the drop-in on the real
model contract, not on hdnas' own network."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hdnas.darts.model_search import Network as DartsLayout
from hdnas.darts.operations import PRIMITIVES


class Network(nn.Module):
    """DARTS' search ``Network`` as its code is written: alphas are plain tensors with
    ``requires_grad`` (not parameters), and ``new()`` builds a fresh, unpatched network. The
    layers (stem, cells of DARTS' plain mixed ops, classifier) are
    ``hdnas.darts.model_search.Network``'s, whose layout is DARTS'."""

    def __init__(self, C, num_classes, layers, criterion, steps=4, multiplier=4, stem_multiplier=3):
        super().__init__()
        self._C, self._num_classes, self._layers = C, num_classes, layers
        self._criterion, self._steps, self._multiplier = criterion, steps, multiplier
        body = DartsLayout(C, num_classes, layers, criterion, steps, multiplier, stem_multiplier)
        self.stem, self.cells = body.stem, body.cells
        self.global_pooling, self.classifier = body.global_pooling, body.classifier
        self._initialize_alphas()

    def new(self):
        model_new = Network(self._C, self._num_classes, self._layers, self._criterion,
                            self._steps, self._multiplier)
        if self.alphas_normal.dtype == torch.float64:  # (DARTS: .cuda())
            model_new.to_double()
        for x, y in zip(model_new.arch_parameters(), self.arch_parameters()):
            x.data.copy_(y.data)
        return model_new

    def forward(self, input):
        s0 = s1 = self.stem(input)
        for cell in self.cells:
            a = self.alphas_reduce if cell.reduction else self.alphas_normal
            s0, s1 = s1, cell(s0, s1, F.softmax(a, dim=-1))
        out = self.global_pooling(s1)
        return self.classifier(out.view(out.size(0), -1))

    def _loss(self, input, target):
        return self._criterion(self(input), target)

    def _initialize_alphas(self, dtype=torch.float32):
        k = sum(1 for i in range(self._steps) for n in range(2 + i))
        self.alphas_normal = (1e-3 * torch.randn(k, len(PRIMITIVES), dtype=dtype)).requires_grad_()
        self.alphas_reduce = (1e-3 * torch.randn(k, len(PRIMITIVES), dtype=dtype)).requires_grad_()
        self._arch_parameters = [self.alphas_normal, self.alphas_reduce]

    def to_double(self):
        """fp64, alphas included (plain tensors: ``.double()`` does not see them)."""
        self.double()
        self.alphas_normal = self.alphas_normal.detach().double().requires_grad_()
        self.alphas_reduce = self.alphas_reduce.detach().double().requires_grad_()
        self._arch_parameters = [self.alphas_normal, self.alphas_reduce]
        return self

    def arch_parameters(self):
        return self._arch_parameters


def _concat(xs):
    return torch.cat([x.view(-1) for x in xs])


class Architect:
    def __init__(self, model, momentum=0.9, weight_decay=3e-4, arch_learning_rate=3e-4,
                 arch_weight_decay=1e-3):
        self.network_momentum = momentum
        self.network_weight_decay = weight_decay
        self.model = model
        self.optimizer = torch.optim.Adam(self.model.arch_parameters(), lr=arch_learning_rate,
                                          betas=(0.5, 0.999), weight_decay=arch_weight_decay)
        self.unrolled_models = []  # for the tests: every model built by new()

    def _compute_unrolled_model(self, input, target, eta, network_optimizer):
        loss = self.model._loss(input, target)
        theta = _concat(self.model.parameters()).data
        try:
            moment = _concat(network_optimizer.state[v]['momentum_buffer']
                             for v in self.model.parameters()).mul_(self.network_momentum)
        except KeyError:
            moment = torch.zeros_like(theta)
        dtheta = _concat(torch.autograd.grad(loss, self.model.parameters())).data \
            + self.network_weight_decay * theta
        return self._construct_model_from_theta(theta.sub(moment + dtheta, alpha=eta))

    def step(self, input_train, target_train, input_valid, target_valid, eta, network_optimizer,
             unrolled):
        self.optimizer.zero_grad()
        if unrolled:
            self._backward_step_unrolled(input_train, target_train, input_valid, target_valid, eta,
                                         network_optimizer)
        else:
            self.model._loss(input_valid, target_valid).backward()
        self.optimizer.step()

    def _backward_step_unrolled(self, input_train, target_train, input_valid, target_valid, eta,
                                network_optimizer):
        unrolled_model = self._compute_unrolled_model(input_train, target_train, eta,
                                                      network_optimizer)
        unrolled_model._loss(input_valid, target_valid).backward()
        dalpha = [v.grad for v in unrolled_model.arch_parameters()]
        vector = [v.grad.data for v in unrolled_model.parameters()]
        implicit_grads = self._hessian_vector_product(vector, input_train, target_train)
        for g, ig in zip(dalpha, implicit_grads):
            g.data.sub_(ig.data, alpha=eta)
        for v, g in zip(self.model.arch_parameters(), dalpha):
            if v.grad is None:
                v.grad = g.data.clone()
            else:
                v.grad.data.copy_(g.data)

    def _construct_model_from_theta(self, theta):
        model_new = self.model.new()
        self.unrolled_models.append(model_new)
        model_dict = self.model.state_dict()
        params, offset = {}, 0
        for k, v in self.model.named_parameters():
            v_length = int(np.prod(v.size()))
            params[k] = theta[offset: offset + v_length].view(v.size())
            offset += v_length
        assert offset == len(theta)
        model_dict.update(params)
        model_new.load_state_dict(model_dict)
        return model_new

    def _hessian_vector_product(self, vector, input, target, r=1e-2):
        R = r / _concat(vector).norm()
        for p, v in zip(self.model.parameters(), vector):
            p.data.add_(v, alpha=R)
        grads_p = torch.autograd.grad(self.model._loss(input, target), self.model.arch_parameters())
        for p, v in zip(self.model.parameters(), vector):
            p.data.sub_(v, alpha=2 * R)
        grads_n = torch.autograd.grad(self.model._loss(input, target), self.model.arch_parameters())
        for p, v in zip(self.model.parameters(), vector):
            p.data.add_(v, alpha=R)
        return [(x - y).div_(2 * R) for x, y in zip(grads_p, grads_n)]
