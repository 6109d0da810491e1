"""Data-parallel runs with ``torch.distributed``, launched by ``torchrun`` (docs/distributed.md).

Every rank holds the whole model and computes the gradients of its share of the global batch;
``Dist.average`` then averages a list of gradient tensors across the ranks with **one**
all-reduce of a flat buffer (one bucket per dtype). Why not DDP: the search computes gradients
with ``backward(inputs=weights)``, ``backward(inputs=arch)`` and ``torch.autograd.grad`` (the
darts2 virtual step and Hessian-vector product); DDP's reducer hooks the gradient
accumulation of all parameters once per forward and does not see ``autograd.grad`` at all, so
it would need ``no_sync`` tricks and still miss the darts2 gradients. An explicit average after
each gradient computation is the same operation for every rule and obviously complete; it gives
up DDP's overlap of communication with the backward pass (measured cost: docs/distributed.md).

Single-process runs (no ``torchrun``, or ``WORLD_SIZE=1``) use ``Dist()``: every collective is
a no-op, so the numbers are bit for bit those of the plain loop.

A rank that dies or hangs makes the collectives of the others fail after ``timeout`` seconds
(``HDNAS_DIST_TIMEOUT``, default 1800: long enough for a validation pass or a data cache build
on rank 0) with ``DistError``; ``describe_failure`` turns that into a clear message.
"""
from __future__ import annotations

import datetime
import os
import pickle
import socket

import torch
import torch.distributed as dist

