"""Timing for ``python -m bench.gpu``: a time-boxed timer (CUDA events, warm-up, rotating
inputs, peak memory per case), the device-to-device copy bandwidth (the roofline), the timed
cases (primitives, mixed op, distillation step, whole search steps) and the byte model lookup.

Every case is a builder ``build(backend, shape, device) -> fn`` where ``fn(i, mark)`` runs
repetition ``i`` (``i`` picks the rotating input buffer) and may call ``mark()`` between the
named parts of a repetition (the search step: weight step, then architecture step). Nothing here
asserts anything about time.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch

from hdnas.mixed import MixedOp, get_backend
from hdnas.mixed.merged import DecomposedBackend
from hdnas.mixed.primitives import TORCH_PRIMITIVES
from hdnas.model.space import DLSR_PRIMITIVES

from bench import bytes_model
from bench.gpu_check import DARTS_DW, ST1, ST2


@dataclass
class Budget:
    """Repetitions of one timed case: ``warmup`` untimed runs, then timed runs until at least
    ``min_reps`` ran and either ``max_reps`` ran or ``seconds`` passed."""

    warmup: int = 2
    min_reps: int = 3
    max_reps: int = 30
    seconds: float = 1.0


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Timer:
    def __init__(self, device, budget: Budget):
        self.device, self.budget = torch.device(device), budget
        self.cuda = self.device.type == "cuda"

    def _stamp(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def measure(self, fn, parts=("total",)) -> dict:
        """Median and minimum milliseconds per repetition (and per part), repetitions, and the
        peak memory of the case (``torch.cuda.max_memory_allocated`` after a reset; ``delta``:
        above what was allocated before the case ran). CPU: wall clock, no memory figures."""
        b = self.budget
        if self.cuda:
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        for i in range(b.warmup):
            fn(i, lambda: None)
        sync(self.device)
        reps = []
        t0 = time.perf_counter()
        while len(reps) < b.max_reps and (len(reps) < b.min_reps or time.perf_counter() - t0 < b.seconds):
            stamps = [self._stamp()]
            fn(b.warmup + len(reps), lambda: stamps.append(self._stamp()))
            stamps.append(self._stamp())
            sync(self.device)
            if len(stamps) != len(parts) + 1:
                raise RuntimeError(f"the case marked {len(stamps) - 1} parts, expected {len(parts)}")
            reps.append([self._ms(a, c) for a, c in zip(stamps, stamps[1:])])
        totals = [sum(r) for r in reps]
        out = {"ms": statistics.median(totals), "ms_min": min(totals), "reps": len(reps)}
        if len(parts) > 1:
            out["parts_ms"] = {p: statistics.median(r[k] for r in reps) for k, p in enumerate(parts)}
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            out["peak_mb"] = peak / 2 ** 20
            out["peak_delta_mb"] = (peak - base) / 2 ** 20
        else:
            out["peak_mb"] = out["peak_delta_mb"] = None
        return out


def copy_bandwidth(device, mbytes: int, budget: Budget) -> dict:
    """Device-to-device copy bandwidth (bytes read + written per second) of an ``mbytes`` MiB
    buffer: the roofline the memory-bound kernels are measured against."""
    n = mbytes * 2 ** 20 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    r = Timer(device, budget).measure(lambda i, mark: dst.copy_(src))
    del src, dst
    return {"bytes": 2 * n * 4, "ms": r["ms"], "gb_per_s": 2 * n * 4 / (r["ms"] * 1e-3) / 1e9,
            "reps": r["reps"]}


def n_buffers(device, nbytes: int) -> int:
    """Rotating input buffers: enough that three L2 caches' worth of inputs cycle (2 to 8)."""
    if torch.device(device).type != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2 ** 20)
    return max(2, min(8, math.ceil(3 * l2 / max(nbytes, 1))))


