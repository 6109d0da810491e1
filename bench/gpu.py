"""``python -m bench.gpu``: prove and time every backend on a CUDA machine, in one command.

    pip install --no-build-isolation -e . && python -m bench.gpu          # < 8 min on an H100
    python -m bench.gpu --quick                                           # < 2 min
    python -m bench.gpu --dry-run --out /tmp/x                            # the logic, on the CPU

Sections, in order (each in its own try/except; the results are written after each one, so an
error or a kill keeps what was measured):

1. ``checks``: every backend against the reference on the device (bench/gpu_check.py):
   primitives, mixed op, distillation step (also on channel slices), a whole supernet forward
   and backward; fp64, fp32 with TF32 off, bf16, autocast bf16/fp16. One PASS/FAIL line per
   check, printed before anything is timed. A backend with a FAIL or ERROR is not timed.
2. ``sanitize``: ``compute-sanitizer --tool memcheck`` (and ``racecheck``) on a tiny case of each
   native CUDA and Triton kernel family, one subprocess each (``--sanitize-case NAME``, with
   PyTorch's caching allocator off so every tensor is its own allocation), when the tool is
   found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin); SKIP otherwise. The subprocesses start
   with the checks and are collected after them, before anything is timed.
3. ``time``: per backend, side by side: each primitive, the mixed op, the distillation step and
   one whole search step (weight + architecture step, joint and darts1) at the paper's search
   shape (batch 64, LR 32x32, C 48) and at batch 16; CUDA events, warm-up, time-boxed
   repetitions, rotating inputs, ``cudnn.benchmark``; peak memory per case; achieved bandwidth
   of the memory-bound kernels from the byte model (bench/bytes_model.py) as a share of a
   device-to-device copy measured in the same run.
4. ``sweeps``: the number of candidate ops (peak memory should stay flat for the fused
   backends), the image size (time should grow linearly with the pixels), and the paper's whole
   search projected from the measured step times.

Results: ``bench/results/gpu-<gpu>-<date>.json`` and ``.md`` (``--out`` for another folder);
a short summary table is printed last. Exit status 1 when a check or a sanitizer run failed or
a section crashed, 2 for bad usage (e.g. no CUDA device without ``--dry-run``).

Other search spaces add their cases through ``PROVIDERS``: a module with ``check_cases(plan)``
and ``time_cases(plan)`` (lists of gpu_check.CheckCase / gpu_time.TimeCase), loaded when the
package it needs imports (``bench.gpu_darts`` when ``hdnas.darts`` does).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hdnas import machine
from hdnas.mixed import available_backends, get_backend
from hdnas.model.space import DLSR_PRIMITIVES

from bench import common, gpu_check, gpu_time
from bench.gpu_time import Budget

RESULTS = Path(__file__).resolve().parent / "results"
STATUS_BAD = ("FAIL", "ERROR")
SECTIONS = ("checks", "sanitize", "time", "sweeps", "aot")

#: optional case providers: (module, the package it needs)
PROVIDERS = [("bench.gpu_darts", "hdnas.darts"), ("bench.gpu_compile", "torch._dynamo")]

#: candidate ops in the order the op-count sweep adds them (each prefix mixes the families)
SWEEP_OP_ORDER = ("conv_3x3", "sep_conv_3x3", "dil_conv_3x3", "conv_5x5", "sep_conv_5x5",
                  "dil_conv_5x5", "conv_1x1", "sep_conv_7x7", "conv_7x7")
assert sorted(SWEEP_OP_ORDER) == sorted(DLSR_PRIMITIVES)


@dataclass
class Plan:
    """What one run does. ``plan_for`` gives the full, ``--quick`` and ``--dry-run`` plans."""

    kind: str
    device: str
    check_shape: tuple
    prim_modes: tuple
    op_modes: tuple
    net_modes: tuple
    net: tuple  # (C, cells, N, H, W) of the supernet check
    time_shapes: dict  # label -> (N, C, H, W); H, W: LR size (search step)
    step_cells: int
    budget: Budget
    step_budget: Budget
    op_counts: tuple
    sweep_shape: tuple
    sizes: tuple
    sanitize_tools: tuple
    sanitize_seconds: float
    deadline_s: float
    copy_mb: int
    paper_label: str = "N64"
    notes: list = field(default_factory=list)


def plan_for(quick: bool, dry: bool) -> Plan:
    if dry:
        return Plan("dry-run", "cpu", (2, 6, 7, 5), ("fp64", "fp32"), ("fp64", "fp32", "autocast_bf16"),
                    ("fp32",), (8, 3, 1, 16, 16), {"N2": (2, 8, 16, 16)}, 2,
                    Budget(0, 1, 1, 0.0), Budget(0, 1, 1, 0.0), (1, 9), (1, 8, 16, 16), (16, 24),
                    ("memcheck",), 60.0, 120.0, 8, paper_label="N2")
    if quick:
        return Plan("quick", "cuda", (4, 48, 33, 31), ("fp32", "bf16"), ("fp32", "autocast_bf16"),
                    ("fp32", "autocast_bf16"), (48, 3, 1, 32, 32), {"N64": (64, 48, 32, 32)}, 6,
                    Budget(2, 3, 20, 0.2), Budget(1, 2, 3, 1.0), (1, 5, 9), (16, 48, 32, 32),
                    (16, 32, 64), ("memcheck",), 60.0, 100.0, 256)
    return Plan("full", "cuda", (4, 48, 33, 31), ("fp64", "fp32", "bf16"),
                ("fp64", "fp32", "bf16", "autocast_bf16", "autocast_fp16"),
                ("fp64", "fp32", "autocast_bf16"), (48, 6, 2, 32, 32),
                {"N64": (64, 48, 32, 32), "N16": (16, 48, 32, 32)}, 6,
                Budget(3, 5, 50, 0.5), Budget(2, 3, 10, 2.0), (1, 2, 3, 5, 7, 9),
                (16, 48, 32, 32), (16, 24, 32, 48, 64), ("memcheck", "racecheck"), 180.0, 450.0, 512)


def providers(plan: Plan) -> list:
    """The DLSR cases, then those of every provider whose package imports."""
    out = [("dlsr", _DlsrCases)]
    for mod, needs in PROVIDERS:
        try:
            importlib.import_module(needs)
        except Exception:  # noqa: BLE001 - not there (yet): nothing to add
            continue
        try:
            out.append((mod.rsplit(".", 1)[-1], importlib.import_module(mod)))
        except ModuleNotFoundError as e:
            if e.name != mod:
                plan.notes.append(f"provider {mod}: {e}")
        except Exception as e:  # noqa: BLE001
            plan.notes.append(f"provider {mod} failed to import: {type(e).__name__}: {e}")
    return out


class _DlsrCases:
    @staticmethod
    def check_cases(plan: Plan):
        C, cells, N, H, W = plan.net
        return (gpu_check.primitive_cases(plan.check_shape, plan.prim_modes)
                + gpu_check.op_cases(plan.check_shape, plan.op_modes)
                + [gpu_check.supernet_case(C, cells, N, H, W, plan.net_modes)])

    @staticmethod
    def time_cases(plan: Plan):
        return gpu_time.dlsr_time_cases(plan.step_cells)


# ---------------------------------------------------------------------------------------------
# environment and output

def _run_text(cmd) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def environment(device: str, load_native: bool) -> dict:
    """Versions, device, commit; with ``load_native`` the native kernels for the device are
    loaded first (built just in time if the install did not build them: minutes)."""
    env = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "platform": platform.platform(), "device": device}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = None
    root = Path(__file__).resolve().parent.parent
    env["commit"] = _run_text(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    dirty = _run_text(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])
    env["dirty"] = bool(dirty)
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gb=round(p.total_memory / 2 ** 30, 1),
                   l2_mb=round(getattr(p, "L2_cache_size", 0) / 2 ** 20, 1))
        q = _run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        env["driver"] = q.splitlines()[0] if q else None
    else:
        env.update(gpu=None, driver=None, cpu=f"{machine.cpu_model()} ({machine.vector_isa()})",
                   threads=torch.get_num_threads())
    from hdnas import native_build
    kind = "cuda" if device == "cuda" else "cpu"
    try:
        if load_native:
            print(f"loading the native {kind} kernels (a first build takes minutes)...", flush=True)
            native_build.load(kind)
        env["native"] = {"kind": kind, "loaded": native_build.status().get(kind) is True,
                         "error": native_build.error(kind), "source": native_build.source(kind)}
    except Exception as e:  # noqa: BLE001
        env["native"] = f"{type(e).__name__}: {e}"
    return env


def _slug(s: str | None) -> str:
    return re.sub(r"[^a-z0-9]+", "-", (s or "cpu").lower()).strip("-")


class Report:
    """The results of one run, written as JSON and Markdown after every section."""

    def __init__(self, out_dir: Path, plan: Plan, env: dict, argv):
        self.plan, self.env = plan, env
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
        name = f"gpu-{_slug(env.get('gpu'))}-{stamp}" if plan.device == "cuda" else f"dry-cpu-{stamp}"
        out_dir.mkdir(parents=True, exist_ok=True)
        self.json_path, self.md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
        self.data = {"environment": env, "plan": asdict(plan), "argv": list(argv),
                     "checks": [], "sanitize": [], "copy": None, "time": [], "sweep_ops": [],
                     "sweep_sizes": [], "projection": [], "sections": {}, "notes": plan.notes}

    def section(self, name: str, status: str, seconds: float, error: str | None = None):
        self.data["sections"][name] = {"status": status, "seconds": round(seconds, 2), "error": error}
        self.write()

    def write(self):
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.json_path)
        tmp = self.md_path.with_suffix(".md.tmp")
        tmp.write_text("\n".join(self.markdown()) + "\n")
        os.replace(tmp, self.md_path)

    def markdown(self) -> list[str]:
        d, e = self.data, self.env
        where = (f"{e.get('gpu')} (sm {e.get('capability')}, driver {e.get('driver')})"
                 if e.get("gpu") else f"CPU {e.get('cpu')} (dry run: no timing meaning)")
        md = [f"# bench.gpu ({self.plan.kind}): {where}", "",
              f"{e['date']}; CUDA {e['cuda']}, cuDNN {e['cudnn']}, torch {e['torch']}, triton "
              f"{e['triton']}, Python {e['python']}; commit {e['commit']}"
              f"{' (dirty)' if e.get('dirty') else ''}. Command: `python -m bench.gpu "
              f"{' '.join(d['argv'])}`.", ""]
        md += ["## Sections", ""] + common.table(["section", "status", "seconds", "error"], [
            (k, v["status"], v["seconds"], (v["error"] or "").strip().splitlines()[-1:])
            for k, v in d["sections"].items()]) + [""]
        if d["checks"]:
            md += ["## Checks against the reference", "",
                   "value: the worst bound ratio (fp32/bf16/autocast; pass <= max(1, "
                   f"{gpu_check.CALIBRATION:g} x the reference's own)), max relative error "
                   "(fp64) or relative 2-norm error (supernet, low precision); see "
                   "bench/gpu_check.py.", ""]
            md += common.table(["backend", "case", "mode", "status", "value", "limit", "reference",
                          "worst", "reason"],
                         [(r["backend"], r["case"], r["mode"], r["status"], r["value"], r["limit"],
                           r["ref_value"], r["worst"], r["reason"]) for r in d["checks"]]) + [""]
        if d["sanitize"]:
            md += ["## compute-sanitizer", ""] + common.table(
                ["case", "kernels", "tool", "status", "seconds", "summary"],
                [(r["case"], r["kernels"], r["tool"], r["status"], r["seconds"], r["summary"])
                 for r in d["sanitize"]]) + [""]
        if d["copy"]:
            c = d["copy"]
            md += [f"Device-to-device copy (the roofline): {c['gb_per_s']:.0f} GB/s "
                   f"({c['bytes'] / 2 ** 20:.0f} MiB read + written in {c['ms']:.3f} ms).", ""]
        if d["time"]:
            md += self._time_tables()
        if d["sweep_ops"]:
            md += ["## Sweep: number of candidate ops (mixed op fwd+bwd, "
                   f"{'x'.join(map(str, self.plan.sweep_shape))})", "",
                   "peak: extra memory of the call (MiB above its inputs and parameters).", ""]
            md += common.table(["ops", "backend", "ms", "peak MiB", "status"],
                         [(r["ops"], r["backend"], r.get("ms"), r.get("peak_delta_mb"), r["status"])
                          for r in d["sweep_ops"]]) + [""]
        if d["sweep_sizes"]:
            md += ["## Sweep: image size (mixed op fwd+bwd)", "",
                   "linearity: (time / time at the smallest size) / (pixels / its pixels); 1 is "
                   "linear.", ""]
            md += common.table(["LR size", "backend", "ms", "ns/pixel", "linearity", "status"],
                         [(r["size"], r["backend"], r.get("ms"), r.get("ns_per_pixel"),
                           r.get("linearity"), r["status"]) for r in d["sweep_sizes"]]) + [""]
        if d["projection"]:
            md += ["## The paper's whole search, projected", ""] + common.table(
                ["backend", "rule", "weight step ms", "arch step ms", "steps", "hours", "days"],
                [(r["backend"], r["rule"], r["weight_ms"], r["arch_ms"], r["steps"], r["hours"],
                  r["days"]) for r in d["projection"]]) + [""]
        if d["notes"]:
            md += ["## Notes", ""] + [f"* {n}" for n in d["notes"]] + [""]
        return md

    def _time_tables(self) -> list[str]:
        rows = self.data["time"]
        backends = list(dict.fromkeys(r["backend"] for r in rows))
        md = ["## Timings (median ms; peak MiB of the case)", "",
              f"fp32 with torch's default TF32 settings (cuDNN convs "
              f"{self.data['tf32']['cudnn']}, cuBLAS GEMMs {self.data['tf32']['matmul']}), "
              "cudnn.benchmark on, rotating inputs; a search step is a weight step plus an "
              "architecture step.", ""]
        for label in dict.fromkeys(r["shape_label"] for r in rows):
            sub = [r for r in rows if r["shape_label"] == label]
            md += [f"### {label}: {'x'.join(map(str, sub[0]['shape']))}", ""]
            table = []
            for case in dict.fromkeys(r["case"] for r in sub):
                cells = [case]
                for b in backends:
                    r = next((r for r in sub if r["case"] == case and r["backend"] == b), None)
                    if r is None:
                        cells.append("")
                    elif r["status"] != "ok":
                        cells.append(r["status"])
                    else:
                        mem = f", {r['peak_mb']:.0f} MiB" if r.get("peak_mb") is not None else ""
                        cells.append(f"{r['ms']:.3g}{mem}")
                table.append(cells)
            md += common.table(["case"] + backends, table) + [""]
        roof = [r for r in rows if r.get("model_gb_per_s") is not None]
        if roof:
            md += ["### Bandwidth from the byte model (bench/bytes_model.py)", "",
                   "share: of the device-to-device copy bandwidth. Primitives: the one-pass "
                   "kernel's bytes for every backend (effective bandwidth for the reference "
                   "twins, which move more); mixed op: each backend's own model.", ""]
            md += common.table(["shape", "case", "backend", "model MB", "GB/s", "share"],
                         [(r["shape_label"], r["case"], r["backend"], r["model_bytes"] / 1e6,
                           r["model_gb_per_s"], r.get("roofline_share")) for r in roof]) + [""]
        return md


# ---------------------------------------------------------------------------------------------
# sections

class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def passed(self) -> bool:
        return self.left() <= 0


def _backends(names, device) -> list:
    """Backend objects: the given names (or every registered one), the reference first."""
    get_backend("reference")  # loads the optional backends
    objs = []
    for n in names or available_backends():
        b = n if not isinstance(n, str) else get_backend(n)
        if b not in objs:
            objs.append(b)
    ref = get_backend("reference")
    return [ref] + [b for b in objs if b is not ref]


def run_checks(plan, backends, cases, report) -> set:
    """Every check; returns the names of the backends with a FAIL or ERROR."""
    failed = set()
    print(f"== checks on {plan.device}: every backend against the reference "
          f"(fp32 with TF32 off) ==", flush=True)
    with gpu_check.no_tf32():
        for case in cases:
            for b in backends:
                if not gpu_check.applies(case, b):
                    continue
                for mode in case.modes:
                    r = gpu_check.check(case, b, plan.device, mode)
                    report.data["checks"].append(r)
                    print("  " + gpu_check.format_row(r), flush=True)
                    if r["status"] in STATUS_BAD:
                        failed.add(b.name)
                        if r.get("traceback"):
                            print("    " + r["traceback"].strip().replace("\n", "\n    "), flush=True)
    return failed


# -- sanitizer ---------------------------------------------------------------------------------

def _san_native(device):
    from hdnas.mixed import native
    if not native.available(device):
        raise RuntimeError(f"native {device} kernels unavailable: {native.native_build.error(torch.device(device).type)}")
    return native.NATIVE_PRIMITIVES


def _san_triton(device):
    from hdnas.mixed.triton_backend import TRITON_PRIMITIVES, triton_unsupported_reason
    why = triton_unsupported_reason(torch.device(device), torch.float32)
    if why is not None:
        raise RuntimeError(why)
    return TRITON_PRIMITIVES


def _tiny_dw(prims, device):
    """Stage 1, stage 2 and mixed_dw forward and backward at tiny odd sizes (tile edges)."""
    for dtype in (torch.float32, torch.bfloat16):
        for N, C, H, W in ((2, 6, 9, 7), (1, 3, 1, 5)):
            for ks, ds, kmax, shared in ((*gpu_check.ST1, True), (*gpu_check.ST2, False)):
                G = len(ks)
                x = torch.randn(N, C if shared else G * C, H, W, device=device, dtype=dtype,
                                requires_grad=True)
                k = torch.randn(G, C, kmax, kmax, device=device, dtype=dtype, requires_grad=True)
                y = prims.grouped_dw(x, k, ks, ds, True, shared)
                y.backward(torch.randn_like(y))
            ks, ds, kmax = gpu_check.DARTS_DW
            x = torch.randn(N, C, H, W, device=device, dtype=dtype, requires_grad=True)
            k = torch.randn(len(ks), C, kmax, kmax, device=device, dtype=dtype, requires_grad=True)
            w = torch.rand(len(ks) + 1, device=device, dtype=dtype, requires_grad=True)
            for relu in (False, True):
                y = prims.mixed_dw(x, w[:len(ks)], k, ks, ds, relu, w[len(ks)])
                y.backward(torch.randn_like(y))


def _tiny_epilogue(device):
    _san_triton(device)
    from hdnas.kernels import ops
    for dtype in (torch.float32, torch.bfloat16):
        for N, C, K1, K2, H, W in ((2, 6, 9, 4, 5, 7), (1, 48, 144, 96, 3, 11)):
            z1 = torch.randn(N, K1, H, W, device=device, dtype=dtype, requires_grad=True)
            z2 = torch.randn(N, K2, H, W, device=device, dtype=dtype, requires_grad=True)
            w1 = torch.randn(C, K1, device=device, dtype=dtype, requires_grad=True)
            w2 = torch.randn(C, K2, device=device, dtype=dtype, requires_grad=True)
            add = torch.randn(N, C, H, W, device=device, dtype=dtype)
            res = torch.randn(N, C, H, W, device=device, dtype=dtype)
            for lrelu in (False, True):
                y = ops.pw_epilogue(z1, w1, z2, w2, add, res, lrelu)
                y.backward(torch.randn_like(y))


#: name -> (kernels covered, tools, run(device))
SANITIZE_CASES = {
    "native.dw": ("dw_fwd, dw_bwd (csrc/cuda)", ("memcheck", "racecheck"),
                  lambda dev: _tiny_dw(_san_native(dev), dev)),
    "triton.dw_taps": ("_dw_taps_fwd, _dw_taps_bwd_dx, _dw_taps_bwd_dk", ("memcheck", "racecheck"),
                       lambda dev: _tiny_dw(_san_triton(dev), dev)),
    "triton.pw_epilogue": ("_epi_fwd, _epi_bwd_dz, _epi_bwd_dw", ("memcheck", "racecheck"),
                           _tiny_epilogue),
}


def sanitize_case(name: str, device: str) -> int:
    """``--sanitize-case NAME``: run one tiny case and exit (the sanitizer's child process)."""
    if name not in SANITIZE_CASES:
        print(f"error: unknown sanitize case {name!r}; known: {', '.join(SANITIZE_CASES)}",
              file=sys.stderr)
        return 2
    SANITIZE_CASES[name][2](device)
    gpu_time.sync(device)
    print(f"sanitize case {name} on {device}: ran")
    return 0


def find_sanitizer(path_only: bool = False) -> str | None:
    """compute-sanitizer on PATH, else in a CUDA toolkit's bin (unless ``path_only``)."""
    hit = shutil.which("compute-sanitizer")
    if hit or path_only:
        return hit
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    try:
        from torch.utils.cpp_extension import CUDA_HOME
        homes.insert(0, CUDA_HOME)
    except Exception:  # noqa: BLE001
        pass
    for h in homes:
        if h and os.access(os.path.join(h, "bin", "compute-sanitizer"), os.X_OK):
            return os.path.join(h, "bin", "compute-sanitizer")
    return None


_SUMMARY = re.compile(r"(ERROR SUMMARY: .*|RACECHECK SUMMARY: .*)")


def _sanitize_one(tool_path, tool, name, device, timeout) -> dict:
    cmd = [tool_path, "--tool", tool, "--error-exitcode", "97", sys.executable, "-m", "bench.gpu",
           "--sanitize-case", name, "--device", device]
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # each tensor its own allocation
    t0 = time.perf_counter()
    row = {"case": name, "kernels": SANITIZE_CASES[name][0], "tool": tool, "command": cmd}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                           cwd=str(Path(__file__).resolve().parent.parent))
        out = p.stdout + p.stderr
        found = _SUMMARY.findall(out)
        summary = found[-1] if found else f"exit status {p.returncode}"
        clean = p.returncode == 0 and all(re.search(r"\b0 errors", s) or "0 hazards" in s
                                          for s in found)
        row.update(status="PASS" if clean else "FAIL", rc=p.returncode, summary=summary,
                   tail=out[-3000:])
    except subprocess.TimeoutExpired:
        row.update(status="SKIP", rc=None, summary=f"timed out after {timeout:.0f} s", tail="")
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


