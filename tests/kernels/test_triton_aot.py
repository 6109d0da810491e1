"""Ahead-of-time compilation of the Triton kernels for sm_90 (H100) on this CPU machine
(``python -m hdnas.kernels.aot`` in a subprocess without TRITON_INTERPRET): fails on compile
errors (unsupported ops, out of resources...) and on register spills (a stack frame, STACK > 0,
or LOCAL > 0 in cuobjdump's resource usage), which the interpreter cannot catch.

The matrix is every config a DLSR or DARTS search launches (``hdnas.kernels.aot.configs``);
``test_launches_are_in_the_matrix`` checks it against the launches of a real DLSR step. CI
compiles one config of every kernel x dtype x mode (rotated by the git commit) plus every
config already in the cache (``$HDNAS_CACHE_DIR/triton_aot``), so a warm rerun checks the whole
matrix; ``HDNAS_AOT_FULL=1`` compiles all of it (the GPU command does: ``--all``). Skips
cleanly when the CUDA toolchain bundled with triton cannot run here."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from hdnas.kernels import aot  # noqa: E402
from hdnas.darts.launches import dw_launch_sites  # noqa: E402


def _aot(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    p = subprocess.run([sys.executable, "-m", "hdnas.kernels.aot", *args], capture_output=True,
                       text=True, env=env, timeout=3600)
    recs = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode == 2:
        why = recs[-1].get("error") if recs else p.stderr[-500:]
        pytest.skip(f"cannot AOT-compile here: {why}")
    if not recs:
        pytest.fail(f"AOT compiler produced nothing (rc {p.returncode}): {p.stderr[-2000:]}")
    bad = [f"{r['kernel']} {r['dtype']} {r['constexprs']}: "
           + (r["error"] if "error" in r else f"spills: {r['usage']}")
           for r in recs if aot.failed(r)]
    assert not bad, "\n".join(bad)
    assert p.returncode == 0, p.stderr[-2000:]
    return recs


def test_aot_sm90_search_configs():
    """Every kernel x dtype x mode of the search matrix compiles for sm_90 without spilling
    (one slot size each, rotated; all of them with HDNAS_AOT_FULL=1 or once cached)."""
    full = os.environ.get("HDNAS_AOT_FULL") == "1"
    recs = _aot() if full else _aot("--rotate")
    cfgs = aot.configs(dw_launch_sites(), "search")
    seen = {(r["kernel"], r["dtype"], tuple(r["constexprs"].items())) for r in recs}
    want = {(c.kernel, c.dtype, tuple((k, str(v)) for k, v in c.constexprs)) for c in cfgs}
    assert seen <= want
    covered = {c.group for c in cfgs
               if (c.kernel, c.dtype, tuple((k, str(v)) for k, v in c.constexprs)) in seen}
    assert covered == {c.group for c in cfgs}
    if full:
        assert seen == want


# --- the matrix ---------------------------------------------------------------------------
def _mode(kernel, kw):
    return tuple(sorted((k, str(v)) for k, v in kw.items()
                        if k in ("KMAX", "RELU", "SHARED", "HAS2", "HAS_ADD", "HAS_RES", "LRELU",
                                 "STORE_GPRE")))


_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.float64: "fp64"}


class _Recorder:
    """Wraps a kernel object: records (kernel, dtype, mode) of every launch, then launches."""

    def __init__(self, name, fn, log):
        self.name, self.fn, self.log = name, fn, log

    def __getitem__(self, grid):
        launch = self.fn[grid]

        def run(*args, **kw):
            self.log.add((self.name, _DTYPE_NAMES[args[0].dtype], _mode(self.name, kw)))
            return launch(*args, **kw)
        return run


def _matrix_modes(scope="search"):
    return {(c.kernel, c.dtype, _mode(c.kernel, dict(c.constexprs))) for c in aot.configs(dw_launch_sites(), scope)}


def test_launches_are_in_the_matrix(monkeypatch):
    """A DLSR distillation step with the Triton backend (interpreter, tiny shapes), forward and
    backward, in fp32 and under fp16 autocast (bf16 is not emulated; it takes fp16's path). Every
    kernel launch (kernel, dtype, code-path constexprs) is in the compiled matrix, and the
    distillation step's launches are all there (so the matrix is not a superset by accident)."""
    from hdnas.mixed import get_backend
    from hdnas.model.mixed_op import MixedOp
    from hdnas.model.space import DLSR_PRIMITIVES

    ops_mod = pytest.importorskip("hdnas.kernels.ops")
    if not ops_mod.interpreting():
        pytest.skip("needs Triton's interpreter (tests/conftest.py sets it without a GPU)")
    from hdnas.kernels import dw, epilogue
    monkeypatch.setattr(ops_mod, "interpreting", lambda: True)  # it looks at the kernel's type
    log: set = set()
    for mod in (dw, epilogue):
        for name in ("_dw_taps_fwd", "_dw_taps_bwd_dx", "_dw_taps_bwd_dk", "_epi_fwd",
                     "_epi_bwd_dz", "_epi_bwd_dw"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, _Recorder(name, getattr(mod, name), log))
    backend = get_backend("triton")
    gen = torch.Generator().manual_seed(0)
    C = 4
    mixed = MixedOp(C, DLSR_PRIMITIVES)
    distill = torch.nn.Conv2d(C, C // 2, 1)
    w = torch.softmax(torch.randn(len(DLSR_PRIMITIVES), generator=gen), 0).requires_grad_(True)
    x = torch.randn(1, C, 6, 6, generator=gen, requires_grad=True)
    for amp in (None, torch.float16):
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            d, r = backend.distill_step(x, w, mixed, distill)
        (d.float().sum() + r.float().sum()).backward()
    launched = set(log)
    assert launched, "no Triton kernel was launched: is the backend still the Triton one?"
    missing = launched - _matrix_modes()
    assert not missing, f"launched but not in hdnas.kernels.aot.configs: {sorted(missing)}"
    kernels = {k for k, _, _ in launched}
    assert kernels == set(aot._MODULES), kernels
    assert {dt for _, dt, _ in launched} == {"fp32", "fp16"}


def test_matrix_slot_sizes():
    """The slot sizes follow the op sets: dilation is applied in the kernel, so grouped_dw's
    slot is the largest kernel size (7 for DLSR, 5 for DARTS); mixed_dw's union kernel spans
    the dilated extent (dil_conv_5x5 at dilation 2: 9)."""
    sites = {use: (K, relu, shared) for use, K, relu, shared in dw_launch_sites()}
    assert sites["DLSR stage 1 (grouped_dw)"] == (7, True, True)
    assert sites["DLSR stage 2 (grouped_dw)"] == (7, True, False)
    assert sites["DARTS stage 1 (grouped_dw)"] == (5, True, True)
    assert sites["DARTS mixed_dw"] == (9, True, True)
    search, full = aot.configs(dw_launch_sites(), "search"), aot.configs(dw_launch_sites(), "all")
    assert {c.dtype for c in search} == {"fp32", "fp16", "bf16"}
    assert all(c.required for c in search)
    extra = [c for c in full if c not in set(search)]
    assert extra and {c.dtype for c in extra} == {"fp64"} and not any(c.required for c in extra)
    assert len(set(search)) == len(search)  # no config twice
    with pytest.raises(ValueError, match="scope"):
        aot.configs(dw_launch_sites(), "everything")


def test_rotation_covers_every_group_once():
    cfgs = aot.configs(dw_launch_sites(), "search")
    groups = {c.group for c in cfgs}
    picks = [aot.rotation(cfgs, key) for key in ("a", "b", "c", 7)]
    for p in picks:
        assert sorted(c.group for c in p) == sorted(groups)
    assert aot.rotation(cfgs, "a") == picks[0]  # deterministic
    # over enough keys every config is chosen once: the union is the whole matrix
    union = set()
    for key in range(64):
        union |= set(aot.rotation(cfgs, key))
    assert union == set(cfgs)


def test_failure_rules_and_table():
    """A spill fails a search config, not a check-only one; an error always fails. The table
    has one row per record with the usage and the status."""
    ok = {"STACK": 0, "LOCAL": 0, "REG": 100, "SHARED": 0}
    spill = {"STACK": 8, "LOCAL": 0, "REG": 255, "SHARED": 0}
    c = aot.configs(dw_launch_sites(), "search")[0].describe()
    recs = [{**c, "usage": ok}, {**c, "usage": spill}, {**c, "usage": spill, "required": False},
            {**c, "error": "boom"}, {**c, "usage": {**ok, "LOCAL": 4}}]
    assert [aot.failed(r) for r in recs] == [False, True, False, True, True]
    table = aot.format_table(recs, 90, "9.9.9", "2000-01-02")
    rows = [line for line in table.splitlines() if line.startswith("| _")]
    assert len(rows) == len(recs)
    assert [row.split(" | ")[9] for row in rows] == ["ok", "SPILL", "spill (check only)",
                                                      "ERROR", "SPILL"]
    assert "| 255 | 8 |" in rows[1] and "triton 9.9.9, 2000-01-02" in table
    assert "5 configs, 3 failing." in table


def test_cache_key_and_cached_result(tmp_path, monkeypatch):
    """The cache key changes with the config, the triton version, the target and the kernel's
    source; a cached result is returned without compiling."""
    monkeypatch.setenv("HDNAS_CACHE_DIR", str(tmp_path))
    a, b = aot.configs(dw_launch_sites(), "search")[:2]
    k = aot.cache_key(a, 90, "3.9.0")
    assert k == aot.cache_key(a, 90, "3.9.0")
    assert len({k, aot.cache_key(b, 90, "3.9.0"), aot.cache_key(a, 100, "3.9.0"),
                aot.cache_key(a, 90, "3.8.0")}) == 4
    src = aot._module_source(a.kernel)
    monkeypatch.setattr(aot, "_module_source", lambda kernel: src + "\n# edited")
    assert aot.cache_key(a, 90, "3.9.0") != k
    monkeypatch.undo()
    monkeypatch.setenv("HDNAS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tc = aot._toolchain()
    if isinstance(tc, str):
        pytest.skip(tc)
    usage = {"REG": 42, "STACK": 0, "SHARED": 0, "LOCAL": 0}
    path = tmp_path / "triton_aot" / (aot.cache_key(a, 90, tc[0]) + ".json")
    path.parent.mkdir()
    path.write_text(json.dumps({"usage": usage}))
    monkeypatch.setattr(aot, "compile_one", lambda *a_: pytest.fail("compiled a cached config"))
    (rec,) = aot.compile_all([a], 90, jobs=1)
    assert rec["cached"] and rec["usage"] == usage and rec["kernel"] == a.kernel
