"""The thread governor (hdnas/engine/threads.py): the choice from usable CPUs and the load of
other processes, following the load during a run, and the fixed modes."""
import torch

from hdnas.engine import threads
from hdnas.engine.threads import ThreadGovernor, choose


def test_choose():
    assert choose(2, 0.0) == 2 and choose(2, 0.3) == 2      # quiet: every core
    assert choose(2, 0.6) == 1 and choose(2, 1.0) == 1      # one busy neighbour takes a core
    assert choose(2, 2.0) == 1 and choose(2, 5.0) == 1      # never below one thread
    assert choose(16, 3.2) == 13 and choose(1, 0.0) == 1


def test_governor_follows_the_load(monkeypatch):
    old = torch.get_num_threads()
    load = {"others": 0.0}
    clock = {"t": 0.0}
    monkeypatch.setattr(threads, "usable_cpus", lambda: 4)
    monkeypatch.setattr(ThreadGovernor, "measure", lambda self, s: load["others"])
    monkeypatch.setattr(ThreadGovernor, "others_since_mark", lambda self: load["others"])
    try:
        g = ThreadGovernor(0, clock=lambda: clock["t"])
        assert g.adaptive and g.threads == 4 == torch.get_num_threads()
        assert "4 thread(s) of 4 usable CPU(s): other processes keep 0.0" in g.reason
        load["others"] = 1.8
        assert g.check() == 4                        # not yet: within the interval
        clock["t"] += threads.INTERVAL
        assert g.check() == 2 == torch.get_num_threads()
        load["others"] = 0.1
        clock["t"] += threads.INTERVAL
        assert g.check() == 4
        fixed = ThreadGovernor(3, clock=lambda: clock["t"])
        load["others"] = 3.0
        clock["t"] += threads.INTERVAL
        assert not fixed.adaptive and fixed.check() == 3 and "--threads 3" in fixed.reason
        det = ThreadGovernor(0, deterministic=True)
        assert not det.adaptive and det.threads == 4 and "--deterministic" in det.reason
    finally:
        torch.set_num_threads(old)


def test_load_of_other_processes_is_measured(monkeypatch):
    """Other processes' load = the machine's busy time less this process's own, per second."""
    clock = {"t": 100.0}
    counters = {"machine": 50.0, "own": 10.0}
    monkeypatch.setattr(threads, "_machine_busy", lambda: counters["machine"])
    monkeypatch.setattr(threads, "_own_busy", lambda: counters["own"])
    g = ThreadGovernor(1, clock=lambda: clock["t"])
    clock["t"] += 4.0
    counters["machine"] += 6.0   # 1.5 cores busy over 4 s, of which
    counters["own"] += 4.0       # 1 core was this process
    assert abs(g.others_since_mark() - 0.5) < 1e-9


def test_the_counters_are_real():
    import time

    m0, o0 = threads._machine_busy(), threads._own_busy()
    t = time.perf_counter()
    while threads._own_busy() - o0 < 0.1 and time.perf_counter() - t < 20:  # 0.1 s of CPU
        pass
    own, machine = threads._own_busy() - o0, threads._machine_busy() - m0
    assert own >= 0.1 and machine >= own - 0.05  # the machine's busy time includes ours
    assert 1 <= threads.usable_cpus() <= (__import__("os").cpu_count() or 1)