class Sanitizer:
    """The sanitizer runs of one command: ``start`` launches every (case, tool) subprocess at
    once in the background (they overlap the checks, which they cannot disturb; nothing is
    timed while they run), ``finish`` waits for them (each at most ``plan.sanitize_seconds``)
    and records the results."""

    def __init__(self, plan, backends, report):
        self.plan, self.report, self.rows, self.todo = plan, report, [], []
        self.tool_path = find_sanitizer(path_only=plan.device == "cpu")
        names = {b.name for b in backends}
        for name, (kernels, tools, _) in SANITIZE_CASES.items():
            fam = name.split(".")[0]
            for tool in tools:
                if tool not in plan.sanitize_tools:
                    continue
                why = None
                if fam not in names:
                    why = f"backend {fam} not selected"
                elif self.tool_path is None:
                    why = "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)"
                else:
                    why = get_backend(fam).unsupported_reason(DLSR_PRIMITIVES, torch.device(plan.device),
                                                              torch.float32)
                if why is not None:
                    self.rows.append({"case": name, "kernels": kernels, "tool": tool, "status": "SKIP",
                                      "summary": why, "seconds": 0.0})
                else:
                    self.todo.append((tool, name))
        self.pool = self.futures = None

    def start(self):
        if self.todo:
            self.pool = ThreadPoolExecutor(max_workers=len(self.todo))
            self.futures = [self.pool.submit(_sanitize_one, self.tool_path, tool, name,
                                             self.plan.device, self.plan.sanitize_seconds)
                            for tool, name in self.todo]

    def finish(self):
        print("== compute-sanitizer ==", flush=True)
        rows = list(self.rows)
        if self.futures:
            rows += [f.result() for f in self.futures]
            self.pool.shutdown()
        for r in rows:
            self.report.data["sanitize"].append(r)
            print(f"  {r['status']:<5} {r['case']:<20} {r['tool']:<10} {r['summary']} "
                  f"({r['seconds']} s)", flush=True)
            if r["status"] == "FAIL":
                print("    " + r["tail"][-1500:].replace("\n", "\n    "), flush=True)


