"""Correctness checks of ``python -m bench.gpu``: every backend against the reference, on the
device, before anything is timed.

A check runs one case (a primitive, the mixed op, the distillation step, the whole supernet) in
one precision mode with fixed random inputs and cotangents, forward and backward, and compares
every output and gradient with the truth: the reference run in fp64 on the same values (the
inputs and parameters rounded to the mode's storage dtype first, so input rounding is not
counted as error). The rule depends on the mode:

* ``fp64``: the same numbers, up to reassociation: max |got - truth| / max |truth| per tensor
  <= 1e-10 (1e-8 for the supernet, as tests/mixed/test_conformance.py);
* fp32 (TF32 off), bf16 storage, autocast: the elementwise round-off bound of
  tests/mixed/test_conformance.py (``hdnas.testing.bounds.bound_ratio``: ``|got - truth| <=
  (depth u + gamma_n(fp32)) * |.|-magnitude``, the magnitude being the fp64 reference run on the absolute values of every
  input, parameter and cotangent). A backend passes when its worst ratio is <= 1, or no more than
  ``CALIBRATION`` times the reference's own ratio at the same precision (the stock kernels are
  not always held to the bound either: see test_conformance.test_half_precision);
* the supernet in low precision: the ESA branch (max-pool, sigmoid, interpolation) has no
  |.|-magnitude bound, so the relative 2-norm error of the output, of the architecture gradients
  and of all weight gradients together, within ``CALIBRATION`` times the reference's own (at
  least 8 u).

Every result also checks that the output dtypes equal the reference's (the dtype policy under
autocast). Cases are data (``CheckCase``); ``dlsr_cases`` builds the DLSR list, and another
search space adds its own list (bench/gpu.py: ``PROVIDERS``).
"""
from __future__ import annotations

import contextlib
import copy
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hdnas.mixed import MixedOp, get_backend
from hdnas.mixed.merged import DecomposedBackend
from hdnas.mixed.primitives import TORCH_PRIMITIVES
from hdnas.model.space import DLSR_PRIMITIVES
from hdnas.testing.bounds import (AUTOCAST_DEPTH, DEPTH, UNIT_ROUNDOFF, bound_ratio,  # noqa: F401
                                  max_rel, norm_rel)

CALIBRATION = 4.0
FP64_TOL = {"primitive": 1e-10, "op": 1e-10, "net": 1e-8}


@dataclass(frozen=True)
class Mode:
    """A precision mode: the dtype tensors and parameters are stored in, and the autocast dtype
    (None: no autocast)."""

    name: str
    storage: torch.dtype
    amp: torch.dtype | None = None

    @property
    def compute(self) -> torch.dtype:
        return self.amp or self.storage

    @property
    def u(self) -> float:
        return UNIT_ROUNDOFF[self.compute]

    @property
    def depth(self) -> int:
        return AUTOCAST_DEPTH if self.amp else DEPTH


MODES = {m.name: m for m in (
    Mode("fp64", torch.float64), Mode("fp32", torch.float32), Mode("bf16", torch.bfloat16),
    Mode("autocast_bf16", torch.float32, torch.bfloat16),
    Mode("autocast_fp16", torch.float32, torch.float16))}
FP64 = MODES["fp64"]


def reduction_length(N, C, H, W) -> int:
    """The longest dot product of a mixed op's forward or backward: the 7x7 dense conv (49 C
    terms) or a weight gradient (N H W terms), plus the chain depth."""
    return max(49 * C, N * H * W) + DEPTH


# ---------------------------------------------------------------------------------------------
# cases

@dataclass
class State:
    """The values of one check, in fp64: a module (or None), named input tensors (``grad``: the
    ones whose gradient is compared), optional views the forward sees instead of a tensor (a
    channel slice), and the cotangents of the outputs."""

    module: nn.Module | None
    tensors: dict
    grad: tuple
    cotangents: list
    n: int
    views: dict = field(default_factory=dict)

    def rounded(self, dtype: torch.dtype) -> "State":
        """The same state with every value rounded to ``dtype`` (kept in fp64)."""
        mod = None
        if self.module is not None:
            mod = copy.deepcopy(self.module).to(dtype).double()
        return State(mod, {k: v.to(dtype).double() for k, v in self.tensors.items()}, self.grad,
                     self.cotangents, self.n, self.views)


