"""Mixed-op benchmark per backend (pytest-benchmark): forward and forward+backward of one DLSR
mixed op, and of one whole distillation step (mixed op + distilled 1x1 + lrelu(y + x)).

    # GPU (H100/H200), the paper's search shape (batch 64, LR 32x32, C 48), fp32:
    pytest bench/bench_mixed.py --benchmark-only --benchmark-group-by=param:case
    # CPU, smaller shape, without the interpreter (triton is skipped):
    OMP_WAIT_POLICY=PASSIVE HDNAS_BENCH_SHAPE=16,48,32,32 pytest bench/bench_mixed.py --benchmark-only

Environment: HDNAS_BENCH_SHAPE=N,C,H,W (default 64,48,32,32 on CUDA, 16,48,32,32 on CPU),
HDNAS_BENCH_DTYPE=float32|bfloat16|float16, HDNAS_BENCH_ROUNDS (default 50 CUDA / 5 CPU),
HDNAS_BENCH_BACKENDS=comma list (default: every registered backend that serves the device).
Inputs are rotated over 4 buffers so the GPU L2 (50 MB) does not hold the whole working set.
No assertion depends on timing.
"""
from __future__ import annotations

import os

import pytest
import torch

from hdnas.mixed import MixedOp, available_backends, get_backend
from hdnas.model.space import DLSR_PRIMITIVES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_default_shape = "64,48,32,32" if DEVICE.type == "cuda" else "16,48,32,32"
N, C, H, W = (int(v) for v in os.environ.get("HDNAS_BENCH_SHAPE", _default_shape).split(","))
DTYPE = getattr(torch, os.environ.get("HDNAS_BENCH_DTYPE", "float32"))
ROUNDS = int(os.environ.get("HDNAS_BENCH_ROUNDS", "50" if DEVICE.type == "cuda" else "5"))

get_backend("reference")
_names = os.environ.get("HDNAS_BENCH_BACKENDS")
BACKENDS = _names.split(",") if _names else available_backends()


if DEVICE.type == "cuda":
    torch.backends.cudnn.benchmark = True  # a fair dense-conv baseline for every backend


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    mixed = MixedOp(C, DLSR_PRIMITIVES).to(DEVICE, DTYPE)
    distill = torch.nn.Conv2d(C, C // 2, 1).to(DEVICE, DTYPE)
    xs = [torch.randn(N, C, H, W, device=DEVICE, dtype=DTYPE) for _ in range(4)]
    w = torch.softmax(torch.randn(len(DLSR_PRIMITIVES), device=DEVICE), 0).to(DTYPE)
    return mixed, distill, xs, w


@pytest.mark.parametrize("case", ["mixed_fwd", "mixed_fwdbwd", "step_fwd", "step_fwdbwd"])
@pytest.mark.parametrize("name", BACKENDS)
def test_bench(benchmark, setup, name, case):
    b = get_backend(name)
    why = b.unsupported_reason(DLSR_PRIMITIVES, DEVICE, DTYPE)
    if why is not None:
        pytest.skip(f"{name}: {why}")
    mixed, distill, xs, w = setup
    benchmark.extra_info.update(shape=[N, C, H, W], dtype=str(DTYPE), device=str(DEVICE))
    bwd = case.endswith("fwdbwd")
    step = case.startswith("step")
    it = iter(range(10 ** 9))
    wg = w.clone().requires_grad_(bwd)

    def run():
        x = xs[next(it) % len(xs)]
        if bwd:
            x = x.detach().requires_grad_(True)
            for p in list(mixed.parameters()) + list(distill.parameters()):
                p.grad = None
            wg.grad = None
            if step:
                d, r = b.distill_step(x, wg, mixed, distill)
                (d.sum() + r.sum()).backward()
            else:
                b.mixed_op(x, wg, mixed).sum().backward()
        else:
            with torch.no_grad():
                if step:
                    b.distill_step(x, wg, mixed, distill)
                else:
                    b.mixed_op(x, wg, mixed)
        _sync()

    run()  # compile / JIT / autotune outside the timing
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2 if DEVICE.type == "cuda" else 1)
