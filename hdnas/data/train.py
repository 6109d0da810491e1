"""Training input for search and retraining: a folder of HR images, decoded once, LR made once
by MATLAB-style bicubic downscaling, then random aligned patches with flips and transposes.

Sampling draws every random number from one ``torch.Generator`` that the caller owns, so a run
that is killed and resumed from a checkpoint (generator state included) sees the same batches.
"""
from __future__ import annotations

from pathlib import Path

import torch

from hdnas.data.io import IMAGE_EXTENSIONS, load_rgb
from hdnas.imresize import imresize_uint8

DEFAULT_DIR = Path(__file__).resolve().parent / "default"


class DataError(ValueError):
    """A missing, empty or unusable data folder or image."""


def list_images(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"data folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"data folder {folder} contains no images "
                        f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def make_lr(hr_uint8: torch.Tensor, scale: int) -> torch.Tensor:
    """uint8 (3, H, W) HR, cropped to a multiple of scale -> uint8 LR, as MATLAB's imresize."""
    return imresize_uint8(hr_uint8, scale=1 / scale)


class PatchSampler:
    """Random (LR, HR) patch batches from a folder of HR images, values in [0, 255]."""

    def __init__(self, folder, scale: int, hr_patch: int, augment: bool = True):
        if hr_patch % scale:
            raise DataError(f"HR patch {hr_patch} is not a multiple of the scale {scale}")
        self.scale, self.hr_patch, self.augment = scale, hr_patch, augment
        self.files = list_images(folder)
        self.hr, self.lr = [], []
        for f in self.files:
            img = load_rgb(f, as_tensor=True)  # (3, H, W) uint8
            H, W = img.shape[1:]
            if min(H, W) < hr_patch:
                raise DataError(f"{f} is {W}x{H}, smaller than the HR patch {hr_patch}x{hr_patch}")
            img = img[:, :H - H % scale, :W - W % scale]
            self.hr.append(img)
            self.lr.append(make_lr(img, scale))

    def __len__(self):
        return len(self.files)

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
