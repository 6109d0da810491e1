"""Ahead-of-time compile the Triton kernels that a search launches, for a GPU target (sm_90 by
default), on a machine without a GPU, and report each config's resource usage.

    python -m hdnas.kernels.aot                  # the search set (what CI must keep spill-free)
    python -m hdnas.kernels.aot --all            # + the fp64 check-only configs
    python -m hdnas.kernels.aot --rotate KEY     # one config per (kernel, dtype, mode), by KEY
    python -m hdnas.kernels.aot --table bench/results/triton_sm90.md   # --all, as a table

The matrix (``configs``) is every (kernel, dtype, constexprs, launch options) tuple that the
Triton backend launches in a DLSR search (hdnas.mixed.merged's composition over
``DLSR_PRIMITIVES``: stage 1 shared-input depthwise, stage 2 per-group depthwise, the fused
pointwise epilogue) or a DARTS search (``grouped_dw`` and ``mixed_dw`` over ``hdnas.darts.launches.DARTS_DW_OPS``),
in fp32 and, under autocast, fp16 and bf16. The slot sizes come from the same code the
launches use (``plan_of``, ``union_layout``): dilation is applied inside the kernel, so a
dilated 5x5 sits in a 5-wide slot of ``grouped_dw``, while ``mixed_dw``'s union kernel spans
its full dilated extent (9 for dil_conv_5x5). fp64 is a checking dtype (a search never runs
in it; tests and GPU checks do): its configs are compiled with ``--all`` and reported, and
only their compile errors, not their spills, fail.

Prints one JSON line per config: {"kernel", "dtype", "signature", "constexprs", "options",
"uses", "required", "usage": {"REG", "STACK", "SHARED", "LOCAL"}, "seconds", "cached"} or
{..., "error"}. Exit code 2 when the toolchain cannot run here (no AOT API, no cuobjdump, or
TRITON_INTERPRET set), 1 when a config fails to compile or a required one spills: ptxas puts
spilled registers in the stack frame (STACK > 0; these kernels have no local arrays or calls
that would use it otherwise), and LOCAL > 0 counts as a spill too.

Configs compile in parallel worker processes (``--jobs``, default the CPU count) and results
are cached in ``$HDNAS_CACHE_DIR/triton_aot`` (default ``~/.cache/hdnas/triton_aot``), keyed by
the kernel module's source text, the triton version, the target and the config, so a rerun
without changes compiles nothing. ``compile_all`` is the same as a function (for bench.gpu).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from hdnas.kernels import ops

SEARCH_DTYPES = ("fp32", "fp16", "bf16")
CHECK_DTYPES = ("fp64",)
#: Bump when the record format or the compile procedure changes (invalidates the cache).
CACHE_VERSION = 1

_MODULES = {"_dw_taps_fwd": "dw", "_dw_taps_bwd_dx": "dw", "_dw_taps_bwd_dk": "dw",
            "_epi_fwd": "epilogue", "_epi_bwd_dz": "epilogue", "_epi_bwd_dw": "epilogue"}
_DW_INTS = ("N", "C", "H", "W", "sxn", "sxc", "sxh", "sxw", "G")
_EPI_INTS = ("C", "K1", "K2", "H", "W", "sz1n", "sz1c", "sz1h", "sz1w", "sz2n", "sz2c", "sz2h",
             "sz2w", "san", "sac", "sah", "saw", "srn", "src", "srh", "srw")


@dataclass(frozen=True)
class Config:
    """One compilation: ``constexprs`` in plain values (``ACC`` is the accumulation dtype's
    name, ``IP`` the tl.dot input precision or None), ``options`` the launch options."""

    kernel: str
    dtype: str
    constexprs: tuple
    options: tuple
    uses: tuple = field(default=(), compare=False)
    required: bool = field(default=True, compare=False)

    @property
    def mode(self) -> str:
        """The constexprs that select code paths (not block sizes or the accumulation type)."""
        return " ".join(f"{k}={v}" for k, v in self.constexprs
                        if not k.startswith("BLOCK_") and k not in ("ACC", "IP", "KP"))

    @property
    def blocks(self) -> str:
        return " ".join(f"{k[6:]}={v}" for k, v in self.constexprs if k.startswith("BLOCK_"))

    @property
    def group(self) -> tuple:
        """What every CI run covers at least once: kernel x dtype x mode, slot size aside."""
        return (self.kernel, self.dtype,
                tuple((k, v) for k, v in self.constexprs
                      if k in ("RELU", "SHARED", "LRELU", "STORE_GPRE")))

    def signature(self) -> dict:
        t = self.dtype
        pt = "fp64" if t == "fp64" else "fp32"  # partial sums of the weight gradients
        i32 = lambda names: {k: "i32" for k in names}  # noqa: E731
        if self.kernel == "_dw_taps_fwd":
            return {"x_ptr": f"*{t}", "k_ptr": f"*{t}", "taps_ptr": "*i32", "dil_ptr": "*i32",
                    "y_ptr": f"*{t}", **i32(_DW_INTS)}
        if self.kernel == "_dw_taps_bwd_dx":
            return {"gy_ptr": f"*{t}", "x_ptr": f"*{t}", "k_ptr": f"*{t}", "taps_ptr": "*i32",
                    "dil_ptr": "*i32", "dx_ptr": f"*{t}", **i32(_DW_INTS)}
        if self.kernel == "_dw_taps_bwd_dk":
            return {"gy_ptr": f"*{t}", "x_ptr": f"*{t}", "taps_ptr": "*i32", "dil_ptr": "*i32",
                    "part_ptr": f"*{pt}", **i32(_DW_INTS + ("SPLIT",))}
        if self.kernel == "_epi_fwd":
            return {**{k: f"*{t}" for k in ("z1_ptr", "w1_ptr", "z2_ptr", "w2_ptr", "add_ptr",
                                            "res_ptr", "out_ptr")}, **i32(_EPI_INTS)}
        if self.kernel == "_epi_bwd_dz":
            return {**{k: f"*{t}" for k in ("g_ptr", "out_ptr", "w_ptr", "dz_ptr", "gpre_ptr")},
                    **i32(("C", "K", "HW"))}
        if self.kernel == "_epi_bwd_dw":
            return {"gpre_ptr": f"*{t}", "z_ptr": f"*{t}", "part_ptr": f"*{pt}",
                    **i32(("N", "C", "K", "H", "W", "SPLIT", "szn", "szc", "szh", "szw"))}
        raise ValueError(f"unknown kernel {self.kernel!r}")

    def describe(self) -> dict:
        return {"kernel": self.kernel, "dtype": self.dtype, "signature": self.signature(),
                "constexprs": {k: str(v) for k, v in self.constexprs},
                "options": dict(self.options), "uses": list(self.uses),
                "required": self.required}


# ----------------------------------------------------------------------------- the matrix
def epilogue_variants(dtype: str) -> list[tuple[str, dict]]:
    """(use, flags) of the pw_epilogue forward launches in ``dtype``: one or two terms (HAS2:
    sep and dil candidates both present), with or without the dense-conv output (HAS_ADD).
    fp32: a distillation step fuses lrelu(. + x) (HAS_RES, LRELU), a plain mixed op does not.
    Under autocast (fp16, bf16) the residual x is fp32, so the kernel never takes it
    (hdnas.mixed.triton_backend adds it outside)."""
    acts = [(True, True), (False, False)] if dtype == "fp32" else [(False, False)]
    out = []
    for res, lrelu in acts:
        for has2 in (True, False):
            for add in (True, False):
                use = ("distillation step" if lrelu else "mixed op") + \
                      f" ({'two terms' if has2 else 'one term'}{', +conv' if add else ''})"
                out.append((use, dict(HAS2=has2, HAS_ADD=add, HAS_RES=res, LRELU=lrelu)))
    return out


def configs(sites, scope: str = "search") -> list[Config]:
    """The compile matrix of the depthwise launch ``sites`` ((use, KMAX, relu_input,
    shared_input) tuples: what the search code launches, ``hdnas.darts.launches``) and every
    epilogue variant: ``scope`` 'search' (what a search launches, fp32/fp16/bf16: spills fail)
    or 'all' (plus the same launches in fp64, for checks only)."""
    if scope not in ("search", "all"):
        raise ValueError(f"scope must be 'search' or 'all', got {scope!r}")

    def split(cfg):
        launch = ("num_warps", "num_stages")
        return ({k: v for k, v in cfg.items() if k not in launch},
                tuple(sorted((k, v) for k, v in cfg.items() if k in launch)))

    dtypes = SEARCH_DTYPES + (CHECK_DTYPES if scope == "all" else ())
    launch_sites, sites = list(sites), {}
    for use, K, relu, shared in launch_sites:
        sites.setdefault((K, relu, shared), []).append(use)
    out = []
    for dt in dtypes:
        acc = "fp64" if dt == "fp64" else "fp32"
        req = dt in SEARCH_DTYPES
        for (K, relu, shared), uses in sorted(sites.items(), key=lambda s: (-s[0][2], s[0][0])):
            base = dict(KMAX=K, RELU=relu, SHARED=shared, ACC=acc)
            fb, fo = split(ops.GPU_FWD_CFG)
            db, do = split(ops.GPU_DK_CFG)
            for kern, cex, opt in (("_dw_taps_fwd", {**base, **fb}, fo),
                                   ("_dw_taps_bwd_dx", {**base, **fb}, fo),
                                   ("_dw_taps_bwd_dk", {**base, "KP": ops._pow2(K), **db}, do)):
                out.append(Config(kern, dt, tuple(cex.items()), opt, tuple(uses), req))
        if dt == "fp64":  # on a GPU the triton backend keeps cuBLAS for fp64 epilogues
            continue
        ip = "ieee" if dt == "fp32" else None
        prec = dict(ACC=acc, IP=ip)
        eb, eo = split(ops.GPU_EPI_FWD_CFG)
        for use, flags in epilogue_variants(dt):
            out.append(Config("_epi_fwd", dt, tuple({**flags, **prec, **eb}.items()), eo,
                              (use,), req))
        zb, zo = split(ops.GPU_EPI_DZ_CFG)
        for lrelu in ((True, False) if dt == "fp32" else (False,)):
            use = "distillation step, first term" if lrelu else "mixed op / second term"
            out.append(Config("_epi_bwd_dz", dt,
                              tuple({"LRELU": lrelu, "STORE_GPRE": lrelu, **prec, **zb}.items()),
                              zo, (use,), req))
        wb, wo = split(ops.GPU_EPI_DW_CFG)
        out.append(Config("_epi_bwd_dw", dt, tuple({**prec, **wb}.items()), wo,
                          ("every pw_epilogue backward",), req))
    return out


def rotation(cfgs: list[Config], key) -> list[Config]:
    """One config of every group (kernel x dtype x mode), chosen by ``key`` (any str or int:
    the same key gives the same choice; successive keys walk through every config of a
    group)."""
    k = int(hashlib.sha256(str(key).encode()).hexdigest(), 16)
    groups: dict = {}
    for c in cfgs:
        groups.setdefault(c.group, []).append(c)
    return [g[k % len(g)] for g in groups.values()]


def rotation_key() -> str:
    """The git commit of this checkout (a rerun of one commit compiles the same configs), or
    today's date outside a git checkout."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return datetime.date.today().isoformat()