# -- timing ------------------------------------------------------------------------------------

def _free(device, collect: bool):
    """Return the memory of a finished case to the device (``collect``: also run the cycle
    collector, 0.1-0.3 s, for the big models of the search-step cases)."""
    if torch.device(device).type == "cuda":
        if collect:
            gc.collect()
        torch.cuda.empty_cache()


def time_one(case, backend, shape, plan, budget, extra=None) -> dict:
    """One timed case of one backend: a row with status 'ok', 'skip: why', 'OOM' or 'error'."""
    row = {"case": case.name, "backend": backend.name, "shape": list(shape), **(extra or {})}
    why = gpu_time.serves(case, backend, plan.device, torch.float32)
    if why is not None:
        row["status"] = "skip"
        row["reason"] = why
        return row
    fn = None
    try:
        fn = case.build(backend, shape, plan.device, torch.float32)
        row.update(gpu_time.Timer(plan.device, budget).measure(fn, case.parts))
        row["status"] = "ok"
    except torch.cuda.OutOfMemoryError as e:
        row.update(status="OOM", reason=str(e).splitlines()[0])
    except Exception as e:  # noqa: BLE001
        row.update(status="error", reason=f"{type(e).__name__}: {e}",
                   traceback=traceback.format_exc(limit=6))
    finally:
        del fn
        _free(plan.device, case.level == "step")
    return row


