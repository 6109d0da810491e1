"""Architecture update rules (the "architect").

* ``joint`` (the DLSR release): after the weight step, one Adam step on alpha/beta for
  ``L_train + L_val + penalty``, the train loss recomputed on the same train batch.
* ``darts1`` (DARTS first order): before the weight step, a step on ``L_val + penalty``.
* ``darts2`` (DARTS second order): before the weight step, the unrolled hypergradient
  ``d/da L_val(w - eta * dL_train/dw, a)``, its Hessian-vector product by central finite
  differences with ``R = r / ||v||`` as in DARTS. The virtual step is plain SGD with the weight
  learning rate ``eta`` and weight decay (DARTS also adds the optimizer's momentum; our weight
  optimizer is Adam, whose state a virtual step should not touch).

Mixed precision (``autocast``, ``scaler``): joint and darts1 compute their losses under
``autocast()`` and step through ``scaler`` (an fp16 ``GradScaler``: the loss is scaled before
the backward pass, the gradients unscaled and checked before the Adam step, and the step is
skipped when one is inf/nan). darts2 ignores both and computes its whole step in fp32 (with
autocast disabled, also inside a caller's autocast): its
virtual step ``eta * g`` and its finite-difference offsets ``R v`` are changes of the weights
near or below the spacing of the low-precision copies of the weights that autocast feeds to
the convolutions, so they are partly rounded away (docs/presets.md gives a measurement).

Data parallel (``average``): every gradient computation that feeds an update or a virtual step
is averaged over the ranks right after it (``average(list_of_tensors)``, in place): the
architecture gradient of joint/darts1; for darts2 the train gradient of the virtual step, the
validation gradients (d/d arch and the vector ``v``, whose norm sets ``R``) and the
finite-difference Hessian-vector product (averaged once as a difference: it is linear in the
two gradients). So each rank computes the hypergradient of the global batch and all ranks take
the same step. The logged ``loss_arch`` is the mean over the ranks too.

Compiled (``forward``): every loss is computed through ``forward`` (a ``torch.compile`` wrapper
of the model: ``python -m bench.bench_compile --whole-step``) instead of the model itself;
parameters and updates are the model's. Eager autograd computes only the gradients a
``backward(inputs=arch)`` asks for; a compiled backward computes every input's that requires
one. So where only the architecture's gradient is wanted (joint and darts1, darts2's finite
differences) the weights stop requiring gradients for that forward and backward
(``_arch_only``): the compiled forward gets a second graph, without the weights' gradients.

Finite or stop: a step whose validation loss, penalty or architecture gradient is not finite
raises ``FloatingPointError`` before it updates alpha/beta (with an active fp16 scaler an
inf/nan gradient is the scaler's to skip, as for the weights); ``hdnas.engine`` stops the run.
"""
from __future__ import annotations

import contextlib
import math

import torch

RULES = ("joint", "darts1", "darts2")


def _finite(what: str, value) -> None:
    v = float(value.detach() if torch.is_tensor(value) else value)
    if not math.isfinite(v):
        raise FloatingPointError(f"the {what} is {v}")


def _check_grads(params) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        _finite("gradient norm of alpha/beta", torch.nn.utils.get_total_norm(grads))


def _grads(loss, params):
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