def _bufs(device, dtype, *shape):
    nb = n_buffers(device, math.prod(shape) * torch.finfo(dtype).bits // 8)
    return [torch.randn(*shape, device=device, dtype=dtype) for _ in range(nb)]


# ---------------------------------------------------------------------------------------------
# the byte model (bench/bytes_model.py): bytes per call in units of M = N*C*H*W elements

def _steps(steps, *prefixes):
    got = []
    for p in prefixes:
        hit = [s for s in steps if s[0].startswith(p)]
        if len(hit) != 1:
            raise KeyError(f"bytes_model: {len(hit)} steps start with {p!r}")
        got += hit
    return sum(r + w for _, r, w in got)


_MODEL_TOTALS = {"reference": (bytes_model.REFERENCE_FWD, bytes_model.REFERENCE_BWD),
                 "merged": (bytes_model.MERGED_FWD, bytes_model.MERGED_BWD),
                 "triton": (bytes_model.TRITON_FWD, bytes_model.TRITON_BWD)}


def model_elements(case: str, backend: str) -> float | None:
    """Elements (units of M) the byte model says ``case`` moves with ``backend``; None where it
    has no entry. Primitives: the one-pass kernel design of the model (TRITON_*: read each input
    once, write each output once), for every backend, so for the reference twins (which move
    more) the bandwidth it gives is effective, not achieved. Mixed op: each backend's own model
    (reference, merged, triton; native has none)."""
    F_, B_ = bytes_model.TRITON_FWD, bytes_model.TRITON_BWD
    table = {
        "grouped_dw.shared fwd": lambda: _steps(F_, "stage 1 ("),
        "grouped_dw.shared fwd+bwd": lambda: _steps(F_, "stage 1 (") + _steps(B_, "stage 1 dx", "stage 1 dk"),
        "grouped_dw.per_group fwd": lambda: _steps(F_, "stage 2 ("),
        "grouped_dw.per_group fwd+bwd": lambda: _steps(F_, "stage 2 (") + _steps(B_, "stage 2 dx", "stage 2 dk"),
    }
    if case in table:
        return table[case]()
    if case.startswith("mixed_op") and backend in _MODEL_TOTALS:
        fwd, bwd = _MODEL_TOTALS[backend]
        total = bytes_model.total(fwd)
        n = sum(total)
        if case == "mixed_op fwd+bwd":
            n += sum(bytes_model.total(bwd))
        return n
    return None


def roofline(row: dict, shape, dtype, copy_gbps: float | None) -> None:
    """Adds ``model_gb_per_s`` and ``roofline_share`` (of the copy bandwidth) to a timing row
    where the byte model covers its case (the primitives' M is that of one group's input)."""
    try:
        el = model_elements(row["case"], row["backend"])
    except KeyError as e:
        row["roofline_note"] = str(e)
        return
    if el is None or not row.get("ms"):
        return
    N, C, H, W = shape
    nbytes = el * N * C * H * W * torch.finfo(dtype).bits // 8
    row["model_bytes"] = nbytes
    row["model_gb_per_s"] = nbytes / (row["ms"] * 1e-3) / 1e9
    if copy_gbps:
        row["roofline_share"] = row["model_gb_per_s"] / copy_gbps


# ---------------------------------------------------------------------------------------------
# timed cases

def primitives_of(backend):
    """The depthwise primitives a backend runs (the reference: the plain twins), or None."""
    if backend is get_backend("reference"):
        return TORCH_PRIMITIVES
    if isinstance(backend, DecomposedBackend) and backend.primitives is not TORCH_PRIMITIVES:
        return backend.primitives
    return None


def _rotating(xs, bwd, call, leaves, backward):
    """A case's ``fn(i, mark)``: ``call`` on input buffer ``i % len(xs)``, under no_grad, or (with
    ``bwd``) with the gradients of x and ``leaves`` cleared, then ``backward`` of its output."""
    def fn(i, mark):
        x = xs[i % len(xs)]
        if not bwd:
            with torch.no_grad():
                call(x)
            return
        x.requires_grad_(True)
        x.grad = None
        for t in leaves:
            t.grad = None
        backward(call(x))
    return fn


def _prim_case(which, bwd):
    def build(backend, shape, device, dtype):
        prims = primitives_of(backend)
        N, C, H, W = shape
        if which == "shared":
            ks, ds, kmax = ST1
            G, cin = len(ks), C
        elif which == "per_group":
            ks, ds, kmax = ST2
            G, cin = len(ks), len(ks) * C
        else:
            ks, ds, kmax = DARTS_DW
            G, cin = len(ks), C
        xs = _bufs(device, dtype, N, cin, H, W)
        k = (0.1 * torch.randn(G, C, kmax, kmax, device=device, dtype=dtype)).requires_grad_(bwd)
        w = torch.softmax(torch.randn(G + 1, device=device), 0).to(dtype).requires_grad_(bwd)
        cout = C if which == "mixed" else G * C
        g = torch.randn(N, cout, H, W, device=device, dtype=dtype)

        def call(x):
            if which == "mixed":
                return prims.mixed_dw(x, w[:G], k, ks, ds, False, w[G])
            return prims.grouped_dw(x, k, ks, ds, True, which == "shared")

        return _rotating(xs, bwd, call, (k, w), lambda y: torch.autograd.backward(y, g))
    return build


def _mixed_case(step, bwd, op_names=DLSR_PRIMITIVES):
    def build(backend, shape, device, dtype):
        N, C, H, W = shape
        torch.manual_seed(0)
        mixed = MixedOp(C, op_names).to(device, dtype)
        distill = torch.nn.Conv2d(C, C // 2, 1).to(device, dtype)
        params = list(mixed.parameters()) + list(distill.parameters())
        xs = _bufs(device, dtype, N, C, H, W)
        w = torch.softmax(torch.randn(len(op_names), device=device), 0).to(dtype).requires_grad_(bwd)
        gy = torch.randn(N, C, H, W, device=device, dtype=dtype)
        gd = torch.randn(N, C // 2, H, W, device=device, dtype=dtype)

        def call(x):
            if step:
                return backend.distill_step(x, w, mixed, distill)
            return (backend.mixed_op(x, w, mixed),)

        return _rotating(xs, bwd, call, (w, *params),
                         lambda outs: torch.autograd.backward(outs, [gd, gy] if step else [gy]))
    return build


def weight_step_of(model, forward, loss_fn, shape, device):
    """(rotating (LR, HR) batches, ``weight_step(batch)``): the search's weight step (forward
    through ``forward``, SR loss, backward into the weights, Adam), the loss read back."""
    N, C, H, W = shape
    weights = model.weight_parameters()
    w_opt = torch.optim.Adam(weights, lr=5e-4)
    nb = max(3, n_buffers(device, N * 3 * 4 * H * W * 5) + 1)
    batches = [(torch.rand(N, 3, H, W, device=device), torch.rand(N, 3, 2 * H, 2 * W, device=device))
               for _ in range(nb)]

    def weight_step(batch):
        w_opt.zero_grad(set_to_none=True)
        loss = loss_fn(forward(batch[0]), batch[1])
        loss.backward(inputs=weights)
        w_opt.step()
        return float(loss.detach())
    return batches, weight_step


def search_step_case(rule, cells=6):
    """One whole search step on a SuperNet (C, ``cells`` cells, x2): the weight step (forward, SR loss,
    backward into the weights, Adam) and the architecture step of ``rule`` (hdnas.nas.architect),
    in the search's order (darts1: architecture first), timed as two parts. Inputs rotate over
    a few random (LR, HR) batches; each part ends with the loss read back to the host, as the
    search does."""
    from hdnas.nas.architect import Architect
    from hdnas.nas.losses import SRLoss
    from hdnas.model.network import SuperNet

    def build(backend, shape, device, dtype):
        N, C, H, W = shape
        torch.manual_seed(0)
        model = SuperNet(C, cells, 2, DLSR_PRIMITIVES, backend=backend).to(device)
        loss_fn = SRLoss(0.2)
        arch = Architect(model, loss_fn, rule, 3e-4)
        batches, weight_step = weight_step_of(model, model, loss_fn, shape, device)
        nb = len(batches)

        def fn(i, mark):
            train, val = batches[i % nb], batches[(i + 1) % nb]
            if arch.before_weight_step:
                arch.step(train, val, 5e-4)
                mark()
                weight_step(train)
            else:
                weight_step(train)
                mark()
                arch.step(train, val, 5e-4)
        return fn
    return build


def search_parts(rule) -> tuple:
    return ("arch", "weight") if rule != "joint" else ("weight", "arch")


@dataclass
class TimeCase:
    """A timed case: ``build(backend, shape, device, dtype) -> fn``; ``level`` 'primitive'
    (backends with their own primitives and the reference twins), 'op' or 'step' (every
    backend); ``parts``: the names of the parts ``fn`` marks."""

    name: str
    level: str
    build: object
    parts: tuple = ("total",)
    op_names: tuple = DLSR_PRIMITIVES


def dlsr_time_cases(cells: int = 6) -> list[TimeCase]:
    """The DLSR timed cases, the most telling first (a deadline cuts the end of the list)."""
    cases = [TimeCase("mixed_op fwd+bwd", "op", _mixed_case(False, True)),
             TimeCase("distill_step fwd+bwd", "op", _mixed_case(True, True))]
    for rule in ("joint", "darts1"):
        cases.append(TimeCase(f"search_step {rule}", "step", search_step_case(rule, cells),
                              search_parts(rule)))
    cases.append(TimeCase("mixed_op fwd", "op", _mixed_case(False, False)))
    for which, label in (("shared", "grouped_dw.shared"), ("per_group", "grouped_dw.per_group"),
                         ("mixed", "mixed_dw.skip")):
        cases.append(TimeCase(f"{label} fwd", "primitive", _prim_case(which, False)))
        cases.append(TimeCase(f"{label} fwd+bwd", "primitive", _prim_case(which, True)))
    return cases


def mixed_op_case(op_names) -> TimeCase:
    """The mixed op forward+backward over ``op_names`` (the sweeps)."""
    return TimeCase("mixed_op fwd+bwd", "op", _mixed_case(False, True, tuple(op_names)),
                    op_names=tuple(op_names))


def serves(case: TimeCase, backend, device, dtype) -> str | None:
    """None if ``backend`` runs ``case`` on (device, dtype), else why not."""
    if case.level == "primitive":
        if primitives_of(backend) is None:
            return "no primitives of its own"
        if backend is get_backend("reference"):
            return None
        return backend.primitives_unsupported_reason(torch.device(device), dtype)
    return backend.unsupported_reason(tuple(case.op_names), torch.device(device), dtype)


def paper_projection(t_weight_ms: float, t_arch_ms: float) -> dict:
    """The paper's whole search at these step times (hdnas.search PRESETS['paper']: steps,
    warm-up fraction; weight steps only during the warm-up)."""
    from hdnas.engine.search import PRESETS, SearchConfig
    cfg = SearchConfig(**PRESETS["paper"])
    steps, warm = cfg.steps, cfg.warmup_steps()
    seconds = (steps * t_weight_ms + (steps - warm) * t_arch_ms) * 1e-3
    return {"steps": steps, "warmup_steps": warm, "hours": seconds / 3600,
            "days": seconds / 86400}
