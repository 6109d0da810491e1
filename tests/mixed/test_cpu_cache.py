"""hdnas' caching CPU allocator (hdnas.mixed.cpu_cache, csrc/cpu/cpu_cache.cpp).

Each check runs in a fresh interpreter (the allocator is process-wide; the counters start at 0
there), except that the rest of the test session also runs under it once any test has called
``hdnas.darts.patch`` (its default)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import os, threading, torch
from hdnas.mixed import cpu_cache as cc
assert not cc.enabled()
assert cc.enable() and cc.enabled()
"""


def _run(code: str, env: dict | None = None) -> str:
    p = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], capture_output=True,
                       text=True, timeout=300, env={**os.environ, **(env or {})})
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_buffers_are_reused_by_size_class_and_hold_their_data(nat):
    _run("""
        s0 = cc.stats()
        for n in (1, 1000, 32768, 32769, 10**6, 3 * 10**6 + 7):  # below and above 128 KiB
            x = torch.arange(n, dtype=torch.float64)
            assert x.data_ptr() % 64 == 0
            y = x * 2 + 1
            assert torch.equal(y, 2 * torch.arange(n, dtype=torch.float64) + 1)
        del x, y
        s1 = cc.stats()
        assert s1.misses > s0.misses and s1.live == s0.live, (s0, s1)
        # the same sizes again: served from the cache, no new mapping
        for _ in range(3):
            a = torch.empty(10**6, dtype=torch.float64).fill_(3.0)
            b = torch.empty(10**6 + 100, dtype=torch.float64).fill_(4.0)  # same class (1/8 octave)
            assert a.sum().item() == 3.0 * 10**6 and b.sum().item() == 4.0 * (10**6 + 100)
            del a, b
        s2 = cc.stats()
        assert s2.misses <= s1.misses + 1 and s2.hits >= s1.hits + 5, (s1, s2)
        # a size class pads by at most 1/8 (plus the 64-byte header)
        for n in (131072, 200000, 10**6 + 1, 3 * 2**20 + 5):
            before = cc.stats().live
            t = torch.empty(n, dtype=torch.uint8)
            grew = cc.stats().live - before
            assert n + 64 <= grew <= max(1.125 * (n + 64), n + 64 + 4096), (n, grew)
            del t
        before = cc.stats().live
        t = torch.empty(131072 - 65, dtype=torch.uint8)  # below 128 KiB with its header: malloc
        assert cc.stats().live == before
        del t
        # empty tensors and growth by resize_ keep working
        e = torch.empty(0)
        assert e.numel() == 0
        z = torch.arange(10.0)
        z.resize_(10**6)
        assert torch.equal(z[:10], torch.arange(10.0))
        del z
        # release() gives the cached buffers back
        cached = cc.stats().cached
        assert cached > 0 and cc.release() == cached and cc.stats().cached == 0
    """)


def test_mapped_memory_stays_within_twice_the_live_peak(nat):
    """A sequence of ever new sizes (the case a per-class cache handles worst): the mapped total
    (live + cached) stays within 2x the peak of the live total, plus the largest request."""
    _run("""
        big = 0
        for i in range(200):
            n = 40000 + 1733 * i  # float32: 160 KiB .. 1.5 MiB, 200 classes' worth of requests
            keep = [torch.ones(n) for _ in range(1 + i % 3)]
            big = max(big, 4 * n + 64)
            del keep
        s = cc.stats()
        live_peak = 3 * big  # at most three buffers live at a time
        assert s.peak_mapped <= 2 * live_peak + big, (s, live_peak)
        assert s.unmapped > 0, s  # it did give memory back
    """)


