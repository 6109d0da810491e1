"""Ahead-of-time compile the shipped Triton kernels for a GPU target and report resource usage.

    python -m hdnas.kernels.aot [--arch 90] [--all]

Prints one JSON line per kernel config: {"kernel", "signature", "constexprs", "options",
"usage": {"REG", "STACK", "SHARED", "LOCAL"}} or {"error": ...}; exit code 2 when the toolchain
cannot run here (no ptxas/cuobjdump), 1 when a kernel fails to compile or spills registers.
ptxas puts spilled registers in the stack frame (STACK > 0; these kernels have no local arrays
or calls that would use it otherwise); LOCAL > 0 counts as a spill too.
Run it without TRITON_INTERPRET (code generation consults that knob).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile


def spills(usage: dict) -> bool:
    """Whether cuobjdump's resource usage shows spilled registers (stack frame or local memory)."""
    return usage.get("STACK", 0) > 0 or usage.get("LOCAL", 0) > 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--all", action="store_true", help="every dtype, mode and slot size")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(json.dumps({"error": "unset TRITON_INTERPRET for AOT compilation"}))
        return 2
    import torch
    import triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        print(json.dumps({"error": f"no AOT API: {e}"}))
        return 2
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.access(cuobjdump, os.X_OK):
        print(json.dumps({"error": "cuobjdump not bundled with triton"}))
        return 2
    from hdnas.kernels.ops import aot_specs
    if a.all:
        specs = aot_specs((torch.float32, torch.bfloat16, torch.float16, torch.float64), (7, 9),
                          ((True, True), (True, False), (False, True)))
    else:
        # the DLSR search's hot configs: stage 1 and the distillation-step epilogue, in fp32
        specs = aot_specs((torch.float32,), (7,), ((True, True),), (True,))
    target = GPUTarget("cuda", a.arch, 32)
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for fn, sig, consts, opts in specs:
            full = dict(sig)
            full.update({k: "constexpr" for k in consts})
            rec = {"kernel": fn.__name__, "signature": sig, "options": opts,
                   "constexprs": {k: str(v) for k, v in consts.items()}}
            try:
                k = triton.compile(ASTSource(fn=fn, signature=full, constexprs=consts),
                                   target=target, options=dict(opts))
                f = os.path.join(tmp, "k.cubin")
                with open(f, "wb") as fh:
                    fh.write(k.asm["cubin"])
                out = subprocess.run([cuobjdump, "--dump-resource-usage", f], capture_output=True,
                                     text=True, check=True).stdout
                rec["usage"] = {k_: int(v) for k_, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out)}
                if spills(rec["usage"]):
                    bad += 1
            except Exception as e:  # report every failure, keep going
                rec["error"] = f"{type(e).__name__}: {e}"[:2000]
                bad += 1
            print(json.dumps(rec), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