@dataclass
class CheckCase:
    """One check: ``build(device, seed) -> State`` and ``forward(impl, module, args) -> tuple of
    outputs``. ``level``: 'primitive' (``impl`` is a Primitives set; applies to backends with
    their own primitives; the reference is the plain twins), 'op' or 'net' (``impl`` is a
    backend). ``op_names``: the op set a backend must serve."""

    name: str
    level: str
    modes: tuple
    build: Callable
    forward: Callable
    op_names: tuple = DLSR_PRIMITIVES
    seed: int = 0


def _randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def _to(state: State, device) -> State:
    if state.module is not None:
        state.module.to(device)
    state.tensors = {k: v.to(device) for k, v in state.tensors.items()}
    state.cotangents = [g.to(device) for g in state.cotangents]
    return state


def _random_params(m: nn.Module, gen, std=0.5):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(_randn(gen, *p.shape, scale=std))


ST1 = ((3, 5, 7, 3, 5), (1, 1, 1, 2, 2), 7)  # DLSR stage 1: sep 3/5/7 then dil 3/5
ST2 = ((3, 5, 7), (1, 1, 1), 7)  # DLSR stage 2 (sep second depthwise)
DARTS_DW = ((3, 5, 3, 5), (1, 1, 2, 2), 5)  # the idealised DARTS set for mixed_dw (with skip)


def primitive_cases(shape, modes) -> list[CheckCase]:
    """grouped_dw (shared input: stage 1; per-group input: stage 2) and mixed_dw with a skip
    weight, forward and backward (gradients of x, kernels, weights, skip)."""
    N, C, H, W = shape

    def build_grouped(G, ks, shared):
        def build(device, seed):
            gen = torch.Generator().manual_seed(seed)
            kmax = ks[2]
            cin = C if shared else G * C
            t = {"x": _randn(gen, N, cin, H, W), "kernels": _randn(gen, G, C, kmax, kmax, scale=0.5)}
            return _to(State(None, t, ("x", "kernels"), [_randn(gen, N, G * C, H, W)],
                             max(kmax * kmax, N * H * W) + DEPTH), device)
        return build

    def build_mixed(device, seed):
        gen = torch.Generator().manual_seed(seed)
        ks, ds, kmax = DARTS_DW
        G = len(ks)
        t = {"x": _randn(gen, N, C, H, W), "kernels": _randn(gen, G, C, kmax, kmax, scale=0.5),
             "w": F.softmax(_randn(gen, G + 1), 0)}
        return _to(State(None, t, ("x", "kernels", "w"), [_randn(gen, N, C, H, W)],
                         max(G * kmax * kmax, N * H * W) + DEPTH), device)

    def fwd_stage1(impl, mod, a):
        return (impl.grouped_dw(a["x"], a["kernels"], ST1[0], ST1[1], True, True),)

    def fwd_stage2(impl, mod, a):
        return (impl.grouped_dw(a["x"], a["kernels"], ST2[0], ST2[1], True, False),)

    def fwd_mixed(impl, mod, a):
        ks, ds, _ = DARTS_DW
        w = a["w"]
        return (impl.mixed_dw(a["x"], w[:len(ks)], a["kernels"], ks, ds, False, w[len(ks)]),)

    return [CheckCase("grouped_dw.shared", "primitive", modes, build_grouped(5, ST1, True),
                      fwd_stage1, seed=31),
            CheckCase("grouped_dw.per_group", "primitive", modes, build_grouped(3, ST2, False),
                      fwd_stage2, seed=32),
            CheckCase("mixed_dw.skip", "primitive", modes, build_mixed, fwd_mixed, seed=33)]


