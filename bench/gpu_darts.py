"""The DARTS cases of ``python -m bench.gpu`` (a provider of bench/gpu.py: ``PROVIDERS``).

``hdnas.darts.MixedOp`` (the swapped op) against DARTS' plain per-op loop
(``hdnas.darts.PlainMixedOp``, the ``reference`` column), for every bench backend whose name the
DARTS MixedOp accepts (``hdnas.darts.BACKENDS``: reference, merged, native, triton; a backend
with another name gets an ERROR row naming the problem). The DARTS op runs the same primitives
as the bench backend of that name; a DARTS backend that would fall back to other primitives on
the device (``resolve_primitives``) is an ERROR, not a silent substitute.

Checks (bench/gpu_check.py rules for level 'net', fp64 and fp32 with TF32 off; softmax
weighting; the truth is the plain loop in fp64 on the same rounded values):

* ``DARTS op s1``, ``DARTS op s2``: one mixed op of the 8 DARTS candidates at stride 1 and 2
  (the check shape of the plan, made even at stride 2 as DARTS' FactorizedReduce needs; BN
  statistics set to non-trivial values first), forward and backward: the output, the gradients
  of the input, of every candidate parameter and of alpha, and every BN's ``running_mean``,
  ``running_var`` and ``num_batches_tracked`` after the backward pass (recomputation must not
  update them twice). fp64: max relative error <= 1e-8 per tensor; fp32: relative 2-norm error
  of the outputs, of alpha's gradient and of all other gradients within 4x the plain loop's own
  fp32 error (at least 8 u).
* ``DARTS net``: a small DARTS search network (``hdnas.darts.model_search.Network``, random
  alphas), every mixed op swapped by ``hdnas.darts.patch``: the cross-entropy loss and the
  gradients of every weight and of the alphas (in ``--dry-run`` fp64 only).

Timed cases (fp32, torch's TF32 defaults; batch = the plan's label batch; the swapped op with
recomputation on every plane; the step as ``patch`` defaults):

* ``DARTS op s1 fwd+bwd``, ``DARTS op s2 fwd+bwd``: one mixed op, forward + backward;
* ``DARTS step``: one first-order DARTS search step (``model_search.search_step``: architecture
  step on a validation batch, then the weight step), whole network.

On a GPU the timed shapes are DARTS' CIFAR search: C 16, 8 cells, 32x32 (batch 64 at the
paper label N64); in ``--dry-run`` C 4, 3 cells of 2 nodes, 8x8. The DARTS shape is in the
case name (the row's ``shape`` is the plan's DLSR shape, of which only the batch is used).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import hdnas.darts as hd
from hdnas.darts.mixed import resolve_primitives
from hdnas.darts.model_search import Network, make_architect, search_step
from hdnas.mixed.merged import DecomposedBackend

from bench import gpu_check, gpu_time
from bench.gpu_check import CheckCase, State
from bench.gpu_time import TimeCase

MODES = ("fp64", "fp32")
N_CLASSES = 10


def shapes(plan) -> dict:
    """The DARTS shapes of a plan: ``time`` (C, cells, H, nodes per cell) of the timed cases
    and ``net`` (C, cells, N, H, nodes per cell) of the network check. The dry run keeps a
    normal and two reduction cells but only 2 nodes per cell (5 edges instead of 14)."""
    if plan.kind == "dry-run":
        return {"time": (4, 3, 8, 2), "net": (4, 3, 2, 8, 2)}
    return {"time": (16, 8, 32, 4), "net": (8, 5, 4, 16, 4)}


def darts_name(backend) -> str:
    """The DARTS backend name of a bench backend; a clear error when DARTS has none."""
    if backend.name not in hd.BACKENDS:
        raise ValueError(f"backend {backend.name!r} has no DARTS counterpart (hdnas.darts."
                         f"BACKENDS: {', '.join(hd.BACKENDS)})")
    return backend.name


def _same_primitives(backend, op: hd.MixedOp, x: torch.Tensor) -> None:
    """Raise if the DARTS backend would run other primitives than the bench backend of the
    same name (DARTS falls back to 'merged' where a backend cannot serve)."""
    if not isinstance(backend, DecomposedBackend):
        return
    got = resolve_primitives(op.backend, x.device, x.dtype, op.plan)
    if got is not backend.primitives:
        raise RuntimeError(f"DARTS backend {op.backend!r} runs the {getattr(got, 'name', got)} "
                           f"primitives on {x.device.type}/{x.dtype}, not {backend.primitives.name}")


def swap_op(backend, plain: nn.Module):
    """The mixed op that ``backend`` runs: the plain loop itself for the reference, else an
    ``hdnas.darts.MixedOp`` that adopts its candidates (the same parameters and buffers), with
    recomputation on every plane size (the path whose backward must not update the BN
    statistics twice; ``recompute="auto"``, patch's default, keeps the intermediates of planes
    of at most 256 pixels, as the check shapes are)."""
    name = darts_name(backend)
    if name == "reference":
        return plain
    return hd.MixedOp.from_module(plain, backend=name, recompute=True)


def swap_net(backend, net: Network) -> Network:
    """``net`` with every mixed op swapped in place for ``backend`` (reference: untouched)."""
    name = darts_name(backend)
    if name != "reference":
        report = hd.patch(net, backend=name)
        if report.skipped or not report.swapped:
            raise RuntimeError(f"patch swapped {len(report.swapped)}, left {report.skipped}")
    return net


def bn_buffers(module: nn.Module) -> list:
    """Every BN buffer (running_mean, running_var, num_batches_tracked), in module order."""
    return [b for m in module.modules() if isinstance(m, nn.BatchNorm2d)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]


# ---------------------------------------------------------------------------------------------
# checks

def _cotangents(gen, outs) -> list:
    return [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]


def op_check_case(shape, stride: int, modes=MODES) -> CheckCase:
    """One DARTS mixed op (8 candidates, ``stride``) on an (N, C, H, W) input: output, BN
    buffers after backward, gradients of x, alpha and every candidate parameter."""
    N, C, H, W = shape

    def fwd(impl, mod, a):
        op = swap_op(impl, mod)
        if op is not mod:
            _same_primitives(impl, op, a["x"])
        y = op(a["x"], torch.softmax(a["alphas"], -1))
        return (y, *bn_buffers(mod))

    def build(device, seed):
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        mod = hd.PlainMixedOp(C, stride).double()
        with torch.no_grad():  # non-trivial BN state: the statistics update is really checked
            for m in mod.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-1, 1, generator=gen)
                    m.running_var.uniform_(0.5, 2, generator=gen)
                    m.num_batches_tracked.fill_(3)
        t = {"x": torch.randn(N, C, H, W, generator=gen, dtype=torch.float64),
             "alphas": torch.randn(len(hd.PRIMITIVES), generator=gen, dtype=torch.float64)}
        with torch.no_grad():
            outs = copy.deepcopy(mod)(t["x"], torch.softmax(t["alphas"], -1))
        cot = _cotangents(gen, [outs] + bn_buffers(mod))
        return gpu_check._to(State(mod, t, ("x", "alphas"), cot, 0), device)

    return CheckCase(f"DARTS op s{stride}", "net", tuple(modes), build, fwd, seed=61 + stride)


def _network(C, cells, steps):
    return Network(C, N_CLASSES, cells, steps=steps, multiplier=steps)


def net_check_case(C: int, cells: int, N: int, H: int, steps: int = 4, modes=MODES) -> CheckCase:
    """A DARTS search network (``cells`` cells of ``steps`` nodes, random alphas) swapped by ``patch``: the
    cross-entropy loss and the gradients of every weight and of the alphas."""

    def fwd(impl, mod, a):
        net = swap_net(impl, mod)
        alphas = {"alphas_normal": a["alphas"][0], "alphas_reduce": a["alphas"][1]}
        logits = functional_call(net, alphas, (a["input"],))
        return (F.cross_entropy(logits, a["target"].long()),)

    def build(device, seed):
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        net = _network(C, cells, steps).double()
        E, K = net.alphas_normal.shape
        t = {"input": torch.randn(N, 3, H, H, generator=gen, dtype=torch.float64),
             "target": torch.randint(0, N_CLASSES, (N,), generator=gen).double(),
             "alphas": torch.randn(2, E, K, generator=gen, dtype=torch.float64)}
        return gpu_check._to(State(net, t, ("alphas",), [torch.randn((), generator=gen,
                                                                      dtype=torch.float64)], 0),
                             device)

    return CheckCase("DARTS net", "net", tuple(modes), build, fwd, seed=71)


def check_cases(plan) -> list[CheckCase]:
    N, C, H, W = plan.check_shape
    # stride 2 needs even sizes (DARTS' FactorizedReduce: its two halves must agree)
    # the dry run checks the network in fp64 only (fp32 is the same logic, and slow on a CPU)
    net_modes = ("fp64",) if plan.kind == "dry-run" else MODES
    return ([op_check_case((N, C, H, W), 1), op_check_case((N, C, H - H % 2, W - W % 2), 2),
             net_check_case(*shapes(plan)["net"], modes=net_modes)])


# ---------------------------------------------------------------------------------------------
# timed cases

def op_time_case(C: int, H: int, stride: int) -> TimeCase:
    """One DARTS mixed op forward + backward (softmax weighting), rotating inputs."""

    def build(backend, shape, device, dtype):
        N = shape[0]
        torch.manual_seed(0)
        plain = hd.PlainMixedOp(C, stride).to(device, dtype)
        op = swap_op(backend, plain)
        nb = gpu_time.n_buffers(device, N * C * H * H * torch.finfo(dtype).bits // 8)
        xs = [torch.randn(N, C, H, H, device=device, dtype=dtype) for _ in range(nb)]
        if op is not plain:
            _same_primitives(backend, op, xs[0])
        alpha = (1e-3 * torch.randn(len(hd.PRIMITIVES), device=device, dtype=dtype)).requires_grad_()
        H2 = (H - 1) // stride + 1
        g = torch.randn(N, C, H2, H2, device=device, dtype=dtype)
        params = list(plain.parameters())

        def fn(i, mark):
            x = xs[i % len(xs)].requires_grad_(True)
            x.grad = alpha.grad = None
            for p in params:
                p.grad = None
            op(x, torch.softmax(alpha, -1)).backward(g)
        return fn

    return TimeCase(f"DARTS op s{stride} fwd+bwd (C{C} {H}x{H})", "op", build)


def step_time_case(C: int, cells: int, H: int, steps: int = 4) -> TimeCase:
    """One first-order DARTS search step (architecture step, then weight step) of the whole
    network, as DARTS' ``train_search`` runs it (``model_search.search_step``)."""

    def build(backend, shape, device, dtype):
        N = shape[0]
        torch.manual_seed(0)
        model = swap_net(backend, _network(C, cells, steps).to(device, dtype))
        if backend.name != "reference":
            op = next(m for m in model.modules() if isinstance(m, hd.MixedOp))
            _same_primitives(backend, op, torch.empty(0, device=device, dtype=dtype))
        arch = make_architect(model)
        opt = torch.optim.SGD(model.weight_parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
        nb = max(3, gpu_time.n_buffers(device, N * 3 * H * H * torch.finfo(dtype).bits // 8) + 1)
        data = [(torch.randn(N, 3, H, H, device=device, dtype=dtype),
                 torch.randint(0, N_CLASSES, (N,), device=device)) for _ in range(nb)]

        def fn(i, mark):
            search_step(model, arch, opt, data[i % nb], data[(i + 1) % nb], 0.025)
        return fn

    nodes = "" if steps == 4 else f" of {steps} nodes"
    return TimeCase(f"DARTS step (C{C}, {cells} cells{nodes}, {H}x{H})", "step", build)


def time_cases(plan) -> list[TimeCase]:
    """The whole search step first (the goal of issue 11), then the mixed op at both strides."""
    C, cells, H, steps = shapes(plan)["time"]
    return [step_time_case(C, cells, H, steps)] + [op_time_case(C, H, s) for s in (1, 2)]
