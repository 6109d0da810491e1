"""Fuzz every registered mixed-op backend that serves the device against the reference.

The harness is hdnas.testing.fuzz (its docstring says what a case is and how it is checked). Here: a
fixed seed and a few dozen cases per backend (tiny ones for backends interpreted on a CPU), plus
tests that the harness itself catches wrong backends. Longer runs::

    HDNAS_FUZZ_CASES=2000 HDNAS_FUZZ_SEED=7 python -m pytest -q tests/mixed/test_fuzz.py -k merged

A failure prints the case and the command that replays it (``python bench/fuzz.py --case I``).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from hdnas.mixed import Backend, get_backend
from hdnas.model.space import OPS, get_op
from hdnas.testing import fuzz


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise pytest.UsageError(f"{name} must be a non-negative integer, got {text!r}")
    return value


SEED = _env_int("HDNAS_FUZZ_SEED", fuzz.DEFAULT_SEED)
#: cases per backend in CI (about 0.1 s each compiled, 0.8 s for a tiny interpreted one)
CI_CASES = {"merged": 40, "native": 40}
CI_CASES_INTERPRETED = 10
CI_CASES_OTHER = 20
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _count(backend: str, device: str) -> int:
    if fuzz.default_size(backend, device) == "tiny":
        default = CI_CASES_INTERPRETED
    else:
        default = CI_CASES.get(backend, CI_CASES_OTHER)
    return _env_int("HDNAS_FUZZ_CASES", default)


CASES = [(d, b, i) for d in DEVICES for b in fuzz.backends_for(d) for i in range(_count(b, d))]


@pytest.mark.parametrize("device,backend,index", CASES,
                         ids=[f"{d}-{b}-{i}" for d, b, i in CASES])
def test_fuzz(device, backend, index):
    r = fuzz.run_case(SEED, index, backend, device)
    if r.status == "skipped":
        pytest.skip(f"{backend}: {r.detail}")
    assert r.ok, r.report()


def test_backends_discovered():
    """The fuzz covers what the registry serves on a CPU: merged; triton under the interpreter;
    native when its extension is built (required when HDNAS_REQUIRE_NATIVE=1, as in CI)."""
    names = fuzz.backends_for("cpu")
    assert "merged" in names, names
    if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton"):
        assert "triton" in names, names
    if "native" not in names:
        if os.environ.get("HDNAS_REQUIRE_NATIVE") == "1":
            pytest.fail(f"native backend not fuzzed (HDNAS_REQUIRE_NATIVE=1): {names}")
        pytest.skip("the native extension is not available here")


# --- the cases ---------------------------------------------------------------------------------
def test_ci_cases_cover_the_space():
    """The first CI_CASES cases of the default seed reach every op, family, weighting, weights
    view, layout, dtype, gradient target set, both entry points and each size 1 (a different seed may not: that is what
    HDNAS_FUZZ_CASES is for)."""
    cases = [fuzz.make_case(fuzz.DEFAULT_SEED, i) for i in range(min(CI_CASES.values()))]
    assert {n for c in cases for n in c.ops} == set(OPS)
    assert {get_op(n).family for c in cases for n in c.ops} == {"conv", "sep", "dil", "skip"}
    assert {c.weighting for c in cases} == set(fuzz.WEIGHTINGS)
    assert {c.layout for c in cases} == set(fuzz.LAYOUTS)
    assert {c.weights_view for c in cases} == set(fuzz.WEIGHT_VIEWS)
    assert {c.targets for c in cases} == set(fuzz.TARGETS)
    assert {c.dtype for c in cases} == set(fuzz.DTYPES)
    assert {c.distill for c in cases} == {True, False}
    assert {c.distill_bias for c in cases if c.distill} == {True, False}
    for dim in range(4):
        assert 1 in {c.shape[dim] for c in cases}, f"no case with size 1 in dim {dim}"
    assert any(c.shape[3] >= 32 + 16 and c.dtype == "float32" for c in cases), \
        "no fp32 case reaches the 2- and 1-vector blocks of a 512-bit row stencil"
    tiny = [fuzz.make_case(fuzz.DEFAULT_SEED, i, "tiny") for i in range(CI_CASES_INTERPRETED)]
    assert {get_op(n).family for c in tiny for n in c.ops} == {"conv", "sep", "dil", "skip"}
    for c in tiny:
        lim = fuzz.TINY
        assert len(c.ops) <= lim.ops and c.shape[0] <= lim.batch and c.shape[1] <= lim.channels
        assert max(c.shape[2:]) <= lim.size


def test_cases_are_reproducible():
    """A case and its values depend on (seed, index) only: the same in another process with
    another PYTHONHASHSEED, through the JSON spec, and tensor for tensor."""
    specs = [fuzz.make_case(3, i).to_json() for i in range(5)]
    code = ("import json\n"
            "from hdnas.testing import fuzz as f\n"
            "print(json.dumps([f.make_case(3, i).to_json() for i in range(5)]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    assert json.loads(out.strip().splitlines()[-1]) == specs
    case = fuzz.make_case(3, 0)
    assert fuzz.Case.from_json(case.to_json()) == case
    assert fuzz.make_case(3, 1) != case and fuzz.make_case(4, 0) != case
    a, b = fuzz.make_values(case), fuzz.make_values(case)
    assert torch.equal(a.base, b.base) and torch.equal(a.weights, b.weights)
    for p, q in zip(a.mixed.parameters(), b.mixed.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(fuzz.make_values(case, attempt=1).base, a.base)


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match="not a fuzz case spec"):
        fuzz.Case.from_json('{"seed": 1}')
    spec = json.loads(fuzz.make_case(0, 0).to_json())
    spec["layout"] = "diagonal"
    with pytest.raises(ValueError, match="bad dtype, weighting, layout"):
        fuzz.Case.from_json(json.dumps(spec))


# --- the harness catches wrong backends ----------------------------------------------------------
REF = get_backend("reference")


class _Wrong(Backend):
    """The reference with one defect (``kind``)."""

    def __init__(self, kind, eps=0.0):
        self.name, self.kind, self.eps = f"wrong-{kind}", kind, eps

    def mixed_op(self, x, weights, mixed):
        if self.kind == "drop_last":  # a wrong sum: the last candidate is left out
            return sum(w * op(x) for w, op in zip(weights[:-1], mixed.ops[:-1])) + 0 * weights[-1]
        y = REF.mixed_op(x, weights, mixed)
        if self.kind == "scale":  # output off by a relative eps
            return y * (1 + self.eps)
        if self.kind == "grad_x":  # exact output, dL/dx off by eps * cotangent
            return y + self.eps * (x - x.detach())
        if self.kind == "in_place":
            with torch.no_grad():
                weights.data[0] += 1  # .data: no version bump, backward still runs
            return y
        if self.kind == "raise":
            raise RuntimeError("kernel launch failed")
        raise AssertionError(self.kind)


def _case(index=0, **fields):
    fields = {"targets": "all", **fields}
    return dataclasses.replace(fuzz.make_case(SEED, index), **fields)


def test_bound_is_tight_both_ways():
    """skip_connect alone with signed weights: y = w x, every element's magnitude is |w x|, so a
    relative error of 2 TOL_ULPS u must fail and one of TOL_ULPS u / 4 must pass, in both
    dtypes."""
    for dtype in ("float32", "float64"):
        case = _case(ops=("skip_connect",), weighting="raw", distill=False, dtype=dtype)
        u = fuzz.unit_roundoff(fuzz.DTYPES[dtype])
        bad = fuzz.run_case(SEED, 0, _Wrong("scale", 2 * fuzz.TOL_ULPS * u), case=case)
        assert bad.status == "mismatch" and "output 0" in bad.detail, bad.report()
        good = fuzz.run_case(SEED, 0, _Wrong("scale", fuzz.TOL_ULPS * u / 4), case=case)
        assert good.status == "ok", good.report()
        assert fuzz.TOL_ULPS / 8 < good.worst_ulps <= fuzz.TOL_ULPS / 4 + 2  # + two roundings


@pytest.mark.parametrize("distill", [False, True])
def test_wrong_sum_is_caught(distill):
    case = _case(ops=("sep_conv_3x3", "conv_3x3", "dil_conv_5x5"), weighting="softmax",
                 distill=distill, distill_bias=distill)
    r = fuzz.run_case(SEED, 0, _Wrong("drop_last"), case=case)
    assert r.status == "mismatch", r.report()
    assert "grad ops.2.op.1.weight" in r.detail  # the dropped op's depthwise kernel


def test_wrong_gradient_is_caught():
    case = _case(ops=("conv_1x1", "sep_conv_5x5"), dtype="float64", distill=False)
    r = fuzz.run_case(SEED, 0, _Wrong("grad_x", 1e-9), case=case)
    assert r.status == "mismatch" and "grad x" in r.detail and "output" not in r.detail, r.report()


def test_in_place_modification_is_caught():
    r = fuzz.run_case(SEED, 0, _Wrong("in_place"), case=_case(distill=False))
    assert r.status == "mismatch" and "modified in place: weights" in r.detail, r.report()


def test_crash_report_replays():
    """A crash is a finding with the whole case and a replay command in its report."""
    case = _case(index=7)
    r = fuzz.run_case(SEED, 7, _Wrong("raise"), case=case)
    assert r.status == "crash" and "kernel launch failed" in r.detail
    text = r.report()
    for part in (f"seed={SEED}", "case=7", str(list(case.ops)), case.dtype, case.layout,
                 case.weighting, f"--seed {SEED} --case 7 --backend wrong-raise", case.to_json()):
        assert part in text, (part, text)


def test_kink_redraw_gives_up_clearly(monkeypatch):
    """When every draw has a ReLU input near zero, the case still runs, and a mismatch says so."""
    monkeypatch.setattr(fuzz, "KINK_ULPS", float("inf"))
    monkeypatch.setattr(fuzz, "MAX_ATTEMPTS", 2)
    case = _case(ops=("sep_conv_3x3",), dtype="float32", distill=False)
    assert fuzz.truth_of(case)[3] == 2
    r = fuzz.run_case(SEED, 0, _Wrong("drop_last"), case=case)
    assert r.status == "mismatch" and "from zero in all 2 draws" in r.detail, r.report()
    assert r.attempts == 2


def test_replay_command_line(capsys):
    assert fuzz.main(["--seed", str(SEED), "--case", "3", "--backend", "merged"]) == 0
    out = capsys.readouterr().out
    assert "fuzz ok: backend=merged" in out and str(list(fuzz.make_case(SEED, 3).ops)) in out
    spec = fuzz.make_case(SEED, 4).to_json()
    assert fuzz.main(["--spec", spec, "--backend", "merged"]) == 0
    assert "case=4" in capsys.readouterr().out
    assert fuzz.main(["--cases", "2", "--backend", "merged"]) == 0
    assert "| merged | full | 2 | 0 | 0 | 0 |" in capsys.readouterr().out


def test_magnitudes_bound_the_truth():
    """The bound's base: the reference run on absolute values is >= |truth| everywhere (it is
    the sum of the magnitudes of each element's terms)."""
    for i in range(6):
        case = fuzz.make_case(SEED, i)
        _, truth, mag, _, _ = fuzz.truth_of(case)
        assert set(truth) == set(mag)
        for name in truth:
            assert (mag[name] >= truth[name].abs() * (1 - 1e-12)).all(), (name, case.describe())


def test_kink_margin_exceeds_fp32_preactivation_error():
    """KINK_ULPS is a margin over how far a correct fp32 computation puts a ReLU input: the
    reference's own fp32 pre-activations stay within KINK_ULPS / 2 of the fp64 ones."""
    u = fuzz.unit_roundoff(torch.float32)
    worst, n = 0.0, 0
    for i in range(40):
        case = fuzz.make_case(SEED, i)
        if case.dtype != "float32" or not ({"sep"} & {get_op(o).family for o in case.ops}
                                           or case.distill):
            continue
        values = fuzz.make_values(case)
        pre64, pre32, mag = [], [], []
        fuzz.run_backend(REF, case, values, torch.float64, "cpu", probe=pre64)
        fuzz.run_backend(REF, case, values, torch.float32, "cpu", probe=pre32)
        fuzz.run_backend(REF, case, values, torch.float64, "cpu", absolute=True, probe=mag)
        for a, b, m in zip(pre64, pre32, mag):
            ok = m > 0
            worst = max(worst, ((b.double() - a).abs()[ok] / (u * m[ok])).max().item())
        n += 1
    assert n >= 10
    assert 0 < worst <= fuzz.KINK_ULPS / 2
