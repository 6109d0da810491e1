"""The settings every run shares (``RunConfig``, extended by the search's and the retraining's),
their checks, and the command-line flags made from the fields."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field

from hdnas.engine.runtime import AMP_MODES, check_amp
from hdnas.model.cell import MIN_LR_SIZE


@dataclass
class RunConfig:
    """Data, optimisation, device, logging, validation and data loading: the fields search and
    retraining share, with the search's defaults. Subclasses add their own fields, may give these
    other defaults (the retraining does), and call ``super().validate()``."""

    train_dir: str = ""  # empty: the embedded default data
    out: str = ""  # empty: runs/<kind>-<date>-<time>
    batch: int = 4  # the global batch: split over the ranks of a distributed run
    patch: int = 64  # HR patch side; the LR patch is patch // scale
    steps: int = 80
    lr: float = 5e-4
    lr_milestones: list = field(default_factory=lambda: [0.2, 0.4, 0.6])  # fractions of steps
    lr_gamma: float = 0.5
    weight_decay: float = 1e-8
    grad_clip: float = 0.0  # 0: no clipping (the release's search does not clip)
    hfen: float = 0.2  # weight of the HFEN term of the loss
    device: str = "auto"
    amp: str = "off"  # off, bf16 or fp16
    seed: int = 9
    threads: int = 0  # 0: torch's default
    log_every: int = 10
    ckpt_every: int = 20
    val_every: int | None = None  # steps between validations; None: at every checkpoint; 0: never
    val_dir: str = ""  # empty: hold out val_fraction of the weight-training images
    val_fraction: float = 0.05  # at least one image
    workers: int | None = None  # DataLoader workers per rank; None: 4 with CUDA, 0 on CPU
    prefetch: int = 4  # batches each worker keeps ready
    cache_dir: str = ""  # empty: $HDNAS_CACHE_DIR/data or ~/.cache/hdnas/data
    skip_bad_images: bool = False
    debug_sync: int = 0  # every N steps check that all ranks hold identical parameters

    #: fields that must be at least 1 (not a dataclass field: no annotation)
    POSITIVE = ("batch", "patch", "steps", "log_every", "ckpt_every")

    def validate(self) -> None:
        """Check the shared fields (``ValueError`` naming the flag)."""
        for name in self.POSITIVE:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        check_amp(self.amp)
        if self.val_every is not None and self.val_every < 0:
            raise ValueError("--val-every must be >= 0 (0: no validation)")
        if not 0 < self.val_fraction < 1:
            raise ValueError("--val-fraction must be between 0 and 1")
        if self.workers is not None and self.workers < 0:
            raise ValueError("--workers must be >= 0")
        if self.prefetch < 1 or self.debug_sync < 0:
            raise ValueError("--prefetch must be >= 1 and --debug-sync >= 0")

    def check_patch(self, scale: int) -> None:
        """The LR patch (``patch // scale``) must be large enough for the ESA attention."""
        if self.patch // scale < MIN_LR_SIZE:
            raise ValueError(f"--patch {self.patch} gives LR patches of {self.patch // scale}; "
                             f"the ESA attention needs at least {MIN_LR_SIZE} (use --patch >= "
                             f"{MIN_LR_SIZE * scale})")

    def validation_interval(self) -> int:
        return self.ckpt_every if self.val_every is None else self.val_every


FIELD_HELP = {  # fields whose name and default do not say enough
    "amp": f"mixed precision, one of {', '.join(AMP_MODES)}: forward passes and losses under "
           "torch.autocast in bf16, or in fp16 with gradient scaling; parameters, alpha/beta "
           "and gradients stay fp32",
    "warmup": "weight-only steps before the architecture updates; unset: --warmup-fraction "
              "of --steps",
    "warmup_fraction": "the warm-up's share of --steps when --warmup is not given",
    "val_every": "steps between validations (PSNR/SSIM on Y, shave = scale); unset: at every "
                 "checkpoint; 0: none",
    "val_dir": "validation images; empty: hold out --val-fraction of the weight-training images",
    "val_fraction": "share of the weight-training images held out for validation (at least one)",
    "workers": "DataLoader workers per rank cutting patches from the image cache; unset: 4 with "
               "CUDA, 0 on a CPU",
    "cache_dir": "where decoded training images are cached; empty: $HDNAS_CACHE_DIR/data or "
                 "~/.cache/hdnas/data",
    "skip_bad_images": "leave unreadable or too small images out with a warning instead of "
                       "stopping",
    "debug_sync": "every N steps check that all ranks hold identical parameters (0: never)",
    "batch": "the global batch; under torchrun each of N ranks takes batch / N",
}


def _scalar_type(hint):
    """``int`` for ``int``, ``int | None`` and ``Optional[int]``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_config_arguments(p: argparse.ArgumentParser, cfg_cls, helps: dict | None = None) -> None:
    """One flag per config field (``--field-name``), typed by the field's annotation; None
    means 'not given'. ``helps``: extra help text per field name."""
    d, hints, helps = cfg_cls(), typing.get_type_hints(cfg_cls), helps or {}
    for f in dataclasses.fields(cfg_cls):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(d, f.name)
        text = " ".join(filter(None, [helps.get(f.name), f"(default {default!r})"]))
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif isinstance(default, list):
            typ = type(default[0]) if default else str
            p.add_argument(flag, nargs="+", type=typ, default=None, help=text)
        else:
            p.add_argument(flag, type=_scalar_type(hints[f.name]), default=None, help=text)


def config_from_args(cfg_cls, preset: dict, args: argparse.Namespace):
    """``cfg_cls`` with the ``preset``'s settings, then every flag given (not None)."""
    cfg = cfg_cls(**preset)
    for f in dataclasses.fields(cfg_cls):
        if getattr(args, f.name) is not None:
            setattr(cfg, f.name, getattr(args, f.name))
    return cfg
