"""``hdnas.darts.patch(model)``: swap every DARTS-style MixedOp of a model for ours, in place."""
from __future__ import annotations

import os
import platform
import types
from dataclasses import dataclass, field

from torch import nn

from hdnas.darts.mixed import MixedOp, check_backend, check_recompute
from hdnas.darts.operations import NotRecognised
from hdnas.mixed import cpu_cache as _cpu_cache

#: glibc's per-thread cache and fast bins of small chunks off: a search's freed tensor memory then
#: merges and is reused instead of the heap growing (docs/darts.md, "Memory: the heap")
GLIBC_MEMORY_TUNABLES = "glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0"


def memory_tip(environ=None, libc: str | None = None) -> str | None:
    """The report's one-line memory tip: where the process runs on glibc (``libc``: the C
    library's name, default ``platform.libc_ver()``) without ``GLIBC_MEMORY_TUNABLES`` in its
    ``GLIBC_TUNABLES`` (``environ``: default ``os.environ``, read when the process started), the
    environment line that keeps a search's peak memory near its live tensors; else None."""
    libc = platform.libc_ver()[0] if libc is None else libc
    if libc != "glibc":
        return None
    environ = os.environ if environ is None else environ
    have = dict(kv.split("=", 1) for kv in environ.get("GLIBC_TUNABLES", "").split(":") if "=" in kv)
    want = dict(kv.split("=", 1) for kv in GLIBC_MEMORY_TUNABLES.split(":"))
    if all(have.get(k) == v for k, v in want.items()):
        return None
    return (f"peak memory: start the search with GLIBC_TUNABLES={GLIBC_MEMORY_TUNABLES} "
            "(glibc keeps freed small chunks between large freed tensors otherwise; "
            "docs/darts.md, 'Memory: the heap')")


@dataclass
class PatchReport:
    """What ``patch`` swapped (module name -> candidate names and stride) and what it left alone
    (module name -> why)."""

    backend: str
    swapped: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    #: whether ``model.new()`` now returns patched copies (DARTS' second-order architect builds
    #: its unrolled model with it)
    wraps_new: bool = False
    #: whether hdnas' caching CPU allocator is installed after the call (``hdnas.mixed.cpu_cache``)
    cpu_cache: bool = False
    #: ``memory_tip()`` at patch time (None: nothing to suggest)
    tip: str | None = None

    def __str__(self):
        lines = [f"hdnas.darts.patch: swapped {len(self.swapped)} mixed op(s) for the "
                 f"{self.backend!r} backend, left {len(self.skipped)}"]
        kinds = {}
        for desc in self.swapped.values():
            kinds[desc] = kinds.get(desc, 0) + 1
        lines += [f"  {n} x {d}" for d, n in kinds.items()]
        if self.wraps_new:
            lines.append("  model.new() returns patched copies")
        if self.cpu_cache:
            lines.append("  CPU tensors: hdnas' caching allocator (hdnas.mixed.cpu_cache; "
                         f"cpu_cache=False or {_cpu_cache.ENV}=0 opts out)")
        lines += [f"  left {name}: {why}" for name, why in self.skipped.items()]
        if self.tip:
            lines.append(f"  tip: {self.tip}")
        return "\n".join(lines)


def _looks_like_mixed_op(m: nn.Module) -> bool:
    """A module with an ``_ops`` ModuleList of leaf candidates (a DARTS cell also has ``_ops``,
    but of mixed ops: it is a container, not a mixed op)."""
    ops = getattr(m, "_ops", None)
    return (isinstance(ops, nn.ModuleList) and not isinstance(m, MixedOp)
            and not any(isinstance(getattr(o, "_ops", None), nn.ModuleList) for o in ops))


def _patched_new(self):
    """``model.new()`` of a patched model: the class's own ``new()``, then the same patch."""
    fresh = type(self).new(self)
    patch(fresh, **self._hdnas_patch)
    return fresh


def patch(model: nn.Module, backend: str = "fused", recompute: bool | str = "auto",
          partial_k: int | None = None, verbose: bool = False,
          copies: bool = True, cpu_cache: bool = True) -> PatchReport:
    """Replace, in place, every submodule that holds a ``_ops`` ModuleList of DARTS candidate
    layouts (quark0/darts' ``model_search.MixedOp``; PC-DARTS' when it has the ``mp`` pool) by a
    ``hdnas.darts.MixedOp`` that adopts those very candidate modules: parameters (the same
    objects, so an optimizer built before the patch keeps working), BN running statistics and
    train/eval mode are kept. A module whose candidates are not all recognised is left as it is
    and listed in ``report.skipped`` with the reason. The swapped op keeps the call signature
    ``op(x, weights)`` (and ``forward_gdas(x, weights, index)``). ``partial_k`` overrides
    PC-DARTS' K (default 4 when the ``mp`` pool is there). Returns the report (printed when
    ``verbose``).

    Copies a search makes are patched too (``copies=True``): when the model has DARTS' ``new()``
    (which builds a fresh, unpatched network: DARTS' second-order architect makes its unrolled
    model with it), ``model.new`` is replaced, on this instance, by a method that calls the
    class's ``new()`` and patches the result the same way; ``copy.deepcopy(model)`` copies the
    swapped ops and rebinds that method to the copy.

    ``recompute``: the swapped ops' recomputation (True, False, or "auto": recompute on input
    planes of more than 256 pixels; ``hdnas.darts.MixedOp``).

    ``cpu_cache=True`` (default), when something was swapped in a model on the CPU (or without
    parameters): installs hdnas' caching allocator for CPU tensors, process-wide
    (``hdnas.mixed.cpu_cache``: glibc's heap otherwise grows from step to step of a search, to
    several times its live tensors);
    ``HDNAS_CPU_CACHE=0`` opts out too. ``report.tip``: without it, on glibc without its
    small-chunk caches turned off, the environment line that keeps the search's peak memory near
    its live tensors (``memory_tip``)."""
    check_backend(backend)
    check_recompute(recompute)
    report = PatchReport(backend)
    targets = [(name, m) for name, m in model.named_modules() if _looks_like_mixed_op(m)]
    if _looks_like_mixed_op(model):
        raise ValueError("patch() swaps MixedOps inside a model; to convert a lone MixedOp use "
                         "hdnas.darts.MixedOp.from_module(op)")
    for name, m in targets:
        try:
            new = MixedOp.from_module(m, backend=backend, recompute=recompute, partial_k=partial_k)
        except (NotRecognised, ValueError) as e:
            report.skipped[name] = str(e)
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, (nn.ModuleList, nn.Sequential)):
            parent[int(attr)] = new
        else:
            setattr(parent, attr, new)
        k = f", K={new.partial_k}" if new.partial_k > 1 else ""
        report.swapped[name] = f"{type(m).__name__}(stride {new.stride}{k}: {', '.join(new.primitives)})"
    # the allocator once something is swapped, on a model that is on the CPU now (a model moved
    # to a GPU later keeps it: CPU tensors only, harmless there)
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if cpu_cache and on_cpu and report.swapped:
        _cpu_cache.enable()
    report.cpu_cache = _cpu_cache.enabled()
    report.tip = None if report.cpu_cache else memory_tip()
    if copies and callable(getattr(type(model), "new", None)):
        # copies leave the allocator as this call left it (a later disable() stays)
        object.__setattr__(model, "_hdnas_patch", dict(backend=backend, recompute=recompute,
                                                       partial_k=partial_k, copies=True,
                                                       cpu_cache=False))
        object.__setattr__(model, "new", types.MethodType(_patched_new, model))
        report.wraps_new = True
    if verbose:
        print(report)
    return report
