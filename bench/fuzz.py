"""Fuzz the mixed-op backends against the reference backend: the command line of the harness
``hdnas.testing.fuzz`` (its docstring says what a case is and how it is checked).

    python bench/fuzz.py                          # 200 cases per backend that serves the CPU
    python bench/fuzz.py --cases 2000 --backend merged --backend native
    python bench/fuzz.py --backend triton --cases 2000 --time-limit 600
    python bench/fuzz.py --case 1234 --backend native        # replay one case, verbose

Also ``python -m bench.fuzz``, from the repository root.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from hdnas.testing.fuzz import main  # noqa: E402  (sets TRITON_INTERPRET on a machine without CUDA)

if __name__ == "__main__":
    sys.exit(main())
