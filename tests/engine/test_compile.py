"""``torch.compile`` around the search: the supernet's forward traces as one graph (no graph
breaks) on the fused backends, and a search whose steps call it compiled computes the eager
search's numbers for every update rule, its state loading into an eager search.

There is no ``--compile`` flag: measured, the compiled whole step is no faster on a CPU
(BENCHMARKS.md, "compile peer"; ``python -m bench.bench_compile --whole-step``, which swaps the
compiled forward into the engine's ``Search`` as these tests do). The tests compile with Dynamo
alone (backend ``eager``) or ``aot_eager`` (the same graphs and AOTAutograd, no generated code:
~exact); inductor takes minutes per network on a 2-core box."""
import copy

import pytest
import torch

from hdnas.engine.search import Search, SearchConfig
from hdnas.mixed import dense, resolve_backend
from hdnas.model.network import SuperNet


#: one candidate of each family the merged composition computes
FAMILIES = ["conv_3x3", "sep_conv_3x3", "dil_conv_3x3", "skip_connect"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _net(name, ops, cells=1):
    backend = resolve_backend(name, "cpu", torch.float32, ops)
    if backend.name != name:
        pytest.skip(f"backend {name} does not serve here")
    torch.manual_seed(0)
    return SuperNet(8, cells, 2, ops, backend=backend)


def _one_graph(net, x):
    """``net(x)`` through Dynamo with ``fullgraph=True``: a graph break is an error naming it
    (what ``torch._dynamo.explain`` would count); backend ``eager`` runs the captured graph."""
    return torch.compile(net, backend="eager", fullgraph=True, dynamic=False)(x)


@pytest.mark.parametrize("name", ["merged", "reference", "native"])
def test_supernet_forward_is_one_graph(name):
    net = _net(name, FAMILIES)
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(_one_graph(net, x), net(x), rtol=0, atol=0)


@pytest.fixture
def fresh_routes(monkeypatch):
    """A fresh table of timed dense-conv routes, restored afterwards."""
    saved = dense.choices()
    monkeypatch.setattr(dense, "_choices", {})
    yield
    dense._choices.update(saved)


@pytest.mark.parametrize("route", ["direct", "fft", "auto"])
def test_native_dense_conv_routes_are_one_graph(route, monkeypatch, fresh_routes, nat):
    """The native backend's merged dense conv (dense candidates only: no depthwise call) traces
    whole on every route; ``auto`` reads the route that one eager forward of the shape timed
    (a route timed while tracing would be a break: timing is not traceable)."""
    monkeypatch.setenv("HDNAS_DENSE_CONV", route)
    net = _net("native", ["conv_1x1", "conv_5x5"])  # K 5, batch 2: FFT-eligible
    x = torch.rand(2, 3, 16, 16)
    ref = net(x)  # auto: times the route of this shape
    assert len(dense.choices()) == (route == "auto")
    torch.testing.assert_close(_one_graph(net, x), ref, rtol=0, atol=0)


def _search(tmp, rule, backend, ops, compiler=None, steps=3):
    tmp.mkdir()
    s = Search(SearchConfig(channels=8, cells=2, batch=2, patch=32, steps=steps, warmup=1,
                            log_every=1, ckpt_every=steps, val_every=0, threads=1, rule=rule,
                            ops=ops, backend=backend, out=str(tmp)), tmp)
    if s.backend.name != backend:
        pytest.skip(f"backend {backend} does not serve here")
    if compiler:  # what bench/bench_compile.py --whole-step does
        s.forward = s.architect.forward = torch.compile(s.model, backend=compiler, dynamic=False)
    return s


def _rows(run):
    lines = (run / "history.csv").read_text().splitlines()
    head = lines[0].split(",")
    keep = [i for i, k in enumerate(head) if not k.startswith("sec_")]
    return [[float(v) if v else float("nan") for i, v in enumerate(ln.split(",")) if i in keep]
            for ln in lines[1:]]


def _assert_same(a, b, rel):
    for ra, rb in zip(a, b, strict=True):
        assert ra == pytest.approx(rb, rel=rel, abs=1e-9, nan_ok=True), (ra, rb)


SEP = ["conv_1x1", "sep_conv_3x3"]


@pytest.mark.parametrize("rule,compiler,backend,ops", [
    pytest.param("joint", "eager", "merged", ["conv_1x1"], id="joint-eager"),
    pytest.param("joint", "aot_eager", "native", SEP, id="joint-aot_eager-native"),
    pytest.param("darts1", "aot_eager", "merged", SEP, id="darts1-aot_eager-merged"),
    pytest.param("darts2", "aot_eager", "native", SEP, id="darts2-aot_eager-native")])
def test_compiled_search_equals_eager(tmp_path, rule, compiler, backend, ops):
    """Dynamo alone (``eager``, one op: the fast representative) or aot_eager (Dynamo +
    AOTAutograd + the native ops' registered autograd, no generated code; native's graph breaks
    included): the losses, alpha and beta of every
    step and the final weights are the eager search's to 1e-5 (measured: ~1e-8), the
    architecture steps (second graph, weights without gradients) leave every weight requiring
    its gradient again, and the compiled search's state (stopped after step 2) resumes in an
    eager search to the same end (the compiled search continues to it too)."""
    eager = _search(tmp_path / "eager", rule, backend, ops)
    eager.run(quiet=True)
    comp = _search(tmp_path / "compiled", rule, backend, ops, compiler)
    comp.run(stop_after=2, quiet=True)
    state = copy.deepcopy(comp.state_dict())  # "killed" after step 2
    comp.run(quiet=True)
    assert all(p.requires_grad for p in comp.model.parameters())
    _assert_same(_rows(tmp_path / "eager"), _rows(tmp_path / "compiled"), 1e-5)
    assert not [k for k in state["model"] if "_orig_mod" in k]  # the plain module's
    resumed = _search(tmp_path / "resumed", rule, backend, ops)
    resumed.load_state_dict(state)
    resumed.run(quiet=True)
    for run in (comp, resumed):
        for (k, v), w in zip(eager.model.state_dict().items(), run.model.state_dict().values()):
            torch.testing.assert_close(w, v, rtol=1e-5, atol=1e-6, msg=k)
