"""Shared test and check helpers: the fuzz harness, round-off bounds, the host-CUDA build, small fixtures. Imported by tests/ and bench/, never by the library."""
