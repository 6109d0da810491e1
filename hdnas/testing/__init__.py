"""Shared test and check helpers, imported by tests/ and bench/, never by the library:

* ``hdnas.testing.fuzz``: the fuzz harness of the mixed-op backends (command line: bench/fuzz.py);
* ``hdnas.testing.bounds``: round-off bounds (conformance tests, the GPU checks of bench.gpu);
* ``hdnas.testing.cuda_host``: the host build of the CUDA kernels (tests/csrc);
* ``hdnas.testing.memory``: bytes autograd saves for backward;
* ``hdnas.testing.threads``: a computation on several intra-op thread counts (kernels whose
  results must not depend on the split);
* ``hdnas.testing.shared``: where the shared data lives (``shared_dir``; tests/conftest.py's
  ``shared_dir`` fixture).
"""
