"""Training input for search and retraining: every image of a folder decoded once (any layout
that ``hdnas.data.benchmark`` knows: HR only, DIV2K's ``*_HR`` + ``*_LR_bicubic/Xs``, ...; LR made
by MATLAB-exact bicubic when the folder has none), then random aligned patches with flips and
transposes, held in memory as uint8.

Sampling draws every random number from one ``torch.Generator`` that the caller owns, so a run
that is killed and resumed from a checkpoint (generator state included) sees the same batches.
"""
from __future__ import annotations

from pathlib import Path

import torch

from hdnas.data.benchmark import BenchmarkError, BenchmarkSet

DEFAULT_DIR = Path(__file__).resolve().parent / "default"
DataError = BenchmarkError


class PatchSampler:
    """Random (LR, HR) float patch batches in [0, 255] from the images of one folder."""

    def __init__(self, folder, scale: int, hr_patch: int, augment: bool = True,
                 part: tuple[float, float] = (0.0, 1.0)):
        """``part``: the share of the folder's images (sorted by name) to use, e.g. (0, 0.87)
        and (0.87, 1) split one folder into weight and architecture data, as the release's
        ``--data_range 1-3000/3000-3450`` does with DF2K."""
        if hr_patch % scale:
            raise DataError(f"HR patch {hr_patch} is not a multiple of the scale {scale}")
        self.scale, self.hr_patch, self.augment = scale, hr_patch, augment
        images = BenchmarkSet(folder, scale, min_lr_size=hr_patch // scale)
        n = len(images.pairs)
        lo, hi = round(part[0] * n), round(part[1] * n)
        if hi <= lo:
            raise DataError(f"{folder}: the split {part} of {n} images is empty; give more images "
                            "or a separate --arch-dir")
        images.pairs = images.pairs[lo:hi]
        self.names, self.lr, self.hr = [], [], []
        for item in images:
            self.names.append(item["name"])
            self.lr.append(item["lr"])
            self.hr.append(item["hr"])

    def __len__(self):
        return len(self.hr)

    def sample(self, batch: int, generator: torch.Generator):
        lp, s = self.hr_patch // self.scale, self.scale
        lrs, hrs = [], []
        for _ in range(batch):
            i = int(torch.randint(len(self.hr), (1,), generator=generator))
            lr_img, hr_img = self.lr[i], self.hr[i]
            y = int(torch.randint(lr_img.shape[1] - lp + 1, (1,), generator=generator))
            x = int(torch.randint(lr_img.shape[2] - lp + 1, (1,), generator=generator))
            lr = lr_img[:, y:y + lp, x:x + lp]
            hr = hr_img[:, y * s:(y + lp) * s, x * s:(x + lp) * s]
            if self.augment:
                hflip, vflip, rot = (torch.rand(3, generator=generator) < 0.5).tolist()
                if hflip:
                    lr, hr = lr.flip(-1), hr.flip(-1)
                if vflip:
                    lr, hr = lr.flip(-2), hr.flip(-2)
                if rot:
                    lr, hr = lr.transpose(-1, -2), hr.transpose(-1, -2)
            lrs.append(lr)
            hrs.append(hr)
        return torch.stack(lrs).float(), torch.stack(hrs).float()
