"""``python -m bench.gpu`` on the CPU: the dry run goes through every section on tiny shapes with
the CPU backends, checks can FAIL (a broken backend is caught and not timed, exit status 1),
the results are written as JSON and Markdown, the sanitizer runs are parsed. No timing asserts.
"""
from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from bench import bytes_model, gpu, gpu_check, gpu_time
from hdnas.darts.batchnorm import RunState
from hdnas.mixed.merged import DecomposedBackend
from hdnas.mixed.primitives import Primitives, grouped_dw_ref, mixed_dw_ref

ROOT = Path(__file__).resolve().parents[2]


def _native_or_skip():
    from hdnas.mixed import native
    if not native.available("cpu"):
        pytest.skip("native CPU kernels unavailable")


def _one(tmp: Path, suffix: str) -> Path:
    files = list(tmp.glob(f"*{suffix}"))
    assert len(files) == 1, files
    return files[0]


def test_dry_run_all_sections(tmp_path, capsys):
    _native_or_skip()
    rc = gpu.main(["--dry-run", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    data = json.loads(_one(tmp_path, ".json").read_text())
    for key in ("environment", "plan", "checks", "sanitize", "copy", "time", "sweep_ops",
                "sweep_sizes", "projection", "sections", "notes"):
        assert key in data, key
    for key in ("date", "torch", "triton", "cuda", "python", "gpu", "driver", "commit"):
        assert key in data["environment"], key
    assert {s: v["status"] for s, v in data["sections"].items()} == dict.fromkeys(
        ("checks", "sanitize", "time", "sweeps"), "done")
    checks = data["checks"]
    assert checks and all(r["status"] == "PASS" for r in checks), [r for r in checks if r["status"] != "PASS"]
    assert {r["level"] for r in checks} == {"primitive", "op", "net"}
    assert {r["backend"] for r in checks} == {"merged", "native"}
    assert {"fp64", "fp32", "autocast_bf16"} <= {r["mode"] for r in checks}
    assert any("channel_slice" in r["case"] for r in checks)
    # compute-sanitizer is not on a CI machine's PATH: SKIP, never PASS
    assert data["sanitize"] and all(r["status"] == "SKIP" for r in data["sanitize"])
    cases = {r["case"] for r in data["time"]}
    assert {"mixed_op fwd", "mixed_op fwd+bwd", "distill_step fwd+bwd", "search_step joint",
            "search_step darts1", "grouped_dw.shared fwd+bwd", "mixed_dw.skip fwd"} <= cases
    ok = [r for r in data["time"] if r["status"] == "ok"]
    assert {r["backend"] for r in ok} == {"reference", "merged", "native"}
    steps = [r for r in ok if r["case"].startswith("search_step")]
    assert all(set(r["parts_ms"]) == {"weight", "arch"} for r in steps)
    assert all(r["ms"] > 0 and r["reps"] >= 1 for r in ok)
    roof = [r for r in ok if "roofline_share" in r]
    assert {r["case"] for r in roof} >= {"grouped_dw.shared fwd", "mixed_op fwd+bwd"}
    assert {r["ops"] for r in data["sweep_ops"]} == set(data["plan"]["op_counts"])
    assert {r["size"] for r in data["sweep_sizes"]} == set(data["plan"]["sizes"])
    assert {(p["backend"], p["rule"]) for p in data["projection"]} == {
        (b, r) for b in ("reference", "merged", "native") for r in ("joint", "darts1")}
    md = _one(tmp_path, ".md").read_text()
    for head in ("# bench.gpu (dry-run)", "## Checks against the reference", "## compute-sanitizer",
                 "## Timings", "### Bandwidth from the byte model", "## Sweep: number of candidate ops",
                 "## Sweep: image size", "## The paper's whole search, projected"):
        assert head in md, head
    # PASS lines come before any timing; the summary is printed last
    assert out.index("PASS") < out.index("== timing")
    assert out.rindex("== summary ==") > out.index("== sweeps")
    assert "| native |" in out.split("== summary ==")[1]
    # the DARTS provider (bench/gpu_darts.py): swapped op vs plain loop, checked then timed
    darts = [r for r in checks if r["case"].startswith("DARTS")]
    assert {(r["case"], r["backend"], r["mode"]) for r in darts} == {
        (c, b, m) for c in ("DARTS op s1", "DARTS op s2") for b in ("merged", "native")
        for m in ("fp64", "fp32")} | {("DARTS net", b, "fp64") for b in ("merged", "native")}
    dt = [r for r in ok if r["case"].startswith("DARTS")]
    assert {(r["case"].split(" (")[0], r["backend"]) for r in dt} == {
        (c, b) for c in ("DARTS step", "DARTS op s1 fwd+bwd", "DARTS op s2 fwd+bwd")
        for b in ("reference", "merged", "native")}
    assert "| DARTS step (C4, 3 cells of 2 nodes, 8x8) |" in md
    # the torch.compile provider (bench/gpu_compile.py): a compiled weight step per backend,
    # its compilation time and graph breaks in the notes
    comp = [r for r in ok if r["case"] == "weight_step compiled (aot_eager)"]
    assert {r["backend"] for r in comp} == {"reference", "merged", "native"}
    notes = [n for n in data["notes"] if n.startswith("torch.compile (aot_eager)")]
    assert len(notes) == 3 and all("graph break" in n for n in notes)


def _broken():
    def bad_grouped(x, kernels, ksizes, dilations, relu_input, shared_input):
        return grouped_dw_ref(x, kernels, ksizes, dilations, relu_input, shared_input) * 1.001

    def bad_mixed(x, weights, kernels, ksizes, dilations, relu_input, skip_weight=None):
        return mixed_dw_ref(x, weights, kernels, ksizes, dilations, relu_input, skip_weight) * 1.001

    return DecomposedBackend("broken", Primitives("broken", bad_grouped, bad_mixed), priority=-1)


def test_broken_backend_fails_and_is_not_timed(tmp_path, capsys):
    """A 0.1% error in the depthwise stages FAILs every level (primitive, op, supernet) in
    fp64 and fp32; the run goes on, does not time that backend, and exits 1."""
    rc = gpu.main(["--dry-run", "--out", str(tmp_path), "--backends", "reference",
                   "--sections", "checks,time", "--cases", "grouped_dw.shared,mixed_op,supernet"],
                  extra_backends=[_broken()])
    out = capsys.readouterr().out
    assert rc == 1
    data = json.loads(_one(tmp_path, ".json").read_text())
    # (bf16 autocast cannot see a 0.1% error: its unit round-off is 0.4%)
    bad = [r for r in data["checks"] if r["backend"] == "broken" and r["mode"] in ("fp64", "fp32")]
    assert bad and all(r["status"] == "FAIL" for r in bad), bad
    assert {r["level"] for r in bad} == {"primitive", "op", "net"}
    assert {r["mode"] for r in bad} == {"fp64", "fp32"}
    assert "FAIL  broken" in out and "failed: broken" in out
    timed = {r["backend"] for r in data["time"]}
    assert timed == {"reference"} and data["time"]
    assert "broken: not timed (a check failed)" in data["notes"]


class _AlwaysFirst(RunState):
    """A ``_RunState`` that never leaves its first run: the recomputation in backward updates
    the BN running statistics a second time (outputs and gradients stay right)."""
    first = property(lambda self: True, lambda self, value: None)


@pytest.mark.parametrize("breakage", ["pointwise", "bn_twice"])
def test_broken_darts_path_fails(tmp_path, capsys, monkeypatch, breakage):
    """The DARTS checks see a 0.1% error in the swapped op's pointwise convs, and a second
    update of the BN running statistics (only the buffers differ), in fp64 and fp32, for every
    DARTS backend; a backend DARTS has no name for is an ERROR that says so."""
    _native_or_skip()
    import hdnas.darts.mixed as dm
    if breakage == "pointwise":
        orig = dm.pointwise
        monkeypatch.setattr(dm, "pointwise", lambda prims, z, w: orig(prims, z, w) * 1.001)
    else:
        monkeypatch.setattr(dm, "_RunState", _AlwaysFirst)
    rc = gpu.main(["--dry-run", "--out", str(tmp_path), "--sections", "checks",
                   "--cases", "DARTS op"], extra_backends=[_broken()])
    out = capsys.readouterr().out
    assert rc == 1
    rows = json.loads(_one(tmp_path, ".json").read_text())["checks"]
    darts = [r for r in rows if r["backend"] in ("merged", "native")]
    assert {(r["case"], r["mode"]) for r in darts} == {
        (c, m) for c in ("DARTS op s1", "DARTS op s2") for m in ("fp64", "fp32")}
    assert len(darts) == 8 and all(r["status"] == "FAIL" for r in darts), darts
    if breakage == "bn_twice":  # fp64 names the tensor: a BN buffer (outputs 1..), not y (out0)
        worst = {r["worst"] for r in darts if r["mode"] == "fp64"}
        assert worst and all(w.startswith("out") and w != "out0" for w in worst), worst
    other = [r for r in rows if r["backend"] == "broken"]
    assert other and all(r["status"] == "ERROR" and "no DARTS counterpart" in r["reason"]
                         for r in other)
    assert "FAIL  merged     DARTS op s1" in out


def test_darts_backend_fallback_is_an_error():
    """A DARTS op that would run other primitives than the bench backend of its name (DARTS
    falls back to 'merged' where a backend cannot serve) is refused, not timed as that backend."""
    _native_or_skip()
    import hdnas.darts as hd
    from bench import gpu_darts
    from hdnas.mixed import get_backend
    x = torch.randn(1, 4, 6, 6)
    gpu_darts._same_primitives(get_backend("native"), hd.MixedOp(4, 1, backend="native"), x)
    with pytest.raises(RuntimeError, match="runs the torch primitives.*not native"):
        gpu_darts._same_primitives(get_backend("native"), hd.MixedOp(4, 1, backend="merged"), x)


def test_check_bound_ratio():
    """The elementwise bound passes the truth and rounding-level noise, fails a 1e-3 error, and
    needs exact zeros where every term is zero."""
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(50, generator=g, dtype=torch.float64)
    mag = truth.abs() + 1
    u = gpu_check.UNIT_ROUNDOFF[torch.float32]
    assert gpu_check.bound_ratio(truth, truth, mag, u, 100) == 0.0
    assert gpu_check.bound_ratio(truth.float(), truth, mag, u, 100) <= 1.0
    assert gpu_check.bound_ratio(truth * 1.001, truth, mag, u, 100) > 1.0
    z = torch.zeros(3, dtype=torch.float64)
    assert gpu_check.bound_ratio(z + 1e-300, z, z, u, 10) == float("inf")
    assert gpu_check.max_rel(truth * (1 + 1e-9), truth) == pytest.approx(1e-9, rel=1e-3)
    assert gpu_check.norm_rel([truth * 1.01], [truth]) == pytest.approx(0.01, rel=1e-6)


def test_byte_model_lookup():
    """Every byte-model entry the roofline uses names exactly one step of bench/bytes_model.py."""
    assert gpu_time.model_elements("grouped_dw.shared fwd", "any") == 1 + 5
    for case in ("grouped_dw.shared fwd+bwd", "grouped_dw.per_group fwd", "grouped_dw.per_group fwd+bwd"):
        assert gpu_time.model_elements(case, "triton") > 0
    fwd, bwd = bytes_model.total(bytes_model.TRITON_FWD), bytes_model.total(bytes_model.TRITON_BWD)
    assert gpu_time.model_elements("mixed_op fwd+bwd", "triton") == sum(fwd) + sum(bwd)
    assert gpu_time.model_elements("mixed_op fwd", "merged") == sum(bytes_model.total(bytes_model.MERGED_FWD))
    assert gpu_time.model_elements("mixed_op fwd", "native") is None
    assert gpu_time.model_elements("mixed_dw.skip fwd", "triton") is None
    row = {"case": "grouped_dw.shared fwd", "backend": "triton", "ms": 2.0}
    gpu_time.roofline(row, (1, 2, 3, 4), torch.float32, 100.0)
    assert row["model_bytes"] == 6 * 24 * 4
    assert row["roofline_share"] == pytest.approx(6 * 24 * 4 / 2e-3 / 1e9 / 100.0)


def test_paper_projection():
    from hdnas.engine.search import PRESETS
    p = gpu_time.paper_projection(10.0, 5.0)
    steps = PRESETS["paper"]["steps"]
    assert p["steps"] == steps and 0 < p["warmup_steps"] < steps
    assert p["hours"] == pytest.approx((steps * 10.0 + (steps - p["warmup_steps"]) * 5.0) / 3.6e6)


def _fake_sanitizer(folder: Path, body: str) -> None:
    """A stand-in compute-sanitizer on PATH: ``body`` is Python run with the real command
    (after the sanitizer's own options) in ``cmd``."""
    script = folder / "compute-sanitizer"
    script.write_text(f"#!{sys.executable}\nimport subprocess, sys\n"
                      "args = sys.argv[1:]\ncmd = args[args.index('--error-exitcode') + 2:]\n"
                      + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_sanitizer_runs_the_case(tmp_path, monkeypatch, capsys):
    """The sanitizer section runs ``python -m bench.gpu --sanitize-case`` under the tool and
    reads its summary (here a stand-in tool that runs the command: the native CPU kernels)."""
    _native_or_skip()
    _fake_sanitizer(tmp_path, "rc = subprocess.call(cmd)\n"
                              "print('========= ERROR SUMMARY: 0 errors')\nsys.exit(rc)\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(ROOT)
    out_dir = tmp_path / "out"
    rc = gpu.main(["--dry-run", "--out", str(out_dir), "--sections", "sanitize",
                   "--backends", "reference,native"])
    assert rc == 0, capsys.readouterr().out
    rows = json.loads(_one(out_dir, ".json").read_text())["sanitize"]
    ran = [r for r in rows if r["case"] == "native.dw"]
    assert len(ran) == 1 and ran[0]["status"] == "PASS", ran
    assert ran[0]["rc"] == 0 and "0 errors" in ran[0]["summary"]
    assert "sanitize case native.dw on cpu: ran" in ran[0]["tail"]


def test_sanitizer_error_fails(tmp_path, monkeypatch, capsys):
    _native_or_skip()
    _fake_sanitizer(tmp_path, "print('========= Invalid __global__ read of size 4')\n"
                              "print('========= ERROR SUMMARY: 1 error')\nsys.exit(97)\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    out_dir = tmp_path / "out"
    rc = gpu.main(["--dry-run", "--out", str(out_dir), "--sections", "sanitize",
                   "--backends", "reference,native"])
    out = capsys.readouterr().out
    assert rc == 1
    row = [r for r in json.loads(_one(out_dir, ".json").read_text())["sanitize"]
           if r["case"] == "native.dw"][0]
    assert row["status"] == "FAIL" and row["summary"] == "ERROR SUMMARY: 1 error"
    assert "Invalid __global__ read" in out


def test_usage_errors(tmp_path, capsys):
    if not torch.cuda.is_available():
        assert gpu.main(["--out", str(tmp_path)]) == 2
        assert "--dry-run" in capsys.readouterr().err
    assert gpu.main(["--dry-run", "--out", str(tmp_path), "--sections", "checks,bogus"]) == 2
    assert gpu.main(["--dry-run", "--out", str(tmp_path), "--backends", "nope"]) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err
    assert gpu.main(["--sanitize-case", "nope", "--device", "cpu"]) == 2
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("quick", [False, True])
def test_gpu_plans_build(quick):
    """The GPU plans (not runnable here) are consistent: every mode exists, every check case
    builds its values at the GPU shapes, case names are unique, the paper shape is timed."""
    plan = gpu.plan_for(quick, False)
    assert plan.device == "cuda" and plan.time_shapes[plan.paper_label] == (64, 48, 32, 32)
    checks = [c for _, p in gpu.providers(plan) for c in p.check_cases(plan)]
    times = [c for _, p in gpu.providers(plan) for c in p.time_cases(plan)]
    assert len({c.name for c in checks}) == len(checks) and len({c.name for c in times}) == len(times)
    for c in checks:
        assert set(c.modes) <= set(gpu_check.MODES), c.name
        if c.level != "net":
            state = c.build(torch.device("cpu"), c.seed)
            assert state.n > 0 and state.cotangents
    assert set(plan.sanitize_tools) <= {"memcheck", "racecheck"}
    assert 0 < plan.deadline_s < (120 if quick else 480)
