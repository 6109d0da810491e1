"""The settings every run shares (``RunConfig``, extended by the search's and the retraining's),
their checks, and the command-line flags made from the fields.

One validation: every numeric field has a ``Range`` (``RANGES``); a flag's value is checked
against it when the command line is parsed (an argparse error, exit status 2, naming the flag),
and ``validate()`` checks the same ranges on a config made otherwise (a preset, a resumed run's
``config.json``: ``config_from_dict`` also checks the types there). Floats must be finite: NaN
and infinity are refused everywhere."""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field

from hdnas.cliargs import finite_float, int_range
from hdnas.engine.runtime import AMP_MODES, check_amp, check_device_name
from hdnas.model.cell import MIN_LR_SIZE


class Range:
    """The values a numeric field may take: ``lo``/``hi`` (None: unbounded), each closed unless
    ``*_open``; floats must also be finite."""

    def __init__(self, lo=None, hi=None, lo_open=False, hi_open=False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open

    def __contains__(self, v) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        if self.lo_open == self.hi_open:
            return f"{'strictly ' if self.lo_open else ''}between {self.lo:g} and {self.hi:g}"
        return (f"{'>' if self.lo_open else '>='} {self.lo:g} and "
                f"{'<' if self.hi_open else '<='} {self.hi:g}")


def range_problem(v, rng: Range) -> str | None:
    """Why ``v`` is not in ``rng`` (None if it is)."""
    if isinstance(v, float) and not math.isfinite(v):
        return f"must be a finite number, got {v}"
    return None if v in rng else f"must be {rng}, got {v:g}"


POSITIVE, NON_NEGATIVE = Range(0, lo_open=True), Range(0)
FRACTION_OPEN, FRACTION = Range(0, 1, True, True), Range(0, 1)


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
    threads: int = 0  # 0: follow the free CPUs (hdnas/engine/threads.py)
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
    tensorboard: bool = False  # TensorBoard logs under RUN_DIR/tensorboard (rank 0)

    #: the values of each numeric field (a class attribute, not a field: no annotation)
    RANGES = {
        "batch": Range(1), "patch": Range(1), "steps": Range(1), "lr": POSITIVE,
        "lr_milestones": FRACTION, "lr_gamma": Range(0, 1, lo_open=True),
        "weight_decay": NON_NEGATIVE, "grad_clip": NON_NEGATIVE, "hfen": NON_NEGATIVE,
        "seed": Range(0, 2 ** 63 - 1), "threads": Range(0, 1024), "log_every": Range(1),
        "ckpt_every": Range(1), "val_every": Range(0), "val_fraction": FRACTION_OPEN,
        "workers": Range(0, 256), "prefetch": Range(1, 1024), "debug_sync": Range(0),
    }
    #: options a resumed run may be given with other values than it started with
    #: (``--resume``): when and how it checkpoints, logs and validates, how many steps it runs
    #: (``--steps``: more than the step reached) and what it runs on; the rest makes the run
    RESUMABLE = ("steps", "log_every", "ckpt_every", "val_every", "workers", "prefetch",
                 "threads", "device", "debug_sync", "cache_dir")

    def validate(self) -> None:
        """Check the shared fields (``ValueError`` naming the flag)."""
        check_ranges(self)
        try:
            check_device_name(self.device)
        except ValueError as e:
            raise ValueError(f"--device {e}") from None
        check_amp(self.amp)

    def set(self, name: str, value) -> dict:
        """Give a ``RESUMABLE`` field of a resumed run another value; returns every field that
        changed (subclasses pin what depended on it, e.g. the search's automatic warm-up)."""
        setattr(self, name, value)
        return {name: value}

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
    "tensorboard": "also write TensorBoard logs under RUN_DIR/tensorboard (losses, validation, "
                   "step times, alpha/beta, the genotype, validation images); needs "
                   "pip install 'hdnas[tensorboard]'",
    "threads": "CPU threads; 0 (default): the CPUs this process may use less those other "
               "processes keep busy, re-checked every few seconds (the log says what it chose "
               "and why)",
    "backend": "how the mixed ops run: auto (the default: the fastest backend the conformance "
               "suite proves exact on this device -- native on a CPU, triton on a GPU -- "
               "logged and written to config.json), reference (the plain per-op loop), merged, "
               "native, triton, fused",
    "deterministic": "fix every timed choice up front (the dense-conv route: direct) so the "
                     "run does not depend on how fast this machine was at its start; without "
                     "it the choices are saved in the run folder and reused by --resume",
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_ranges(cfg) -> None:
    """Every numeric field of ``cfg`` in its ``RANGES`` entry (``ValueError`` naming the flag);
    None (unset) passes."""
    for name, rng in cfg.RANGES.items():
        value = getattr(cfg, name)
        for v in value if isinstance(value, list) else [value]:
            problem = None if v is None else range_problem(v, rng)
            if problem:
                raise ValueError(f"{flag(name)} {problem}")


def _scalar_type(hint):
    """``int`` for ``int``, ``int | None`` and ``Optional[int]``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _element_type(cfg_cls, name: str, hint):
    """The type of a field's values: the annotation's, or for a list its default's elements'."""
    default = getattr(cfg_cls(), name)
    if isinstance(default, list):
        return type(default[0]) if default else str
    return _scalar_type(hint)


def option_type(base, rng: Range | None = None, check=None):
    """An argparse ``type`` for a field of type ``base``: a number in ``rng`` (the shared types
    of ``hdnas.cliargs``: floats finite), or a string passed by ``check`` (raising
    ``ValueError``); else an argparse error naming the flag (exit status 2)."""
    if base is float:
        return finite_float(*((rng.lo, rng.hi, rng.lo_open, rng.hi_open) if rng else ()))
    if base is int:
        return int_range(*((rng.lo, rng.hi) if rng else ()))
    if base is not str or check is None:
        return base

    def parse(text: str):
        try:
            check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text
    parse.__name__ = base.__name__
    return parse


#: checks of string fields done when the command line is parsed
STRING_CHECKS = {"device": check_device_name}


def add_config_arguments(p: argparse.ArgumentParser, cfg_cls, helps: dict | None = None) -> None:
    """One flag per config field (``--field-name``), typed by the field's annotation and
    checked against its range; None means 'not given'. ``helps``: extra help text per field."""
    d, hints, helps = cfg_cls(), typing.get_type_hints(cfg_cls), helps or {}
    for f in dataclasses.fields(cfg_cls):
        default = getattr(d, f.name)
        rng = cfg_cls.RANGES.get(f.name)
        text = " ".join(filter(None, [helps.get(f.name), f"({rng})" if rng else "",
                                      f"(default {default!r})"]))
        typ = option_type(_element_type(cfg_cls, f.name, hints[f.name]), rng,
                          STRING_CHECKS.get(f.name))
        if isinstance(default, bool):
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=None,
                           help=text)
        elif isinstance(default, list):
            p.add_argument(flag(f.name), nargs="+", type=typ, default=None, help=text)
        else:
            p.add_argument(flag(f.name), type=typ, default=None, help=text)


def _type_ok(v, typ) -> bool:
    if typ is bool:
        return isinstance(v, bool)
    if typ is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, typ) and not isinstance(v, bool)


def config_from_dict(cfg_cls, data, source: str):
    """``cfg_cls`` from a resolved config read from ``source`` (a run's config.json): every
    key a field, every value of the field's type (floats finite), then ``validate()``; anything
    else is a ``ValueError`` naming ``source`` and the field. Missing fields take their
    defaults (a run from an older version)."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: its resolved settings are not a JSON object")
    hints = typing.get_type_hints(cfg_cls)
    names = [f.name for f in dataclasses.fields(cfg_cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{source}: unknown settings {unknown} (not a config of this command)")
    values, defaults = {}, cfg_cls()
    for name, v in data.items():
        typ = _element_type(cfg_cls, name, hints[name])
        listed = isinstance(getattr(defaults, name), list)
        if v is None and type(None) in typing.get_args(hints[name]):
            values[name] = None
        elif listed and isinstance(v, list) and all(_type_ok(x, typ) for x in v):
            values[name] = [typ(x) for x in v]
        elif not listed and _type_ok(v, typ):
            values[name] = typ(v)
        else:
            want = f"a list of {typ.__name__}" if listed else typ.__name__
            raise ValueError(f"{source}: setting {name!r} is {v!r}, expected {want}")
    cfg = cfg_cls(**values)
    try:
        cfg.validate()
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return cfg


def config_from_args(cfg_cls, preset: dict, args: argparse.Namespace):
    """``cfg_cls`` with the ``preset``'s settings, then every flag given (not None)."""
    cfg = cfg_cls(**preset)
    for f in dataclasses.fields(cfg_cls):
        if getattr(args, f.name) is not None:
            setattr(cfg, f.name, getattr(args, f.name))
    return cfg
