"""The backend registry: names, 'fused' resolution, and the one-line fallback warning."""
import warnings

import pytest
import torch

from hdnas.mixed import Backend, BackendError, available_backends, get_backend, register_backend
from hdnas.mixed.base import BACKENDS, resolve_backend
from hdnas.model.space import DLSR_PRIMITIVES


def test_reference_and_merged_always_there():
    names = available_backends()
    assert "reference" in names and "merged" in names
    with pytest.raises(BackendError, match="unknown backend 'nope'.*available: "):
        get_backend("nope")


def test_fused_picks_a_fused_backend_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = resolve_backend("fused", "cpu", torch.float32, DLSR_PRIMITIVES)
    assert b.fused and b.name != "reference"
    # it is the highest-priority fused backend that serves the case
    serving = [get_backend(n) for n in available_backends() if get_backend(n).fused
               and get_backend(n).unsupported_reason(DLSR_PRIMITIVES, torch.device("cpu"),
                                                     torch.float32) is None]
    assert b.priority == max(s.priority for s in serving)


class _Picky(Backend):
    name, priority, fused = "test_picky", 10_000, True

    def unsupported_reason(self, op_names, device, dtype):
        return "only serves float16" if dtype != torch.float16 else None

    def mixed_op(self, x, weights, mixed):  # never reached in these tests
        raise AssertionError


def test_unsupported_falls_back_with_one_warning():
    register_backend(_Picky())
    try:
        with pytest.warns(RuntimeWarning, match="test_picky: only serves float16.*falling back"):
            b = resolve_backend("test_picky", "cpu", torch.float32, DLSR_PRIMITIVES)
        assert b.name == "reference"
        # 'fused' skips it silently when another fused backend serves
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert resolve_backend("fused", "cpu", torch.float32, DLSR_PRIMITIVES).name != "test_picky"
        assert resolve_backend("fused", "cpu", torch.float16, DLSR_PRIMITIVES).name == "test_picky"
    finally:
        BACKENDS.unregister("test_picky")


def test_search_cli_logs_the_backend(tmp_path):
    from hdnas.search import main
    out = tmp_path / "r"
    assert main(["--channels", "8", "--cells", "3", "--batch", "1", "--patch", "32", "--steps", "1",
                 "--warmup", "1", "--quiet", "--fused", "--out", str(out)]) == 0
    log = (out / "log.txt").read_text()
    chosen = resolve_backend("fused", "cpu", torch.float32, DLSR_PRIMITIVES).name
    if chosen == "native":  # the CPU kernel variant in use is named too
        from hdnas import native_build
        assert f"backend native (CPU kernels {native_build.isa()}) on cpu" in log
    else:
        assert f"backend {chosen} on cpu" in log