def _line(row) -> str:
    if row["status"] != "ok":
        return f"{row['backend']} {row['status']}"
    mem = f" {row['peak_mb']:.0f}MiB" if row.get("peak_mb") is not None else ""
    return f"{row['backend']} {row['ms']:.3g}ms{mem}"


def run_time(plan, backends, cases, report, deadline, failed) -> None:
    dev = plan.device
    print(f"== timing on {dev} (median ms, peak MiB) ==", flush=True)
    report.data["tf32"] = {"cudnn": torch.backends.cudnn.allow_tf32,
                           "matmul": torch.backends.cuda.matmul.allow_tf32}
    report.data["copy"] = gpu_time.copy_bandwidth(dev, plan.copy_mb, plan.budget)
    print(f"  device-to-device copy: {report.data['copy']['gb_per_s']:.1f} GB/s", flush=True)
    timed = [b for b in backends if b.name not in failed]
    for b in backends:
        if b.name in failed:
            report.data["notes"].append(f"{b.name}: not timed (a check failed)")
            print(f"  {b.name}: not timed (a check failed)", flush=True)
    for label, shape in plan.time_shapes.items():
        for case in cases:
            if deadline.passed():
                report.data["notes"].append(f"deadline: timing stopped before {label} {case.name}")
                print(f"  deadline reached: timing stopped before {label} {case.name}", flush=True)
                return
            budget = plan.step_budget if case.level == "step" else plan.budget
            rows = []
            for b in timed:
                r = time_one(case, b, shape, plan, budget, {"shape_label": label})
                gpu_time.roofline(r, shape, torch.float32, report.data["copy"]["gb_per_s"])
                rows.append(r)
                report.data["time"].append(r)
            shown = [_line(r) for r in rows if not r["status"].startswith("skip")]
            print(f"  {label} {case.name:<28} " + " | ".join(shown), flush=True)
            for r in rows:
                if r["status"] == "error":
                    print("    " + r["traceback"].strip().replace("\n", "\n    "), flush=True)
        report.write()


