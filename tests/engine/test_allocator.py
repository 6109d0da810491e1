"""hdnas.engine.allocator: after tune(), freed large blocks are reused without new page faults."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hdnas.engine import allocator

PROBE = r"""
import resource, sys, torch
from hdnas.engine import allocator
print(allocator.tune())
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # large blocks (64, 32, 64 MiB: above any mmap threshold) as a training step frees them
    a = torch.ones(16 * 2 ** 20)
    b = torch.ones(8 * 2 ** 20)
    del a
    c = torch.ones(16 * 2 ** 20)
    del b, c
for _ in range(8):  # the heap settles within a few steps (aligned blocks fragment it at first)
    step()
f0 = faults()
step()
step()
print(faults() - f0)
"""


def _probe(env_extra):
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    return out[0], int(out[-1])


@pytest.mark.skipif(allocator._libc() is None, reason="not glibc")
def test_tuned_heap_reuses_freed_pages():
    how, faults = _probe({"HDNAS_MALLOC": ""})
    assert how == "tuned"
    assert faults < 2000  # two steps touch 2 x 40960 pages: reused, not faulted in again
    how, faults = _probe({"HDNAS_MALLOC": "default"})
    assert how == "default"
    assert faults > 60000  # glibc's default: fresh mmaps, every page faulted (the check can fail)


def test_opt_out_is_reported(monkeypatch):
    monkeypatch.setenv("HDNAS_MALLOC", "default")
    assert allocator.tune() == "default (HDNAS_MALLOC=default)"