class Architect:
    def __init__(self, model, loss_fn, rule: str = "joint", lr: float = 3e-4,
                 betas=(0.5, 0.999), weight_decay: float = 1e-8, penalty=None,
                 w_weight_decay: float = 0.0, hvp_r: float = 1e-2,
                 autocast=contextlib.nullcontext, scaler: torch.amp.GradScaler | None = None,
                 average=None, forward=None):
        if rule not in RULES:
            raise ValueError(f"unknown update rule {rule!r}; choose one of {RULES}")
        for name, v, lo in (("lr", lr, 0.0), ("hvp_r", hvp_r, 0.0)):
            if not math.isfinite(v) or v <= lo:
                raise ValueError(f"architecture {name} must be a finite number > 0, got {v}")
        self.model, self.loss_fn, self.rule, self.penalty = model, loss_fn, rule, penalty
        # what computes the model's output: the model, or a compiled wrapper of it
        self.forward = model if forward is None else forward
        self.w_weight_decay, self.hvp_r = w_weight_decay, hvp_r
        self.autocast = autocast
        self.average = average or (lambda tensors: None)  # in place mean over the ranks
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler(enabled=False)
        self.optimizer = torch.optim.Adam(model.arch_parameters(), lr=lr, betas=betas,
                                          weight_decay=weight_decay)

    @property
    def before_weight_step(self) -> bool:
        return self.rule != "joint"

    @contextlib.contextmanager
    def _arch_only(self):
        """Compiled: the weights require no gradient inside (module doc); eager: nothing."""
        frozen = [] if self.forward is self.model else [
            p for p in self.model.weight_parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def loss(self, batch):
        lr, hr = batch
        return self.loss_fn(self.forward(lr), hr)

    def penalty_term(self):
        if self.penalty is None:
            return self.model.alphas.new_zeros(())
        return self.penalty(self.model.alphas, self.model.num_cells)

    def step(self, train_batch, arch_batch, eta: float) -> dict:
        """One architecture update; returns the logged loss terms."""
        arch = self.model.arch_parameters()
        self.optimizer.zero_grad(set_to_none=True)
        pen = self.penalty_term()
        if self.rule == "darts2":  # fp32, unscaled, even inside a caller's autocast
            with torch.autocast(self.model.alphas.device.type, enabled=False):
                hyper, l_val = self.unrolled_hypergradient(train_batch, arch_batch, eta)
            for p, g in zip(arch, hyper):
                p.grad = g  # already the mean over the ranks
            if pen.requires_grad:  # the same on every rank: not averaged
                pen.backward(inputs=arch)  # accumulates onto the hypergradient
            _finite("architecture loss", l_val)
            _finite("penalty", pen)
            _check_grads(arch)
            self.optimizer.step()
        else:
            with self._arch_only():
                with self.autocast():
                    l_val = self.loss(arch_batch)
                    total = l_val + pen
                    if self.rule == "joint":
                        total = total + self.loss(train_batch)
                self.scaler.scale(total).backward(inputs=arch)
            for p in arch:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            l_val = l_val.detach().float().reshape(1)
            self.average([p.grad for p in arch] + [l_val])
            _finite("architecture loss", l_val)
            _finite("penalty", pen)
            if not self.scaler.is_enabled():
                _check_grads(arch)
            self.scaler.step(self.optimizer)  # skipped if a scaled fp16 gradient overflowed
            self.scaler.update()
        return {"loss_arch": float(l_val.detach()), "penalty": float(pen.detach())}

    def unrolled_hypergradient(self, train_batch, arch_batch, eta: float):
        """d/d(arch) of L_val(w', arch), w' = w - eta (dL_train/dw + wd w), with the
        second-order term by finite differences. Weights are restored before returning."""
        weights, arch = self.model.weight_parameters(), self.model.arch_parameters()
        backup = [p.detach().clone() for p in weights]
        gw = _grads(self.loss(train_batch), weights)
        self.average(gw)
        with torch.no_grad():
            for p, g in zip(weights, gw):
                p.sub_(eta * (g + self.w_weight_decay * p))
        l_val = self.loss(arch_batch)
        g = _grads(l_val, arch + weights)
        l_val = l_val.detach().reshape(1)
        self.average(g + [l_val])
        d_arch, v = g[:len(arch)], g[len(arch):]
        with torch.no_grad():
            for p, b in zip(weights, backup):
                p.copy_(b)
        hvp = self._hessian_vector_product(v, train_batch)
        return [da - eta * h for da, h in zip(d_arch, hvp)], l_val.reshape(())

    def _hessian_vector_product(self, v, train_batch):
        """(d^2 L_train / d arch d w) v  ~  (g(w + R v) - g(w - R v)) / 2R, g = dL_train/d arch."""
        weights, arch = self.model.weight_parameters(), self.model.arch_parameters()
        norm = torch.sqrt(sum((x * x).sum() for x in v))
        if float(norm) == 0.0:
            return [torch.zeros_like(a) for a in arch]
        R = self.hvp_r / norm
        backup = [p.detach().clone() for p in weights]
        g = {}
        for sign in (1, -1):
            with torch.no_grad():
                for p, b, x in zip(weights, backup, v):
                    p.copy_(b + sign * R * x)
            with self._arch_only():
                g[sign] = _grads(self.loss(train_batch), arch)
        with torch.no_grad():
            for p, b in zip(weights, backup):
                p.copy_(b)
        hvp = [(a - b) / (2 * R) for a, b in zip(g[1], g[-1])]
        self.average(hvp)
        return hvp