# ----------------------------------------------------------------------------- compiling
def spills(usage: dict) -> bool:
    """Whether cuobjdump's resource usage shows spilled registers (stack frame or local memory)."""
    return usage.get("STACK", 0) > 0 or usage.get("LOCAL", 0) > 0


def failed(rec: dict) -> bool:
    """A compile error, or a spill in a required (search) config."""
    return "error" in rec or (rec.get("required", True) and spills(rec.get("usage", {})))


def cache_dir() -> str:
    base = os.environ.get("HDNAS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hdnas")
    return os.path.join(base, "triton_aot")


def _module_source(kernel: str) -> str:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), _MODULES[kernel] + ".py")
    with open(path, encoding="utf-8") as f:
        return f.read()


def cache_key(cfg: Config, arch: int, triton_version: str) -> str:
    """sha256 of what determines the compiled code: the kernel module's source (the kernel and
    its helpers), the triton version (which bundles ptxas), the target, the config and the
    code-generation knob read from the environment."""
    h = hashlib.sha256()
    for part in (str(CACHE_VERSION), _module_source(cfg.kernel), triton_version, str(arch),
                 json.dumps([cfg.kernel, cfg.signature(), [[k, str(v)] for k, v in cfg.constexprs],
                             [list(o) for o in cfg.options]]),
                 os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")):  # unset: 3.9's default
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _toolchain():
    """(triton version, cuobjdump path), or a reason string when AOT compilation cannot run."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "unset TRITON_INTERPRET for AOT compilation"
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"no AOT API: {e}"
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    if not os.access(cuobjdump, os.X_OK):
        return "cuobjdump not bundled with triton"
    return triton.__version__, cuobjdump


def _worker_init():
    # a private triton cache: every result comes from a real compile, and the compiled cubins
    # do not pile up in ~/.triton (our cache keeps the usage, which is all we need)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="hdnas_aot_triton_")


def compile_one(cfg: Config, arch: int, cuobjdump: str) -> dict:
    """Compile one config for sm_<arch> and read its resource usage (runs in a worker)."""
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"hdnas.kernels.{_MODULES[cfg.kernel]}"), cfg.kernel)
    consts = dict(cfg.constexprs)
    consts["ACC"] = getattr(tl, {"fp32": "float32", "fp64": "float64"}[consts["ACC"]])
    sig = cfg.signature()
    full = {**sig, **{k: "constexpr" for k in consts}}
    rec = cfg.describe()
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn=fn, signature=full, constexprs=consts),
                           target=GPUTarget("cuda", arch, 32), options=dict(cfg.options))
        with tempfile.TemporaryDirectory() as tmp:
            f = os.path.join(tmp, "k.cubin")
            with open(f, "wb") as fh:
                fh.write(k.asm["cubin"])
            out = subprocess.run([cuobjdump, "--dump-resource-usage", f], capture_output=True,
                                 text=True, check=True).stdout
        rec["usage"] = {u: int(v) for u, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out)}
        if not rec["usage"]:
            raise RuntimeError(f"no resource usage in cuobjdump's output: {out[-500:]!r}")
    except Exception as e:  # report every failure, keep going
        rec["error"] = f"{type(e).__name__}: {e}"[:2000]
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def compile_all(cfgs: list[Config], arch: int = 90, jobs: int | None = None,
                use_cache: bool = True, on_record=None) -> list[dict]:
    """Compile ``cfgs`` (``configs(...)``) for sm_<arch> in ``jobs`` worker
    processes, cached; returns one record per config, in order (see the module docstring),
    calling ``on_record(rec)`` as each arrives. Raises RuntimeError when the toolchain cannot
    run here. ``format_table(records)`` renders them."""
    tc = _toolchain()
    if isinstance(tc, str):
        raise RuntimeError(tc)
    version, cuobjdump = tc
    # triton 3.9's default, made explicit: silences its warning and keeps the cache key stable
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cfgs = list(cfgs)
    recs: list = [None] * len(cfgs)
    todo = []
    cdir = cache_dir()
    for i, c in enumerate(cfgs):
        path = os.path.join(cdir, cache_key(c, arch, version) + ".json")
        if use_cache and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    rec = json.load(f)["usage"]
                recs[i] = {**c.describe(), "usage": rec, "seconds": 0.0, "cached": True}
                if on_record:
                    on_record(recs[i])
                continue
            except (OSError, ValueError, KeyError, TypeError):
                pass  # unreadable entry: compile again
        todo.append((i, path))
    if todo:
        import multiprocessing as mp

        n = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
        with ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"),
                                 initializer=_worker_init) as pool:
            futs = [(i, path, pool.submit(compile_one, cfgs[i], arch, cuobjdump))
                    for i, path in todo]
            for i, path, fut in futs:
                rec = fut.result()
                rec["cached"] = False
                if "usage" in rec and use_cache:
                    os.makedirs(cdir, exist_ok=True)
                    tmp = f"{path}.{os.getpid()}.tmp"
                    with open(tmp, "w", encoding="utf-8") as f:
                        json.dump({"usage": rec["usage"], "config": cfgs[i].describe(),
                                   "triton": version, "arch": arch}, f)
                    os.replace(tmp, path)
                recs[i] = rec
                if on_record:
                    on_record(rec)
    return recs


# ----------------------------------------------------------------------------- the table
def format_table(recs: list[dict], arch: int = 90, triton_version: str | None = None,
                 date: str | None = None) -> str:
    """Markdown: registers, stack, local and shared memory per kernel config."""
    if triton_version is None:
        import triton
        triton_version = triton.__version__
    date = date or datetime.date.today().isoformat()
    lines = [
        f"# Triton kernels compiled for sm_{arch}",
        "",
        f"triton {triton_version}, {date}; `python -m hdnas.kernels.aot --table "
        "bench/results/triton_sm90.md` (ahead of time, no GPU; resource usage from "
        "`cuobjdump --dump-resource-usage`).",
        "",
        "REG: registers per thread (255 at most); STACK: stack frame bytes per thread, where "
        "ptxas puts spilled registers; LOCAL: local memory bytes; SHARED: static shared memory "
        "bytes per program (reductions, `tl.dot` staging). A search config with STACK or LOCAL "
        "above 0 fails `tests/test_triton_aot.py`. fp64 is a checking dtype (no search runs in "
        "it): its rows are reported, and only their compile errors fail.",
        "",
        "| kernel | dtype | mode | blocks | warps | REG | STACK | LOCAL | SHARED | status "
        "| used by |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    n_bad = 0
    for r in recs:
        mode = " ".join(f"{k}={v}" for k, v in r["constexprs"].items()
                        if not k.startswith("BLOCK_") and k not in ("ACC", "IP", "KP"))
        blocks = " ".join(f"{k[6:]}={v}" for k, v in r["constexprs"].items()
                          if k.startswith("BLOCK_"))
        u = r.get("usage", {})
        if "error" in r:
            status = "ERROR"
        elif spills(u):
            status = "SPILL" if r.get("required", True) else "spill (check only)"
        else:
            status = "ok" if r.get("required", True) else "ok (check only)"
        n_bad += failed(r)
        cells = [r["kernel"], r["dtype"], mode, blocks, str(r["options"].get("num_warps", "")),
                 *(str(u.get(k, "")) for k in ("REG", "STACK", "LOCAL", "SHARED")), status,
                 "; ".join(r.get("uses", []))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"{len(recs)} configs, {n_bad} failing."]
    return "\n".join(lines) + "\n"


def main(argv, sites):
    """The command line over the launch ``sites`` (see ``configs``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--all", action="store_true", help="also the fp64 (check-only) configs")
    p.add_argument("--rotate", metavar="KEY", nargs="?", const="",
                   help="compile one config per kernel x dtype x mode, chosen by KEY (default: "
                        "the git commit, or the date), plus every config already cached")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPUs)")
    p.add_argument("--no-cache", action="store_true", help="compile even what is cached")
    p.add_argument("--table", metavar="PATH",
                   help="compile every config (--all) and write the Markdown table to PATH")
    a = p.parse_args(argv)
    tc = _toolchain()
    if isinstance(tc, str):
        print(json.dumps({"error": tc}))
        return 2
    cfgs = configs(sites, "all" if (a.all or a.table) else "search")
    if a.rotate is not None and not a.table:
        key = a.rotate or rotation_key()
        chosen = set(rotation(cfgs, key))
        version = tc[0]
        cached = {c for c in cfgs if os.path.isfile(
            os.path.join(cache_dir(), cache_key(c, a.arch, version) + ".json"))}
        print(f"rotation key {key}: {len(chosen)} configs chosen, "
              f"{len(cached - chosen)} more cached, of {len(cfgs)}", file=sys.stderr)
        cfgs = [c for c in cfgs if c in chosen or c in cached]
    t0 = time.perf_counter()
    recs = compile_all(cfgs, a.arch, a.jobs, not a.no_cache,
                       on_record=lambda r: print(json.dumps(r), flush=True))
    print(f"{len(recs)} configs in {time.perf_counter() - t0:.0f} s "
          f"({sum(not r.get('cached') for r in recs)} compiled)", file=sys.stderr)
    if a.table:
        os.makedirs(os.path.dirname(os.path.abspath(a.table)), exist_ok=True)
        with open(a.table, "w", encoding="utf-8") as f:
            f.write(format_table(recs, a.arch, tc[0]))
    return 1 if any(failed(r) for r in recs) else 0


if __name__ == "__main__":
    # run as a program, this module is a command: the launch sites come from the search code
    # above it (importing hdnas.kernels.aot as a library imports nothing of hdnas)
    from hdnas.darts.launches import dw_launch_sites

    sys.exit(main(sys.argv[1:], dw_launch_sites()))
