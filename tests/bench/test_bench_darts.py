"""bench.bench_darts at toy sizes: every configuration runs in its own process, original and
swapped alternate per round, and the Markdown table gives each swapped row its ratio against the
original of the same case and round."""
from __future__ import annotations

from bench import bench_darts


def test_configs_alternate_original_and_swapped():
    a = bench_darts.main.__globals__["argparse"].Namespace(
        what="op,step", models="darts,gdas", orders="1,2", batches="2,4", op_batch=3,
        backends=None, device="cpu", C=4, layers=3, size=8, iters=1, rounds=2, threads=1,
        no_recompute_too=False)
    cfgs = list(bench_darts._configs(a))
    ops = [c for c in cfgs if c["what"] == "op"]
    assert [(c["stride"], c["round"], c["backend"]) for c in ops] == [
        (s, r, b) for s in (1, 2) for r in (0, 1) for b in ("reference", "fused")]
    steps = [(c["batch"], c["model"], c["order"]) for c in cfgs if c["what"] == "step"]
    # darts in both orders, GDAS first order only; 2 rounds x 2 backends each
    assert sorted(set(steps)) == [(b, m, o) for b in (2, 4)
                                  for m, o in (("darts", 1), ("darts", 2), ("gdas", 1))]
    assert all(steps.count(s) == 4 for s in set(steps))


def test_tiny_run_writes_a_table(tmp_path):
    out = tmp_path / "t.md"
    bench_darts.main(["--what", "step", "--models", "darts,pcdarts", "--orders", "2",
                      "--batches", "2", "--C", "4", "--layers", "3", "--size", "8",
                      "--rounds", "1", "--markdown", str(out)])
    text = out.read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| step")]
    assert len(rows) == 4, text
    assert "error" not in text
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert [(c[1], c[2], c[5]) for c in cells] == [
        ("darts", "2", "reference"), ("darts", "2", "fused"),
        ("pcdarts", "1", "reference"), ("pcdarts", "1", "fused")]
    assert cells[0][10] == "1.00" and float(cells[1][10]) > 0  # ratio against its own original
    assert [c[7] for c in cells] == ["no", "yes", "no", "yes"]  # patch() installs the cache
    assert [c[6] for c in cells] == ["", "auto", "", "auto"]


def test_cpu_cache_and_recompute_options_make_the_configurations():
    import argparse
    a = argparse.Namespace(what="step", models="darts", orders="2", batches="2", op_batch=3,
                           backends=None, device="cpu", C=4, layers=3, size=8, iters=1, rounds=1,
                           threads=1, no_recompute_too=True, recompute="auto,true",
                           cpu_cache="original-too")
    got = [(c["backend"], c["recompute"], c["cpu_cache"]) for c in bench_darts._configs(a)]
    assert got == [("reference", None, False), ("reference", None, True),
                   ("fused", "auto", True), ("fused", True, True), ("fused", False, True)]
    a.cpu_cache, a.no_recompute_too, a.recompute = "off", False, "auto"
    got = [(c["backend"], c["recompute"], c["cpu_cache"]) for c in bench_darts._configs(a)]
    assert got == [("reference", None, False), ("fused", "auto", False)]


def test_live_memory_sets_the_glibc_threshold_for_the_children_only():
    import os
    assert bench_darts.child_env(True)["MALLOC_MMAP_THRESHOLD_"] == "65536"
    assert bench_darts.child_env(False).get("MALLOC_MMAP_THRESHOLD_") == os.environ.get(
        "MALLOC_MMAP_THRESHOLD_")


def test_malloc_tuned_reaches_every_child(monkeypatch):
    """--malloc tuned: every configuration (original and swapped) carries it, and a child tunes
    the allocator before it measures."""
    import argparse

    from hdnas.engine import allocator
    a = argparse.Namespace(what="step", models="darts", orders="1", batches="2", op_batch=3,
                           backends=None, device="cpu", C=4, layers=3, size=8, iters=1, rounds=1,
                           threads=1, no_recompute_too=False, malloc="tuned")
    cfgs = list(bench_darts._configs(a))
    assert {c["backend"] for c in cfgs} == {"reference", "fused"}
    assert all(c["malloc"] == "tuned" for c in cfgs)
    called = []
    monkeypatch.setattr(allocator, "tune", lambda: called.append(1) or "tuned")
    res = bench_darts.child(cfgs[0])
    assert called == [1] and res["sec"] > 0


def test_malloc_coalesce_turns_glibcs_small_chunk_caches_off_for_every_child(monkeypatch):
    """--malloc coalesce: the children's environment carries glibc's tunables (appended to any
    already set), the same for the original and the swapped configurations."""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    env = bench_darts.child_env(False, "coalesce")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0"
    assert "GLIBC_TUNABLES" not in bench_darts.child_env(False, "default")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.check=0")
    assert bench_darts.child_env(True, "coalesce")["GLIBC_TUNABLES"] == (
        "glibc.malloc.check=0:glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0")


def test_malloc_coalesce_run_says_so_in_its_table(tmp_path):
    out = tmp_path / "t.md"
    bench_darts.main(["--what", "step", "--models", "darts", "--orders", "1", "--batches", "2",
                      "--C", "4", "--layers", "3", "--size", "8", "--rounds", "1",
                      "--malloc", "coalesce", "--markdown", str(out)])
    text = out.read_text()
    assert "`--malloc coalesce`" in text and "error" not in text
    assert len([ln for ln in text.splitlines() if ln.startswith("| step")]) == 2