__all__ = ["Dist", "init_from_env", "DistError", "describe_failure", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 1800.0
DistError = getattr(dist, "DistError", RuntimeError)


class Dist:
    """The process group of a run, or a single process (the default). ``rank``/``world``
    are global, ``local_rank`` the index on this node (the GPU a rank uses)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0,
                 backend: str | None = None, device: torch.device | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.backend, self.timeout_s = backend, timeout_s
        # the device collectives run on: NCCL needs CUDA tensors, gloo CPU ones
        self.device = device or torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self):
        if not self.enabled:
            return "Dist(single process)"
        return f"Dist(rank {self.rank}/{self.world}, local {self.local_rank}, {self.backend})"

    # -- collectives ----------------------------------------------------------------------
    def _flat_collective(self, tensors: list[torch.Tensor], collective) -> None:
        """Run ``collective(flat)`` on one flat buffer per dtype holding ``tensors`` and copy the
        result back into them, in place."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group]).to(self.device)
            collective(flat)
            offset = 0
            for t in group:
                n = t.numel()
                t.detach().copy_(flat[offset:offset + n].view_as(t))
                offset += n

    def average(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the ranks, in place: one all-reduce of a flat
        buffer per dtype (gloo has no AVG, so SUM then divide: the result is the same on
        every rank)."""
        if not self.enabled or not tensors:
            return

        def mean(flat):
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.world
        self._flat_collective(tensors, mean)

    def average_grads(self, params, scalars: tuple = ()) -> list[float]:
        """Average ``p.grad`` of every parameter (a missing gradient counts as zero: another
        rank may have one) and the given scalar tensors (the logged losses) in one all-reduce;
        returns the averaged scalars as floats."""
        params = list(params)
        if not self.enabled:
            return [float(s.detach()) for s in scalars]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        extra = [s.detach().to(params[0].grad.dtype if params else torch.float32).reshape(1)
                 for s in scalars]
        self.average([p.grad for p in params] + extra)
        return [float(e) for e in extra]

    def broadcast_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Copy rank 0's values into ``tensors`` on every rank, in place (one flat buffer per
        dtype), as DDP does with the parameters at start."""
        if not self.enabled or not tensors:
            return
        self._flat_collective(tensors, lambda flat: dist.broadcast(flat, src=0))

    def sum(self, values: list[float]) -> list[float]:
        """Sum of float64 values over the ranks."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (also a barrier)."""
        return self.sum([1.0 if flag else 0.0])[0] > 0

    def broadcast(self, obj):
        """``obj`` of rank 0 on every rank (pickled by torch: only for objects rank 0 made)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def on_main(self, fn):
        """Run ``fn`` on rank 0 only; its result on every rank, or its exception raised on every
        rank (so an error on rank 0 does not leave the others waiting)."""
        result = error = None
        if self.is_main:
            try:
                result = fn()
            except (ValueError, SystemExit, OSError) as e:
                error = e
        result, error = self.broadcast((result, error)) if self.enabled else (result, error)
        if error is not None:
            raise error
        return result

    def first_on_each_node(self, fn):
        """Run ``fn`` on local rank 0 of each node, then on every other rank, and return its
        result (e.g. build a cache once per node, then find it). An error on a builder is raised
        there and, as a ``ValueError`` saying so, on every other rank."""
        result = error = None
        if self.local_rank == 0:
            try:
                result = fn()
            except (ValueError, OSError) as e:
                error = e
        failed = self.any(error is not None)
        if error is not None:
            raise error
        if failed:
            raise ValueError("preparing the data failed on another rank (its error is above)")
        return fn() if self.local_rank != 0 else result

    def checksums(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Per-tensor float64 (sum, weighted sum) on this rank: cheap, and sensitive to any
        change of a value or its position."""
        rows = []
        for t in tensors:
            x = t.detach().to(torch.float64).reshape(-1)
            w = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=x.device)
            rows.append(torch.stack([x.sum(), (x * w).sum() / x.numel()]))
        return torch.stack(rows).cpu() if rows else torch.zeros(0, 2, dtype=torch.float64)

    def check_same(self, named: list[tuple[str, torch.Tensor]], what: str) -> None:
        """Raise ``RuntimeError`` unless every rank holds bit-identical tensors (compared by
        checksum); the message names the first tensor that differs."""
        if not self.enabled:
            return
        mine = self.checksums([t for _, t in named]).to(self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine)
        for r, theirs in enumerate(gathered):
            diff = (theirs != mine).any(dim=1).nonzero().flatten().tolist()
            if diff:
                name = named[diff[0]][0]
                raise RuntimeError(f"ranks out of sync {what}: {name} differs between rank "
                                   f"{self.rank} and rank {r} ({len(diff)} tensors differ)")

    def close(self, sync: bool = False) -> None:
        """Tear the process group down. ``sync`` (a run that ended normally): first wait until
        every rank got here, so that no rank closes its connections while another is still
        in its last collective or writing (seen once in CI: a rank that left early died with
        SIGABRT, "terminate called without an active exception", inside gloo's teardown)."""
        if self.enabled and dist.is_initialized():
            if sync:
                try:
                    dist.barrier()
                except Exception:  # noqa: BLE001 - a rank that failed already said why
                    pass
            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def timeout_from_env() -> float:
    value = os.environ.get("HDNAS_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        t = float(value)
    except ValueError:
        raise ValueError(f"HDNAS_DIST_TIMEOUT={value!r} is not a number of seconds") from None
    if t <= 0:
        raise ValueError(f"HDNAS_DIST_TIMEOUT must be positive, got {value}")
    return t


def init_from_env(device: str = "auto") -> Dist:
    """The process group torchrun describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), or a single process without it.
    NCCL when the run uses CUDA, gloo otherwise; each rank uses GPU ``LOCAL_RANK``."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Dist()
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    use_cuda = (device == "auto" and torch.cuda.is_available()) or device.startswith("cuda")
    timeout_s = timeout_from_env()
    kwargs = {}
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but this node has {torch.cuda.device_count()} "
                             "GPUs: start at most one process per GPU (--nproc-per-node)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
        kwargs["device_id"] = dev
        # a collective that fails or times out aborts the communicator instead of hanging
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return Dist(rank, world, local, backend, dev, timeout_s)


def describe_failure(d: Dist, err: BaseException) -> str:
    """A one-paragraph explanation of a failed collective, for the error message."""
    return (f"rank {d.rank} of {d.world} on {socket.gethostname()}: communication with the other "
            f"ranks failed ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}). "
            f"Another rank most likely died (see its error) or hung for more than "
            f"{d.timeout_s:g} s (HDNAS_DIST_TIMEOUT); the job stops.")


def is_comm_failure(err: BaseException) -> bool:
    """Errors raised by a collective whose peer died or timed out."""
    if isinstance(err, DistError):
        return True
    text = str(err)
    return isinstance(err, (RuntimeError, pickle.UnpicklingError)) and any(
        s in text for s in ("Connection closed by peer", "Connection reset", "Timed out",
                            "timed out", "Gloo", "NCCL"))