def run_sweeps(plan, backends, report, deadline, failed) -> None:
    timed = [b for b in backends if b.name not in failed]
    N, C, H, W = plan.sweep_shape
    print(f"== sweeps (mixed op fwd+bwd, N{N} C{C}) ==", flush=True)
    for k in plan.op_counts:
        if deadline.passed():
            report.data["notes"].append(f"deadline: op-count sweep stopped before {k} ops")
            break
        case = gpu_time.mixed_op_case(SWEEP_OP_ORDER[:k])
        rows = [time_one(case, b, plan.sweep_shape, plan, plan.budget, {"ops": k}) for b in timed]
        report.data["sweep_ops"] += rows
        print(f"  {k} ops: " + " | ".join(_line(r) for r in rows), flush=True)
    report.write()
    base = {}
    for s in plan.sizes:
        if deadline.passed():
            report.data["notes"].append(f"deadline: size sweep stopped before {s}x{s}")
            break
        shape = (N, C, s, s)
        rows = [time_one(gpu_time.mixed_op_case(DLSR_PRIMITIVES), b, shape, plan, plan.budget,
                         {"size": s}) for b in timed]
        for r in rows:
            if r["status"] == "ok":
                r["ns_per_pixel"] = r["ms"] * 1e6 / (N * s * s)
                b0 = base.setdefault(r["backend"], (r["ms"], s * s))
                r["linearity"] = (r["ms"] / b0[0]) / (s * s / b0[1])
        report.data["sweep_sizes"] += rows
        print(f"  {s}x{s}: " + " | ".join(_line(r) for r in rows), flush=True)
    report.write()
    projection(plan, report)


