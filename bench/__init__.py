"""Benchmarks and byte/FLOP models (a package so that ``python -m bench.gpu`` runs from the
repository root; pytest collects ``bench/bench_*.py`` only when asked to)."""
