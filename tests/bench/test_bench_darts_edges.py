"""bench.bench_darts_edges: DARTS' edge shapes, and a run at a tiny shape that writes its table
(timings are not checked: speed is measured, never asserted)."""
from __future__ import annotations

from bench import bench_darts_edges


def test_edge_shapes_are_darts_search_network():
    # DARTS' search: 8 cells, C 16, 32x32: reductions at cells 2 and 5, 14 edges a cell
    got = bench_darts_edges.edge_shapes(16, 8, 32)
    assert got == {(16, 32, 1): 28, (32, 32, 2): 8, (32, 16, 1): 34, (64, 16, 2): 8,
                   (64, 8, 1): 34}
    assert sum(bench_darts_edges.edge_shapes(8, 5, 9).values()) == 5 * 14


def test_runs_and_writes_the_table(tmp_path):
    out = tmp_path / "edges.md"
    bench_darts_edges.main(["--C", "4", "--layers", "3", "--size", "8", "--batch", "2",
                            "--reps", "1", "--out", str(out)])
    text = out.read_text()
    assert "| channels | size | stride | edges | backward |" in text and "vector ISA" in text
    assert "42 edges, full backward" in text and "42 edges, arch-only backward" in text
    for r in ("True", "False", "auto"):  # one fused column per recompute value (the default)
        assert f"fused ms, recompute={r}" in text and f"fused (recompute={r})" in text