def projection(plan, report) -> None:
    """The paper's whole search per backend and rule, from the search-step timings at the
    paper's batch (``plan.paper_label``)."""
    for r in report.data["time"]:
        if (r["status"] != "ok" or r["shape_label"] != plan.paper_label
                or not r["case"].startswith("search_step")):
            continue
        p = r["parts_ms"]
        proj = gpu_time.paper_projection(p["weight"], p["arch"])
        report.data["projection"].append({"backend": r["backend"], "rule": r["case"].split()[-1],
                                          "weight_ms": p["weight"], "arch_ms": p["arch"], **proj})


# ---------------------------------------------------------------------------------------------
# summary and main

def run_aot(plan, report) -> None:
    """The whole Triton compile matrix (``python -m hdnas.kernels.aot --all``) for this GPU's
    architecture: CI compiles only a rotating part of it. A search config that fails to compile
    or spills is a FAIL; the resource table is written beside the results."""
    arch = 90
    if plan.device == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = 10 * major + minor
    table = report.json_path.with_name(report.json_path.stem + f"-triton_sm{arch}.md")
    cmd = [sys.executable, "-m", "hdnas.kernels.aot", "--all", "--arch", str(arch),
           "--table", str(table)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env,
                       cwd=str(Path(__file__).resolve().parent.parent))
    status = {0: "PASS", 2: "SKIP"}.get(r.returncode, "FAIL")
    tail = (r.stderr or r.stdout).strip()
    report.data["sanitize"].append({
        "case": "triton AOT (every config, fp64 included)", "kernels": f"sm_{arch}", "tool": "aot",
        "command": cmd, "status": status, "rc": r.returncode,
        "summary": tail.splitlines()[-1] if tail else f"exit status {r.returncode}",
        "tail": tail[-3000:], "seconds": round(time.perf_counter() - t0, 1)})
    print(f"[{status}] triton AOT sm_{arch}: {table}", flush=True)


