"""Test setup. TRITON_INTERPRET must be set before any Triton kernel module is imported (the
check happens at decoration time), so it is set here, at collection, when there is no GPU."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The merged dense conv's route is otherwise chosen per shape by timing (hdnas.mixed.dense), so
# which route a test ran would depend on the machine and its load. The suite pins the direct
# route, whose round-off the conformance bounds hold elementwise; tests/test_dense.py tests the
# FFT route (norm-wise bound) and the timed choice on their own.
os.environ.setdefault("HDNAS_DENSE_CONV", "direct")
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_tf32():
    """On a GPU, fp32 convs and GEMMs default to TF32 (cuDNN): the tests compare in real fp32."""
    import torch

    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(scope="session")
def nat():
    """hdnas.mixed.native with its CPU kernels loaded; skip (fail under HDNAS_REQUIRE_NATIVE=1)
    when they are unavailable."""
    from hdnas import native_build
    from hdnas.mixed import native

    if not native.available("cpu"):
        msg = f"native CPU kernels unavailable: {native_build.error('cpu')}"
        if os.environ.get("HDNAS_REQUIRE_NATIVE") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return native


@pytest.fixture(autouse=True)
def _fresh_hdnas_logger():
    """A run sets up the "hdnas" logger (file handler, no propagation, level INFO); undo that
    after each test so that the next one's caplog sees the package's records whatever ran
    before it."""
    import logging

    log = logging.getLogger("hdnas")
    state = (log.level, log.propagate, list(log.handlers))
    yield
    for h in list(log.handlers):
        if h not in state[2]:
            log.removeHandler(h)
            h.close()
    log.setLevel(state[0])
    log.propagate = state[1]
