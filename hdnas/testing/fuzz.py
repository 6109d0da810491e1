"""Fuzz the mixed-op backends against the reference backend.

The harness of tests/mixed/test_fuzz.py; its command line is bench/fuzz.py (``main`` here)::

    python bench/fuzz.py                          # 200 cases per backend that serves the CPU
    python bench/fuzz.py --cases 2000 --backend merged --backend native
    python bench/fuzz.py --backend triton --cases 2000 --time-limit 600
    python bench/fuzz.py --case 1234 --backend native        # replay one case, verbose

Each case is derived from (seed, case index) alone (``make_case``): a random op subset (1 to all
registered ops, in random order, ``skip_connect`` included), N 1..3, C 1..16, H and W 1..9 (one
case in 8: W 10..72, for vectorised row code), a weighting (softmax, signed raw, one-hot, all
zero; the weights a vector, a row of a (3, K) tensor as the cell passes them, or a strided
column), an input layout (contiguous, a channel slice of a bigger tensor, H/W transposed,
channels_last), fp64 or fp32, ``mixed_op`` or ``distill_step`` (distillation 1x1 with
max(C//2, 1) outputs, with or without a bias), and the gradients asked for (all, or
``backward(inputs=...)`` with the weights and/or the parameters, with or without x, as the
architecture and weight steps of a search do). Backends that run interpreted (triton on a CPU)
get tiny cases (``TINY``).

What is compared: the outputs and the gradients asked for: of x (of the whole tensor x is a view
of), of the weights (of their whole tensor), of every op parameter and of the distillation conv,
after a backward pass with random cotangents; and that the backend modified none of its inputs.
The truth is the reference backend run in fp64 on the case's values (for fp32 cases, on the
fp32-rounded values). The error bound is elementwise: ``|got - truth| <= TOL_ULPS * u * mag``
with ``u`` the unit round-off of the case's dtype and ``mag`` the same reference computation run
on the absolute values of every input (x, weights, parameters, cotangents), which bounds the sum
of the magnitudes of the terms that make up each element (every op is linear or a ReLU /
LeakyReLU). An element whose terms are all zero must be exactly zero.

ReLU kinks: a pre-activation within rounding error of zero may have either sign in a correct
fp32 computation, and then a gradient legitimately differs by a whole term. So the truth run
also records every ReLU / LeakyReLU input that is computed (not x itself) and, when one lies
within ``KINK_ULPS * u * mag`` of zero (and is not exactly zero: all its terms zero), the case's
values are drawn again (attempt 1, 2, ...; still a function of seed and index). The number of
redraws is reported; after MAX_ATTEMPTS draws the case runs with its best draw, and a mismatch
report says how close to a kink it is.

The summary is Markdown on stdout (``--out`` also writes it to a file).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import sys
import time
import traceback

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

if not torch.cuda.is_available():  # the Triton backend serves CPU tensors only interpreted;
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before hdnas.kernels is imported

from hdnas import machine  # noqa: E402
from hdnas.mixed import MixedOp, available_backends, get_backend  # noqa: E402
from hdnas.model.space import DLSR_PRIMITIVES, OPS, get_op  # noqa: E402

DEFAULT_SEED = 20240608
WEIGHTINGS = ("softmax", "raw", "onehot", "zero")
LAYOUTS = ("contiguous", "channel_slice", "transposed", "channels_last")
#: the weights vector as a fresh tensor, a row of a (3, K) tensor (as the cell passes it, at a
#: storage offset) or a column of a (K, 3) one (strided)
WEIGHT_VIEWS = ("vector", "row", "column")
#: what the backward pass asks for (``backward(inputs=...)``): everything, or what an
#: architecture step (the weights) or a weight step (the parameters) needs, with or without x
TARGETS = ("all", "weights", "x,weights", "params", "x,params")
DTYPES = {"float64": torch.float64, "float32": torch.float32}
#: error bound, in units of the dtype's unit round-off times the magnitude of the terms
TOL_ULPS = 64
#: pre-activations closer to zero than this (same units) make the case's values be redrawn: 4x
#: the worst pre-activation error of the fp32 reference itself (3.5 u over 147 fp32 cases)
KINK_ULPS = 16
MAX_ATTEMPTS = 20
#: backends whose kernels are interpreted on a CPU (seconds per case): they get TINY cases there
INTERPRETED_ON_CPU = ("triton",)


@dataclasses.dataclass(frozen=True)
class Limits:
    """Upper bounds of a case's random sizes (each drawn uniformly from 1..bound); one case in
    WIDE_ODDS has a wide W (size+1..wide) instead, when ``wide`` is not 0."""

    ops: int
    batch: int
    channels: int
    size: int
    wide: int = 0


#: wide rows reach the vectorised code: the native CPU stencil works in blocks of 2 x 512 bits
#: (32 fp32, 16 fp64), then 1 x 512 bits, then a scalar tail; 72 = 2 blocks of 32 + 8
FULL = Limits(ops=len(OPS), batch=3, channels=16, size=9, wide=72)
TINY = Limits(ops=3, batch=2, channels=4, size=5)
WIDE_ODDS = 8
SIZES = {"full": FULL, "tiny": TINY}


def default_size(backend: str, device: str) -> str:
    return "tiny" if torch.device(device).type == "cpu" and backend in INTERPRETED_ON_CPU else "full"


@dataclasses.dataclass(frozen=True)
class Case:
    """One fuzz case; ``values_seed`` seeds every tensor value (inputs, parameters, cotangents)."""

    seed: int
    index: int
    size: str
    ops: tuple
    shape: tuple  # N, C, H, W
    dtype: str
    weighting: str
    layout: str
    pad: tuple  # channel_slice: (extra channels before, after) of the bigger tensor
    weights_view: str
    wpos: int  # the row / column of the weights in their (3, K) / (K, 3) tensor
    targets: str
    distill: bool
    distill_bias: bool
    values_seed: int

    def describe(self) -> str:
        lay = self.layout + (f"[+{self.pad[0]} before, +{self.pad[1]} after]"
                             if self.layout == "channel_slice" else "")
        dist = ("distill_step (bias)" if self.distill_bias else "distill_step (no bias)") \
            if self.distill else "mixed_op"
        wv = self.weights_view + (f" {self.wpos}" if self.weights_view != "vector" else "")
        return (f"ops={list(self.ops)} N,C,H,W={tuple(self.shape)} dtype={self.dtype} "
                f"weighting={self.weighting} ({wv}) layout={lay} {dist} gradients={self.targets} "
                f"size={self.size}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str) -> "Case":
        d = json.loads(text)
        try:
            d["ops"], d["shape"], d["pad"] = tuple(d["ops"]), tuple(d["shape"]), tuple(d["pad"])
            case = Case(**d)
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a fuzz case spec ({e}): {text}") from None
        if (case.dtype not in DTYPES or case.weighting not in WEIGHTINGS or case.layout not in
                LAYOUTS or case.weights_view not in WEIGHT_VIEWS or case.targets not in TARGETS):
            raise ValueError(f"bad dtype, weighting, layout, weights view or targets in the case "
                             f"spec: {text}")
        return case


def make_case(seed: int, index: int, size: str = "full") -> Case:
    """The case number ``index`` of the run seeded ``seed`` (stable across processes and runs:
    Python's ``random`` seeded with a string hashes it with SHA-512, not ``hash()``)."""
    lim = SIZES[size]
    rng = random.Random(f"hdnas-fuzz/{seed}/{index}/{size}")
    names = sorted(OPS)
    ops = tuple(rng.sample(names, rng.randint(1, min(lim.ops, len(names)))))
    shape = (rng.randint(1, lim.batch), rng.randint(1, lim.channels),
             rng.randint(1, lim.size), rng.randint(1, lim.size))
    if lim.wide and rng.randrange(WIDE_ODDS) == 0:
        shape = shape[:3] + (rng.randint(lim.size + 1, lim.wide),)
    layout = rng.choice(LAYOUTS)
    pad = (rng.randint(1, 3), rng.randint(0, 3)) if layout == "channel_slice" else (0, 0)
    distill = rng.random() < 0.5
    return Case(seed=seed, index=index, size=size, ops=ops, shape=shape,
                dtype=rng.choice(tuple(DTYPES)), weighting=rng.choice(WEIGHTINGS), layout=layout,
                pad=pad, weights_view=rng.choice(WEIGHT_VIEWS), wpos=rng.randint(0, 2),
                targets="all" if rng.random() < 0.5 else rng.choice(TARGETS[1:]),
                distill=distill, distill_bias=distill and rng.random() < 0.75,
                values_seed=rng.getrandbits(62))


# ---------------------------------------------------------------------------------------------
# Values

@dataclasses.dataclass
class Values:
    """The case's tensors in fp64 on the CPU, already rounded to the case's dtype."""

    base: torch.Tensor  # the tensor x is a view of (channel_slice: more channels; transposed: W, H)
    weights: torch.Tensor
    mixed: MixedOp
    distill: nn.Conv2d | None
    cotangents: list


def make_values(case: Case, attempt: int = 0) -> Values:
    gen = torch.Generator().manual_seed((case.values_seed + attempt * 0x9E3779B97F4A7C15) % 2**63)
    dtype = DTYPES[case.dtype]
    N, C, H, W = case.shape

    def randn(*shape, std=1.0):  # fp64 values exactly representable in the case's dtype
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(dtype).double()

    K = len(case.ops)
    if case.weighting == "softmax":
        w = F.softmax(randn(K) * 2, 0)
    elif case.weighting == "raw":
        w = randn(K)
    elif case.weighting == "onehot":
        w = torch.zeros(K, dtype=torch.float64)
        w[int(torch.randint(K, (1,), generator=gen))] = 1.0
    else:
        w = torch.zeros(K, dtype=torch.float64)
    w = w.to(dtype).double()

    mixed = MixedOp(C, case.ops).double()
    distill = None
    if case.distill:
        distill = nn.Conv2d(C, max(C // 2, 1), 1, bias=case.distill_bias).double()
    with torch.no_grad():
        for module in (mixed, distill):
            for p in module.parameters() if module is not None else ():
                p.copy_(randn(*p.shape, std=0.5))
    if case.layout == "channel_slice":
        base = randn(N, case.pad[0] + C + case.pad[1], H, W)
    elif case.layout == "transposed":
        base = randn(N, C, W, H)
    else:
        base = randn(N, C, H, W)
    out_shapes = [(N, C, H, W)]
    if case.distill:
        out_shapes.insert(0, (N, max(C // 2, 1), H, W))
    return Values(base, w, mixed, distill, [randn(*s) for s in out_shapes])


def _weights_base(case: Case, w: torch.Tensor) -> torch.Tensor:
    """The tensor the weights are a view of (other entries: 7s, which no gradient may reach)."""
    if case.weights_view == "row":
        base = w.new_full((3, w.numel()), 7.0)
        base[case.wpos] = w
        return base
    if case.weights_view == "column":
        base = w.new_full((w.numel(), 3), 7.0)
        base[:, case.wpos] = w
        return base
    return w


def _weights_view(case: Case, base: torch.Tensor) -> torch.Tensor:
    if case.weights_view == "row":
        return base[case.wpos]
    if case.weights_view == "column":
        return base[:, case.wpos]
    return base


def _x_view(case: Case, base: torch.Tensor) -> torch.Tensor:
    if case.layout == "channel_slice":
        return base[:, case.pad[0]:case.pad[0] + case.shape[1]]
    if case.layout == "transposed":
        return base.transpose(2, 3)
    return base


# ---------------------------------------------------------------------------------------------
# One run of one backend

def run_backend(backend, case: Case, values: Values, dtype, device, absolute=False, probe=None):
    """Forward (``mixed_op`` or ``distill_step``) and backward with the case's cotangents.
    Returns ({name: tensor} of outputs and gradients, [names of inputs modified in place]).
    ``absolute``: every value replaced by its absolute value. ``probe``: a list that receives
    every computed ReLU / LeakyReLU input (reference backend only: module hooks)."""
    def prep(t):
        t = t.abs() if absolute else t
        return t.to(device=device, dtype=dtype, copy=True)

    mixed = copy.deepcopy(values.mixed).to(device=device, dtype=dtype)
    distill = copy.deepcopy(values.distill)
    if distill is not None:
        distill = distill.to(device=device, dtype=dtype)
    modules = [("", mixed)] + ([("distill.", distill)] if distill is not None else [])
    params = [(pre + n, p) for pre, m in modules for n, p in m.named_parameters()]
    with torch.no_grad():
        for _, p in params:
            p.copy_(prep(p))
    base = prep(values.base)
    if case.layout == "channels_last":
        base = base.contiguous(memory_format=torch.channels_last)
    base.requires_grad_(True)
    wbase = _weights_base(case, prep(values.weights)).requires_grad_(True)
    w = _weights_view(case, wbase)
    x = _x_view(case, base)
    before = [("x", base.detach().clone()), ("weights", wbase.detach().clone())] + \
             [(n, p.detach().clone()) for n, p in params]

    hooks = []
    if probe is not None:
        def hook(module, inputs, output):
            if inputs[0] is not x:  # ReLU of x itself is exact in every backend
                probe.append(inputs[0].detach())
        hooks = [m.register_forward_hook(hook) for m in mixed.modules()
                 if isinstance(m, (nn.ReLU, nn.LeakyReLU))]
    try:
        if distill is None:
            outs = (backend.mixed_op(x, w, mixed),)
        else:
            outs = tuple(backend.distill_step(x, w, mixed, distill))
    finally:
        for h in hooks:
            h.remove()
    if probe is not None and distill is not None:  # the step's two LeakyReLU inputs
        with torch.no_grad():
            probe.append(distill(x))
            probe.append(backend.mixed_op(x, w, mixed) + x)
    if len(outs) != len(values.cotangents):
        raise AssertionError(f"{len(outs)} outputs, expected {len(values.cotangents)}")
    loss = sum((o * prep(g)).sum() for o, g in zip(outs, values.cotangents))
    leaves = {"x": [base], "weights": [wbase], "params": [p for _, p in params]}
    targets = [] if case.targets == "all" else case.targets.split(",")
    loss.backward(inputs=[t for k in targets for t in leaves[k]] or None)
    got = {f"output {i}": o.detach() for i, o in enumerate(outs)}
    if not targets or "x" in targets:
        got["grad x"] = base.grad
    if not targets or "weights" in targets:
        got["grad weights"] = wbase.grad
    if not targets or "params" in targets:
        for n, p in params:  # no gradient for a parameter: zero (as the reference does)
            got[f"grad {n}"] = p.grad if p.grad is not None else torch.zeros_like(p)
    after = {"x": base, "weights": wbase, **dict(params)}
    modified = [n for n, t in before if not torch.equal(t, after[n].detach())]
    return got, modified


# ---------------------------------------------------------------------------------------------
# Checking

def unit_roundoff(dtype) -> float:
    return torch.finfo(dtype).eps / 2


@dataclasses.dataclass
class Result:
    case: Case
    backend: str
    device: str
    status: str  # "ok", "mismatch", "crash", "skipped"
    detail: str = ""
    worst_ulps: float = 0.0  # max over elements of |got - truth| / (u * mag)
    attempts: int = 1
    kink_margin: float = math.inf  # min over pre-activations of |v| / (u * mag_v)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "skipped")

    def replay_command(self) -> str:
        size = "" if self.case.size == default_size(self.backend, self.device) else f" --size {self.case.size}"
        return (f"python bench/fuzz.py --seed {self.case.seed} --case {self.case.index} "
                f"--backend {self.backend} --device {self.device}{size}")

    def report(self) -> str:
        return (f"fuzz {self.status}: backend={self.backend} device={self.device} "
                f"seed={self.case.seed} case={self.case.index} (values attempt {self.attempts - 1})\n"
                f"  {self.case.describe()}\n  {self.detail}\n  replay: {self.replay_command()}\n"
                f"  spec: {self.case.to_json()}")


def _scale(m: torch.Tensor, bound: str) -> torch.Tensor:
    """The magnitude each element's error is measured against: its own (``elementwise``) or
    the largest of its tensor (``normwise``: for routes whose round-off spreads across a tensor,
    such as the FFT dense conv of hdnas.mixed.dense)."""
    if bound == "elementwise":
        return m
    if bound != "normwise":
        raise ValueError(f"bound {bound!r}: expected elementwise or normwise")
    return m.amax().expand_as(m) if m.numel() else m


def compare(got: dict, truth: dict, mag: dict, dtype,
            bound: str = "elementwise") -> tuple[float, list[str]]:
    """(worst |got - truth| / (u * mag) over all tensors, [one line per tensor out of bound])."""
    u = unit_roundoff(dtype)
    worst, bad = 0.0, []
    for name, want in truth.items():
        g = got.get(name)
        if g is None:
            bad.append(f"{name}: missing")
            continue
        if g.shape != want.shape or g.dtype != dtype:
            bad.append(f"{name}: shape {tuple(g.shape)} dtype {g.dtype}, expected "
                       f"{tuple(want.shape)} {dtype}")
            continue
        g64 = g.detach().to("cpu", torch.float64)
        err = (g64 - want).abs()
        m = _scale(mag[name], bound)
        ratio = torch.where(m > 0, err / (u * m), torch.where(err == 0, 0.0, math.inf))
        ratio = torch.where(torch.isnan(ratio), math.inf, ratio)  # NaN in got
        r = ratio.max().item() if ratio.numel() else 0.0
        worst = max(worst, r)
        if r > TOL_ULPS:
            i = int(ratio.flatten().argmax())
            idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), ratio.shape))
            n_bad = int((ratio > TOL_ULPS).sum())
            bad.append(f"{name}: {n_bad}/{ratio.numel()} elements out of bound; worst at {idx}: got "
                       f"{g64.flatten()[i].item():.9g}, want {want.flatten()[i].item():.9g}, "
                       f"|err| {err.flatten()[i].item():.3g} = {r:.3g} u * magnitude "
                       f"{m.flatten()[i].item():.3g} (bound {TOL_ULPS} u)")
    return worst, bad


REF = None


def _reference():
    global REF
    if REF is None:
        REF = get_backend("reference")
    return REF


def truth_of(case: Case, bound: str = "elementwise"):
    """(values, truth, magnitudes, attempts, kink margin) with values redrawn until no computed
    pre-activation is within KINK_ULPS of zero (see the module docstring); after MAX_ATTEMPTS
    draws, the draw with the largest margin (a mismatch report then names the margin)."""
    u = unit_roundoff(DTYPES[case.dtype])
    ref = _reference()
    best = None
    for attempt in range(MAX_ATTEMPTS):
        values = make_values(case, attempt)
        pre, pre_mag = [], []
        truth, _ = run_backend(ref, case, values, torch.float64, "cpu", probe=pre)
        mag, _ = run_backend(ref, case, values, torch.float64, "cpu", absolute=True, probe=pre_mag)
        margin = math.inf
        for v, m in zip(pre, pre_mag):
            r = v.abs() / (u * _scale(m, bound))
            r = r[v != 0]  # an exact zero (all its terms are zero) is zero in every backend
            if r.numel():
                margin = min(margin, r.min().item())
        if best is None or margin > best[4]:
            best = (values, truth, mag, attempt + 1, margin)
        if margin > KINK_ULPS:
            break
    return best


def run_case(seed: int, index: int, backend, device="cpu", size: str | None = None,
             case: Case | None = None, bound: str = "elementwise") -> Result:
    """Check one backend (a registered name or a Backend object) on case ``index``; ``bound``:
    each element against its own magnitude (default) or against its tensor's largest."""
    b = get_backend(backend) if isinstance(backend, str) else backend
    size = size or default_size(b.name, device)
    case = case or make_case(seed, index, size)
    dtype = DTYPES[case.dtype]
    t0 = time.perf_counter()
    why = b.unsupported_reason(case.ops, torch.device(device), dtype)
    if why is not None:
        return Result(case, b.name, device, "skipped", why)
    values, truth, mag, attempts, margin = truth_of(case, bound)
    res = Result(case, b.name, device, "ok", attempts=attempts, kink_margin=margin)
    try:
        got, modified = run_backend(b, case, values, dtype, device)
    except Exception as e:  # noqa: BLE001 - a crash is a finding, reported with its case
        res.status = "crash"
        res.detail = f"{type(e).__name__}: {e}".strip().replace("\n", "\n  ")
        res.seconds = time.perf_counter() - t0
        return res
    res.worst_ulps, bad = compare(got, truth, mag, dtype, bound)
    if modified:
        bad.append(f"inputs modified in place: {', '.join(modified)}")
    if bad:
        res.status = "mismatch"
        if margin <= KINK_ULPS:
            bad.append(f"(a ReLU input is only {margin:.3g} u from zero in all {MAX_ATTEMPTS} draws: "
                       f"a correct backend may take the other side of that kink)")
        res.detail = "\n  ".join(bad)
    res.seconds = time.perf_counter() - t0
    return res


def backends_for(device="cpu") -> list[str]:
    """Registered backends other than the reference that serve ``device`` (all ops, fp32 or
    fp64)."""
    _reference()  # loads the optional backends
    ops = DLSR_PRIMITIVES + ("skip_connect",)
    dev = torch.device(device)
    return [n for n in available_backends() if n != "reference" and any(
        get_backend(n).unsupported_reason(ops, dev, dt) is None for dt in DTYPES.values())]


# ---------------------------------------------------------------------------------------------
# Command line

def source_line() -> str:
    """The commit fuzzed and the files of the package that differ from it (uncommitted work)."""
    import subprocess

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")  # the checkout
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hdnas", "kernels", "csrc",
                                "setup.py"], cwd=root, check=True, capture_output=True,
                               text=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "source: not a git checkout"
    dirty = [line[3:] for line in dirty if line.strip()]
    return f"source: commit {head}" + (f" + uncommitted changes to {', '.join(dirty)}" if dirty else "")


def machine_line(device: str) -> str:
    try:
        import triton
        tri = triton.__version__
    except ImportError:
        tri = "not installed"
    dev = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "CPU"
    return (f"{datetime.date.today().isoformat()}; {dev}; CPU {machine.cpu_model()} ({os.cpu_count()} cores, vector ISA "
            f"{machine.vector_isa()}); torch {torch.__version__}, "
            f"triton {tri}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}, "
            f"Python {platform.python_version()}")


def _family_counts(results) -> str:
    fams = {}
    for r in results:
        for f in {get_op(n).family for n in r.case.ops}:
            fams[f] = fams.get(f, 0) + 1
    return ", ".join(f"{f} {fams.get(f, 0)}" for f in ("conv", "sep", "dil", "skip"))


def summary(per_backend: dict, seed: int, device: str, argv, source: str) -> str:
    lines = [f"`python bench/fuzz.py {' '.join(argv)}` (seed {seed})", "",
             f"machine: {machine_line(device)}", "", source, "",
             f"bound: |got - fp64 reference| <= {TOL_ULPS} u x magnitude, elementwise "
             f"(u = {unit_roundoff(torch.float32):.3g} fp32, {unit_roundoff(torch.float64):.3g} "
             f"fp64); values redrawn when a ReLU input is within {KINK_ULPS} u of zero", "",
             "| backend | size | cases | skipped | mismatches | crashes | worst fp64 (u) | "
             "worst fp32 (u) | redraws | near a kink | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    failures = []
    for name, (results, secs, size) in per_backend.items():
        ran = [r for r in results if r.status != "skipped"]
        worst = {dt: max((r.worst_ulps for r in ran if r.case.dtype == dt), default=0.0)
                 for dt in ("float64", "float32")}
        lines.append(
            f"| {name} | {size} | {len(ran)} | {len(results) - len(ran)} | "
            f"{sum(r.status == 'mismatch' for r in ran)} | {sum(r.status == 'crash' for r in ran)} | "
            f"{worst['float64']:.3g} | {worst['float32']:.3g} | "
            f"{sum(r.attempts - 1 for r in ran)} | "
            f"{sum(r.kink_margin <= KINK_ULPS for r in ran)} | {secs:.0f} |")
        failures += [r for r in ran if not r.ok]
    lines.append("")
    for name, (results, _, _) in per_backend.items():
        ran = [r for r in results if r.status != "skipped"]
        if ran:
            lines.append(f"{name}: cases per op family: {_family_counts(ran)}; distill_step "
                         f"{sum(r.case.distill for r in ran)}, fp32 "
                         f"{sum(r.case.dtype == 'float32' for r in ran)}")
    if failures:
        lines += ["", f"## Failures ({len(failures)})", ""]
        for r in failures[:20]:
            lines += ["```", r.report(), "```"]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", action="append", default=None,
                   help="backend to fuzz (repeatable); default: every one that serves the device")
    p.add_argument("--cases", type=int, default=200, help="cases per backend")
    p.add_argument("--start", type=int, default=0, help="first case index")
    p.add_argument("--case", type=int, default=None, help="replay this one case, verbose")
    p.add_argument("--spec", default=None, help="replay this case spec (JSON, as a report prints it)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", choices=tuple(SIZES), default=None,
                   help="case size limits (default: tiny for interpreted backends, else full)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop a backend's run after this many seconds (the table says how many ran)")
    p.add_argument("--out", default=None, help="also write the Markdown summary here")
    a = p.parse_args(argv)
    if a.cases < 0 or a.start < 0:
        p.error("--cases and --start must be >= 0")
    if torch.device(a.device).type == "cuda":  # compare real fp32, not TF32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    names = a.backend or backends_for(a.device)
    for n in names:
        get_backend(n)  # an unknown name: a clear error listing the known ones

    if a.case is not None or a.spec is not None:
        case = Case.from_json(a.spec) if a.spec is not None else None
        failed = False
        for n in names:
            r = run_case(a.seed, a.case if case is None else case.index, n, a.device, a.size, case)
            print(r.report())
            print(f"  worst error {r.worst_ulps:.3g} u (bound {TOL_ULPS}), closest ReLU input "
                  f"{r.kink_margin:.3g} u from zero, {r.seconds:.2f} s")
            if r.status == "crash":  # rerun outside the harness for the traceback
                traceback.print_exception(*_crash_info(r))
            failed |= not r.ok
        return 1 if failed else 0

    source = source_line()  # at the start: the tree may change during a long run
    per_backend = {}
    for n in names:
        size = a.size or default_size(n, a.device)
        results, t0 = [], time.perf_counter()
        for i in range(a.start, a.start + a.cases):
            if a.time_limit is not None and time.perf_counter() - t0 > a.time_limit:
                break
            r = run_case(a.seed, i, n, a.device, size)
            results.append(r)
            if not r.ok:
                print(r.report(), file=sys.stderr, flush=True)
            if (len(results)) % 100 == 0:
                print(f"{n}: {len(results)} cases, {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr, flush=True)
        per_backend[n] = (results, time.perf_counter() - t0, size)
    text = summary(per_backend, a.seed, a.device, argv, source)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0 if all(r.ok for res, _, _ in per_backend.values() for r in res) else 1


def _crash_info(r: Result):
    """Run the crashed case's backend call again outside the try to get its traceback."""
    b = get_backend(r.backend)
    values = truth_of(r.case)[0]
    try:
        run_backend(b, r.case, values, DTYPES[r.case.dtype], r.device)
    except Exception as e:  # noqa: BLE001
        return type(e), e, e.__traceback__
    return RuntimeError, RuntimeError("the crash did not repeat"), None


if __name__ == "__main__":
    sys.exit(main())