def summary(report) -> list[str]:
    d = report.data
    rows = []
    for b in dict.fromkeys([r["backend"] for r in d["checks"]] + [r["backend"] for r in d["time"]]):
        checks = [r for r in d["checks"] if r["backend"] == b]
        npass = sum(r["status"] == "PASS" for r in checks)
        nbad = sum(r["status"] in STATUS_BAD for r in checks)

        def ms(case, label=report.plan.paper_label):
            r = next((r for r in d["time"] if r["backend"] == b and r["case"] == case
                      and r["shape_label"] == label and r["status"] == "ok"), None)
            return r
        mix, step = ms("mixed_op fwd+bwd"), ms("search_step joint")
        ref_step = next((r for r in d["time"] if r["backend"] == "reference" and r["status"] == "ok"
                         and r["case"] == "search_step joint"
                         and r["shape_label"] == report.plan.paper_label), None)
        proj = next((p for p in d["projection"] if p["backend"] == b and p["rule"] == "joint"), None)
        passed = f"{npass}/{len(checks)}" + (f" ({nbad} bad)" if nbad else "")
        rows.append((b, passed if b != "reference" else "(the reference)",
                     mix and mix["ms"], step and step["ms"],
                     step and ref_step and ref_step["ms"] / step["ms"],
                     step and step.get("peak_mb"), proj and proj["days"]))
    head = ["backend", "checks passed", f"mixed op fwd+bwd ms ({report.plan.paper_label})",
            "search step (joint) ms", "vs reference", "step peak MiB", "paper search days"]
    return common.table(head, rows)


def _select(cases, spec: str) -> list:
    keys = [k.strip() for k in spec.split(",") if k.strip()]
    return [c for c in cases if not keys or any(k in c.name for k in keys)]


