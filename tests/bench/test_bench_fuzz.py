"""bench/fuzz.py, the command line of the fuzz harness (hdnas.testing.fuzz): the replay command a
failing fuzz test prints runs as printed, from the repository root."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hdnas.testing import fuzz

ROOT = Path(__file__).resolve().parents[2]


def test_printed_replay_command_runs():
    r = fuzz.run_case(fuzz.DEFAULT_SEED, 3, "merged")
    cmd = r.replay_command()
    assert cmd.startswith("python bench/fuzz.py "), cmd
    out = subprocess.run([sys.executable, *cmd.split()[1:]], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"fuzz ok: backend=merged device=cpu seed={fuzz.DEFAULT_SEED} case=3" in out.stdout, \
        out.stdout