def op_cases(shape, modes, op_names=DLSR_PRIMITIVES, prefix="") -> list[CheckCase]:
    """The mixed op and the distillation step, on a contiguous input and on a channel slice of
    a bigger tensor (as a cell hands slices around)."""
    N, C, H, W = shape
    K = len(op_names)

    def build(distill, layout):
        def b(device, seed):
            gen = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)
            mixed = MixedOp(C, op_names).double()
            mod = mixed
            cot = [_randn(gen, N, C, H, W)]
            if distill:
                mod = nn.ModuleDict({"mixed": mixed, "distill": nn.Conv2d(C, max(C // 2, 1), 1)}).double()
                cot = [_randn(gen, N, max(C // 2, 1), H, W)] + cot
            _random_params(mod, gen)
            views = {}
            if layout == "channel_slice":
                x = _randn(gen, N, C + 5, H, W)
                views["x"] = lambda t: t[:, 2:2 + C]
            else:
                x = _randn(gen, N, C, H, W)
            t = {"x": x, "w": F.softmax(_randn(gen, K), 0)}
            n = reduction_length(N, C, H, W) + (2 * K if distill else 0)
            return _to(State(mod, t, ("x", "w"), cot, n, views), device)
        return b

    def fwd_mixed(impl, mod, a):
        return (impl.mixed_op(a["x"], a["w"], mod),)

    def fwd_distill(impl, mod, a):
        return tuple(impl.distill_step(a["x"], a["w"], mod["mixed"], mod["distill"]))

    out = []
    for layout in ("contiguous", "channel_slice"):
        sfx = "" if layout == "contiguous" else ".channel_slice"
        # channel slices in the two main modes; the other modes on the contiguous input
        ms = modes if layout == "contiguous" else tuple(m for m in modes if m in ("fp64", "fp32"))
        out.append(CheckCase(f"{prefix}mixed_op{sfx}", "op", ms, build(False, layout), fwd_mixed,
                             op_names, seed=41))
        out.append(CheckCase(f"{prefix}distill_step{sfx}", "op", ms, build(True, layout),
                             fwd_distill, op_names, seed=42))
    return out


def supernet_case(C, cells, N, H, W, modes) -> CheckCase:
    """A whole SuperNet forward and backward: the output and the gradient of every weight and
    of alpha/beta (random alpha/beta so the op weights differ)."""
    from hdnas.model.network import SuperNet

    def build(device, seed):
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        net = SuperNet(C, cells, 2, DLSR_PRIMITIVES).double()
        net.backend = None  # set per run (a deep copy must not copy a backend)
        with torch.no_grad():
            for p in net.arch_parameters():
                p.copy_(_randn(gen, *p.shape))
        t = {"lr": torch.rand(N, 3, H, W, generator=gen, dtype=torch.float64)}
        return _to(State(net, t, (), [_randn(gen, N, 3, 2 * H, 2 * W)], 0), device)

    def fwd(impl, mod, a):
        mod.backend = impl
        return (mod(a["lr"]),)

    return CheckCase("supernet_step", "net", modes, build, fwd, seed=51)


# ---------------------------------------------------------------------------------------------
# running

def _impl(case: CheckCase, backend):
    if case.level != "primitive":
        return backend
    if backend is get_backend("reference"):
        return TORCH_PRIMITIVES
    return backend.primitives


def applies(case: CheckCase, backend) -> bool:
    """Primitive cases concern backends with their own primitives; the others every backend
    but the reference."""
    if backend is get_backend("reference"):
        return False
    if case.level == "primitive":
        return isinstance(backend, DecomposedBackend) and backend.primitives is not TORCH_PRIMITIVES
    return True


def serve_reason(case: CheckCase, backend, device, mode: Mode) -> str | None:
    if case.level == "primitive":
        return backend.primitives_unsupported_reason(torch.device(device), mode.compute)
    return backend.unsupported_reason(tuple(case.op_names), torch.device(device), mode.compute)


def run(case: CheckCase, impl, state: State, mode: Mode, absolute: bool = False):
    """Forward (under autocast for an autocast mode) and backward with the state's cotangents;
    returns ({name: fp64 tensor} of outputs and gradients, {name: dtype} of the outputs)."""
    mod = None
    if state.module is not None:
        mod = copy.deepcopy(state.module).to(mode.storage)
        if absolute:
            with torch.no_grad():
                for p in mod.parameters():
                    p.abs_()
    leaves = {}
    for k, v in state.tensors.items():
        t = (v.abs() if absolute else v).detach().to(mode.storage)
        leaves[k] = t.requires_grad_(k in state.grad)
    args = {k: state.views.get(k, lambda t: t)(t) for k, t in leaves.items()}
    dev = next(iter(leaves.values())).device.type
    ctx = torch.autocast(dev, dtype=mode.amp) if mode.amp else contextlib.nullcontext()
    with ctx:
        outs = case.forward(impl, mod, args)
    gs = [g.abs() if absolute else g for g in state.cotangents]
    if len(outs) != len(gs):
        raise RuntimeError(f"{case.name}: {len(outs)} outputs for {len(gs)} cotangents")
    loss = sum((o.double() * g).sum() for o, g in zip(outs, gs))
    loss.backward()
    res = {f"out{i}": o.detach().double() for i, o in enumerate(outs)}
    for k in state.grad:
        g = leaves[k].grad
        res[f"grad {k}"] = torch.zeros_like(leaves[k], dtype=torch.float64) if g is None else g.double()
    if mod is not None:
        for k, p in mod.named_parameters():
            res[f"grad {k}"] = torch.zeros_like(p, dtype=torch.float64) if p.grad is None else p.grad.double()
    return res, {f"out{i}": o.dtype for i, o in enumerate(outs)}


def _groups(case: CheckCase, res: dict) -> dict:
    """Tensor groups of the 2-norm comparison of the supernet: outputs, alpha/beta gradients,
    all weight gradients."""
    g = {"outputs": [], "arch grads": [], "weight grads": []}
    for k in sorted(res):
        if k.startswith("out"):
            g["outputs"].append(k)
        elif k in ("grad alphas",) or k.startswith("grad betas"):
            g["arch grads"].append(k)
        else:
            g["weight grads"].append(k)
    return {n: ks for n, ks in g.items() if ks}


def measure(case: CheckCase, got: dict, truth: dict, mode: Mode, n: int, mag: dict | None):
    """(value, worst tensor or group) of the mode's metric."""
    if set(got) != set(truth):
        raise RuntimeError(f"tensors differ: {sorted(set(got) ^ set(truth))}")
    if mode is FP64:
        vals = {k: max_rel(got[k], truth[k]) for k in truth}
    elif case.level == "net":
        vals = {name: norm_rel([got[k] for k in ks], [truth[k] for k in ks])
                for name, ks in _groups(case, truth).items()}
    else:
        vals = {k: bound_ratio(got[k], truth[k], mag[k], mode.u, n, mode.depth) for k in truth}
    worst = max(vals, key=lambda k: vals[k])
    return vals[worst], worst


def check(case: CheckCase, backend, device, mode_name: str) -> dict:
    """One check of one backend: a result row (status PASS, FAIL, SKIP or ERROR)."""
    mode = MODES[mode_name]
    row = {"case": case.name, "level": case.level, "backend": backend.name, "mode": mode_name,
           "status": None, "value": None, "limit": None, "ref_value": None, "worst": None,
           "reason": None, "seconds": None}
    t0 = time.perf_counter()
    try:
        why = serve_reason(case, backend, device, mode)
        if why is not None:
            row.update(status="SKIP", reason=why)
            return row
        ref = get_backend("reference")
        state = case.build(torch.device(device), case.seed).rounded(mode.storage)
        truth, _ = run(case, _impl(case, ref), state, FP64)
        got, got_dt = run(case, _impl(case, backend), state, mode)
        if mode is FP64:
            value, worst = measure(case, got, truth, mode, state.n, None)
            limit = FP64_TOL[case.level]
        else:
            mag = None
            if case.level != "net":
                mag, _ = run(case, _impl(case, ref), state, FP64, absolute=True)
            refd, ref_dt = run(case, _impl(case, ref), state, mode)
            if got_dt != ref_dt:
                row.update(status="FAIL", reason=f"output dtypes {got_dt} != reference {ref_dt}")
                return row
            value, worst = measure(case, got, truth, mode, state.n, mag)
            ref_value, _ = measure(case, refd, truth, mode, state.n, mag)
            row["ref_value"] = ref_value
            if case.level == "net":
                limit = CALIBRATION * max(ref_value, 8 * mode.u)
            else:
                limit = max(1.0, CALIBRATION * ref_value)
        ok = value <= limit
        row.update(status="PASS" if ok else "FAIL", value=value, limit=limit, worst=worst)
    except Exception as e:  # noqa: BLE001 - one broken case must not stop the others
        row.update(status="ERROR", reason=f"{type(e).__name__}: {e}",
                   traceback=traceback.format_exc(limit=6))
    finally:
        row["seconds"] = round(time.perf_counter() - t0, 3)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


@contextlib.contextmanager
def no_tf32():
    """fp32 means fp32 in the checks: TF32 off for cuDNN convs and cuBLAS GEMMs."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def format_row(r: dict) -> str:
    what = f"{r['status']:<5} {r['backend']:<10} {r['case']:<28} {r['mode']:<14}"
    if r["status"] in ("PASS", "FAIL") and r["value"] is not None:
        ref = f", reference {r['ref_value']:.3g}" if r["ref_value"] is not None else ""
        rel = "<=" if r["status"] == "PASS" else ">"
        what += f" {r['value']:.3g} {rel} {r['limit']:.3g}{ref} (worst: {r['worst']})"
    if r["reason"]:
        what += f"  {r['reason']}"
    return what