def main(argv=None, extra_backends=None) -> int:
    """Command line. ``extra_backends``: Backend objects to check and time besides the named
    ones (the tests inject a broken one)."""
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short run (< 2 min on an H100)")
    ap.add_argument("--dry-run", action="store_true",
                    help="the logic on the CPU: tiny shapes, the CPU backends, no timing meaning")
    ap.add_argument("--out", default=str(RESULTS), help="folder for the JSON and Markdown results")
    ap.add_argument("--backends", default="", help="comma list (default: every registered one)")
    ap.add_argument("--sections", default=None,
                    help="comma list of checks, sanitize, time, sweeps, aot (default: all; "
                         "--quick and --dry-run leave out aot)")
    ap.add_argument("--cases", default="",
                    help="comma list of substrings: only the check and timed cases whose name "
                         "holds one (default: all)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds after which timing and sweeps stop (default: 450, quick 105)")
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sanitize-case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.sanitize_case:
        return sanitize_case(args.sanitize_case, args.device or "cuda")
    plan = plan_for(args.quick, args.dry_run)
    if args.device:
        plan.device = args.device
    if plan.device == "cuda" and not torch.cuda.is_available():
        print(f"error: this torch ({torch.__version__}) sees no CUDA device; `python -m bench.gpu "
              "--dry-run` runs the logic on the CPU", file=sys.stderr)
        return 2
    if args.sections is None:
        args.sections = ",".join(s for s in SECTIONS
                                 if s != "aot" or not (args.quick or args.dry_run))
    given = {s.strip() for s in args.sections.split(",") if s.strip()}
    sections = [s for s in SECTIONS if s in given]  # always in this order
    bad = given - set(SECTIONS)
    if bad:
        print(f"error: unknown sections {sorted(bad)}", file=sys.stderr)
        return 2
    if args.deadline is not None:
        plan.deadline_s = args.deadline
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    if not names and plan.kind == "dry-run":
        names = ["reference", "merged", "native"]
    try:
        backends = _backends(names + list(extra_backends or []), plan.device)
    except Exception as e:  # noqa: BLE001 - unknown name
        print(f"error: {e}", file=sys.stderr)
        return 2

    deadline = Deadline(plan.deadline_s)
    torch.backends.cudnn.benchmark = True
    provs = providers(plan)
    env = environment(plan.device, any(b.name == "native" for b in backends))
    report = Report(Path(args.out), plan, env, argv if argv is not None else sys.argv[1:])
    print(f"bench.gpu ({plan.kind}) on {report.env.get('gpu') or 'cpu'}: backends "
          f"{', '.join(b.name for b in backends)}; cases from {', '.join(n for n, _ in provs)}; "
          f"results -> {report.json_path}", flush=True)

    def _term(signum, frame):  # a kill: write what there is, then stop
        raise KeyboardInterrupt(f"signal {signum}")
    old = signal.signal(signal.SIGTERM, _term)
    failed: set = set()
    crashed = False
    sanitizer = None
    try:
        if "sanitize" in sections:
            try:
                sanitizer = Sanitizer(plan, backends, report)
                sanitizer.start()
            except Exception:  # noqa: BLE001
                crashed = True
                report.section("sanitize", "crashed", 0.0, traceback.format_exc())
                sections.remove("sanitize")
        for name in sections:
            t0 = time.perf_counter()
            try:
                if name == "checks":
                    cases = _select([c for _, p in provs for c in p.check_cases(plan)], args.cases)
                    failed |= run_checks(plan, backends, cases, report)
                elif name == "sanitize":
                    sanitizer.finish()
                elif name == "time":
                    cases = _select([c for _, p in provs for c in p.time_cases(plan)], args.cases)
                    run_time(plan, backends, cases, report, deadline, failed)
                elif name == "sweeps":
                    run_sweeps(plan, backends, report, deadline, failed)
                elif name == "aot":
                    run_aot(plan, report)
                report.section(name, "done", time.perf_counter() - t0)
            except KeyboardInterrupt:
                report.section(name, "interrupted", time.perf_counter() - t0, traceback.format_exc())
                raise
            except Exception:  # noqa: BLE001 - the next section still runs
                crashed = True
                tb = traceback.format_exc()
                print(f"section {name} crashed:\n{tb}", file=sys.stderr, flush=True)
                report.section(name, "crashed", time.perf_counter() - t0, tb)
    except KeyboardInterrupt:
        crashed = True
        report.data["notes"].append("interrupted: partial results")
    finally:
        signal.signal(signal.SIGTERM, old)
        report.write()

    bad_checks = [r for r in report.data["checks"] if r["status"] in STATUS_BAD]
    bad_san = [r for r in report.data["sanitize"] if r["status"] == "FAIL"]
    print("\n== summary ==")
    print("\n".join(summary(report)))
    if bad_checks or bad_san:
        print(f"\n{len(bad_checks)} check(s) and {len(bad_san)} sanitizer run(s) failed: "
              + ", ".join(sorted({f"{r['backend']} {r['case']} {r['mode']}" for r in bad_checks}
                                 | {f"{r['case']} {r['tool']}" for r in bad_san})))
    print(f"\nwritten: {report.json_path}\n         {report.md_path}")
    return 1 if (bad_checks or bad_san or crashed) else 0


if __name__ == "__main__":
    sys.exit(main())
