"""Training input for search and retraining: random aligned (LR, HR) patches with flips and
transposes, read from the on-disk image cache (``hdnas.data.cache``: every image of a folder
decoded once into memory-mapped uint8), so folders far larger than RAM work.

The patches of a step are a pure function of ``(seed, stream, step)`` and the global batch size:
the draw for the whole global batch is made from a NumPy generator seeded with those three
numbers, and rank ``r`` of ``N`` crops samples ``[r B/N, (r+1) B/N)`` of it. So the patches
depend neither on the number of DataLoader workers nor on the number of ranks, and a resumed
run (which restarts at its checkpoint's step) sees exactly the batches it would have seen.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from hdnas.data.benchmark import BenchmarkError
from hdnas.data.cache import ImageCache

DEFAULT_DIR = Path(__file__).resolve().parent / "default"
DataError = BenchmarkError
log = logging.getLogger("hdnas")


def split(n: int, part: tuple[float, float], what: str = "images") -> range:
    """The indices of ``part`` (fractions) of ``n`` items in name order."""
    lo, hi = round(part[0] * n), round(part[1] * n)
    if hi <= lo:
        raise DataError(f"the split {part} of {n} {what} is empty; give more images or a "
                        "separate folder")
    return range(lo, hi)


class PatchSampler:
    """Random (LR, HR) patch batches from the images ``indices`` of a cache."""

    def __init__(self, cache: ImageCache, scale: int, hr_patch: int, indices=None,
                 augment: bool = True, seed: int = 0, stream: int = 0, skip_bad: bool = False):
        if hr_patch % scale:
            raise DataError(f"HR patch {hr_patch} is not a multiple of the scale {scale}")
        if cache.scale != scale:
            raise DataError(f"{cache.path} holds x{cache.scale} images, not x{scale}")
        self.cache, self.scale, self.hr_patch, self.augment = cache, scale, hr_patch, augment
        self.seed, self.stream = seed, stream
        lp = hr_patch // scale
        indices = list(range(len(cache)) if indices is None else indices)
        small = [i for i in indices if min(cache.lr_size(i)) < lp]
        if small:
            msg = "; ".join(f"{cache.files[i]}: HR {cache.hr_size(i)[1]}x{cache.hr_size(i)[0]} is "
                            f"smaller than scale x patch = {scale} x {lp} = {hr_patch} px"
                            for i in small[:10])
            if not skip_bad:
                raise DataError(f"{cache.folder}: {len(small)} images too small for the patch: "
                                f"{msg} (--skip-bad-images leaves them out)")
            log.warning("%s: left out %d images smaller than the patch: %s", cache.folder,
                        len(small), msg)
            indices = [i for i in indices if i not in set(small)]
            if not indices:
                raise DataError(f"{cache.folder}: no image is large enough for patch {hr_patch}")
        self.indices = np.asarray(indices, dtype=np.int64)

    @property
    def names(self) -> list[str]:
        return [self.cache.names[i] for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def draw(self, step: int, batch: int) -> np.ndarray:
        """The global batch of ``step``: rows (image index, y, x, hflip, vflip, transpose)."""
        rng = np.random.default_rng([self.seed, self.stream, step])
        which = self.indices[rng.integers(len(self.indices), size=batch)]
        u = rng.random((batch, 2))
        flips = (rng.random((batch, 3)) < 0.5) & self.augment
        lp = self.hr_patch // self.scale
        sizes = self.cache.index[which][:, 4:6] - lp + 1  # LR positions per image
        yx = np.floor(u * sizes).astype(np.int64)
        return np.concatenate([which[:, None], yx, flips.astype(np.int64)], axis=1)

    def batch_at(self, step: int, batch: int, rank: int = 0, world: int = 1):
        """uint8 (LR, HR) patches (N, 3, h, w) of this rank's share of step ``step``'s global
        batch of ``batch``."""
        if batch % world:
            raise DataError(f"the global batch {batch} is not divisible by the {world} ranks")
        share = batch // world
        rows = self.draw(step, batch)[rank * share:(rank + 1) * share]
        lp, s = self.hr_patch // self.scale, self.scale
        lrs, hrs = [], []
        for i, y, x, hflip, vflip, rot in rows.tolist():
            lr = torch.from_numpy(np.array(self.cache.lr(i)[y:y + lp, x:x + lp]))  # copies
            hr = torch.from_numpy(np.array(self.cache.hr(i)[y * s:(y + lp) * s, x * s:(x + lp) * s]))
            lr, hr = lr.permute(2, 0, 1), hr.permute(2, 0, 1)
            if hflip:
                lr, hr = lr.flip(-1), hr.flip(-1)
            if vflip:
                lr, hr = lr.flip(-2), hr.flip(-2)
            if rot:
                lr, hr = lr.transpose(-1, -2), hr.transpose(-1, -2)
            lrs.append(lr)
            hrs.append(hr)
        return torch.stack(lrs), torch.stack(hrs)


class _StepBatches(torch.utils.data.Dataset):
    """Item ``step``: this rank's uint8 batch of that step (a DataLoader worker computes it)."""

    def __init__(self, sampler: PatchSampler, batch: int, rank: int, world: int):
        self.sampler, self.batch, self.rank, self.world = sampler, batch, rank, world

    def __getitem__(self, step):
        return self.sampler.batch_at(step, self.batch, self.rank, self.world)


def _worker_init(_):
    torch.set_num_threads(1)


def batches(sampler: PatchSampler, steps: range, batch: int, rank: int = 0, world: int = 1,
            workers: int = 0, prefetch: int = 4, pin_memory: bool = False):
    """An iterator over this rank's uint8 batches for ``steps`` in order, made by ``workers``
    DataLoader workers (0: in this process) that keep ``prefetch`` batches each ready; pinned
    when ``pin_memory`` (only useful with CUDA). It leaves the global RNG alone."""
    kwargs = dict(prefetch_factor=prefetch, worker_init_fn=_worker_init) if workers else {}
    return iter(torch.utils.data.DataLoader(
        _StepBatches(sampler, batch, rank, world), batch_size=None, sampler=steps,
        num_workers=workers, pin_memory=pin_memory, generator=torch.Generator(), **kwargs))