def test_threads_and_fork(nat):
    """Concurrent allocations from several threads (torch ops drop the GIL) and a forked child
    that allocates: right results, nothing leaked."""
    _run("""
        live0 = cc.stats().live
        errors = []
        def work(seed):
            g = torch.Generator().manual_seed(seed)
            try:
                for _ in range(150):
                    n = int(torch.randint(30000, 400000, (1,), generator=g))
                    x = torch.rand(n, generator=g, dtype=torch.float64)
                    y = x.clone().mul_(2)
                    if not torch.equal(y, 2 * x):
                        errors.append(seed)
            except Exception as e:
                errors.append(repr(e))
        ts = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        assert not errors, errors
        assert cc.stats().live == live0, (live0, cc.stats())
        # forks while another thread allocates and frees: the child must not inherit a held lock
        import time
        stop = []
        def churn():
            while not stop:
                torch.ones(300000).add_(1)
        t = threading.Thread(target=churn)
        t.start()
        try:
            for _ in range(20):
                pid = os.fork()
                if pid == 0:
                    ok = torch.equal(torch.ones(10**6) * 2, torch.full((10**6,), 2.0))
                    os._exit(0 if ok and cc.enabled() else 1)
                deadline = time.time() + 30
                while True:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        break
                    if time.time() > deadline:
                        os.kill(pid, 9)
                        raise AssertionError("forked child hung (allocator lock held at fork?)")
                    time.sleep(0.01)
                assert status == 0, status
        finally:
            stop.append(1)
            t.join()
    """)


def test_results_do_not_depend_on_the_allocator(nat):
    """A DARTS network's loss and gradients are bit-identical with the allocator off and on."""
    _run("""
        import copy
        import hdnas.darts as hd
        torch.manual_seed(0)
        from hdnas.darts.model_search import Network
        net = Network(4, 10, 3, steps=2, multiplier=2, weighting="softmax")
        hd.patch(net, cpu_cache=False)
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
        def grads():
            m = copy.deepcopy(net)
            loss = m._loss(x, y)
            return [loss.detach()] + list(torch.autograd.grad(loss, list(m.parameters())))
        s0 = cc.stats()
        on = grads()
        s1 = cc.stats()
        assert s1.hits + s1.misses > s0.hits + s0.misses + 10, (s0, s1)  # it served the run
        assert cc.disable() and not cc.enabled()
        off = grads()
        assert all(torch.equal(a, b) for a, b in zip(on, off))
    """)


def test_opt_out_and_patch_report(nat):
    # HDNAS_CPU_CACHE=0: enable() does nothing, patch() says so by not listing it
    code = """
import torch
from torch import nn
import hdnas.darts as hd
from hdnas.mixed import cpu_cache as cc
assert cc.opted_out() and not cc.enable() and not cc.enabled()
r = hd.patch(nn.Sequential(hd.PlainMixedOp(4, 1)))
assert not r.cpu_cache and not cc.enabled() and "caching allocator" not in str(r)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HDNAS_CPU_CACHE": "0"})
    assert p.returncode == 0, p.stderr
    # set after it was installed: it stays installed, and enable() says so
    _run("""
        os.environ["HDNAS_CPU_CACHE"] = "0"
        assert cc.opted_out() and cc.enable() and cc.enabled()
    """)
    code = """
import torch
from torch import nn
import hdnas.darts as hd
from hdnas.mixed import cpu_cache as cc
assert not hd.patch(nn.Sequential(hd.PlainMixedOp(4, 1)), cpu_cache=False).cpu_cache
assert not cc.enabled()
assert not hd.patch(nn.Sequential(nn.Conv2d(3, 3, 1))).cpu_cache  # nothing swapped: untouched
assert not cc.enabled()
try:
    hd.patch(hd.PlainMixedOp(4, 1))  # refused: a lone mixed op
except ValueError:
    pass
assert not cc.enabled()
r = hd.patch(nn.Sequential(hd.PlainMixedOp(4, 1)))
assert r.cpu_cache and cc.enabled() and "caching allocator" in str(r)
# a patched model's copies (DARTS' new()) leave the allocator as the user left it
from hdnas.testing import darts_reference as ref
net = ref.Network(4, 10, 3, nn.CrossEntropyLoss())
hd.patch(net)
assert cc.disable()
net.new()
assert not cc.enabled()
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "HDNAS_CPU_CACHE"})
    assert p.returncode == 0, p.stderr
