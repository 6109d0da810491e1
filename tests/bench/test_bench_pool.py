"""bench.bench_pool runs and reports every route at a tiny shape (timings are not checked: speed
is measured, never asserted)."""
from __future__ import annotations

from bench import bench_pool


def test_routes_agree_and_table_is_written(tmp_path):
    import torch
    from hdnas.mixed import native
    x = torch.randn(2, 3, 5, 6)
    fns = bench_pool.routes(native.available("cpu"))
    for s in (1, 2):
        want = fns["nchw"](x, s)
        for name, f in fns.items():
            assert torch.equal(f(x, s), want), (name, s)
    out = tmp_path / "pool.md"
    rows = bench_pool.main(["--batch", "2", "--C", "2", "--size", "8", "--reps", "1",
                            "--out", str(out)])
    assert {(r[0], r[1], r[2]) for r in rows} == {(2, s, k) for s in (1, 2) for k in fns}
    text = out.read_text()
    assert "| batch | stride | route |" in text and "vector ISA" in text
