"""Run folders shared by search and train: layout, config, log, CSV history, device choice."""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import platform
import re
import sys
import time
import typing
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hdnas.data import cache
from hdnas.data.train import DataError, batches
from hdnas.engine import allocator
from hdnas.engine.distributed import Dist, describe_failure, init_from_env, is_comm_failure
from hdnas.eval.metrics import psnr, ssim
from hdnas.infer.run import super_resolve
from hdnas.io import checkpoint

log = logging.getLogger("hdnas")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: this torch ({torch.__version__}) sees no CUDA GPU")
    return dev


AMP_MODES = ("off", "bf16", "fp16")
_AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(mode: str) -> None:
    if mode not in AMP_MODES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_MODES)}, got {mode!r}")


class Amp:
    """Mixed precision for one loop. ``autocast()`` wraps forward passes and losses (parameters,
    alpha/beta and all gradients stay fp32: autocast only lowers the precision of the op
    inputs); ``scaler()`` makes a gradient scaler, active for fp16 only (bf16 has fp32's
    exponent range, so its gradients need no scaling)."""

    def __init__(self, mode: str, device: torch.device):
        check_amp(mode)
        self.mode, self.device_type, self.dtype = mode, device.type, _AMP_DTYPES[mode]
        if self.dtype is not None:
            # torch disables an autocast it cannot do (with a warning) instead of failing
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with torch.autocast(self.device_type, dtype=self.dtype):
                    ok = (torch.is_autocast_enabled(self.device_type)
                          and torch.get_autocast_dtype(self.device_type) == self.dtype)
            if not ok:
                raise ValueError(f"--amp {mode}: this torch ({torch.__version__}) cannot autocast "
                                 f"to {self.dtype} on {self.device_type}; use --amp off or "
                                 "another device")

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler: pass-through (``scale`` returns the loss, ``step`` steps the
        optimizer) unless the mode is fp16."""
        return torch.amp.GradScaler(self.device_type, enabled=self.mode == "fp16")


def step_schedule(sched) -> None:
    """``sched.step()``, without torch's warning that it ran before the optimizer's first step:
    with fp16 the gradient scaler skips the first steps while it finds its scale, and the
    schedule counts steps, skipped or not."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"),
                                UserWarning)
        sched.step()


class StepTimer:
    """Wall time per step and per named part of a step, over the steps since the last
    ``reset``. ``mean(part)`` averages over the steps in which ``part`` ran (its parts entered
    several times in one step add up); NaN if none did. On CUDA each reading synchronises the
    device, so the times are those of the work, not of its launch."""

    def __init__(self, device: torch.device, clock=time.perf_counter):
        self.clock, self.sync = clock, device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.total, self.steps, self._seen = defaultdict(float), defaultdict(int), set()

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return self.clock()

    @contextlib.contextmanager
    def part(self, name: str):
        t = self.now()
        try:
            yield
        finally:
            self.total[name] += self.now() - t
            self._seen.add(name)

    def end_step(self) -> None:
        for name in self._seen:
            self.steps[name] += 1
        self._seen.clear()

    def mean(self, name: str) -> float:
        return self.total[name] / self.steps[name] if self.steps[name] else math.nan


VAL_COLUMNS = ["val_psnr", "val_ssim"]


@dataclasses.dataclass
class RunOptions:
    """Options shared by search and retraining: data cache and loading, validation, and the
    distributed debug check."""

    val_every: int | None = None  # steps between validations; None: at every checkpoint; 0: never
    val_dir: str = ""  # empty: hold out val_fraction of the weight-training images
    val_fraction: float = 0.05  # at least one image
    workers: int | None = None  # DataLoader workers per rank; None: 4 with CUDA, 0 on CPU
    prefetch: int = 4  # batches each worker keeps ready
    cache_dir: str = ""  # empty: $HDNAS_CACHE_DIR/data or ~/.cache/hdnas/data
    skip_bad_images: bool = False
    debug_sync: int = 0  # every N steps check that all ranks hold identical parameters

    def validate_run_options(self):
        if self.val_every is not None and self.val_every < 0:
            raise ValueError("--val-every must be >= 0 (0: no validation)")
        if not 0 < self.val_fraction < 1:
            raise ValueError("--val-fraction must be between 0 and 1")
        if self.workers is not None and self.workers < 0:
            raise ValueError("--workers must be >= 0")
        if self.prefetch < 1 or self.debug_sync < 0:
            raise ValueError("--prefetch must be >= 1 and --debug-sync >= 0")

    def validation_interval(self) -> int:
        return self.ckpt_every if self.val_every is None else self.val_every


def new_run_dir(out: str | None, prefix: str) -> Path:
    """A fresh run folder; refuses to overwrite one that already holds a run."""
    path = Path(out) if out else Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (path / "checkpoint.pt").exists() or (path / "config.json").exists():
        raise SystemExit(f"error: {path} already holds a run; resume it with --resume {path} "
                         "or choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def environment() -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "platform": platform.platform(), "cuda": torch.version.cuda,
            "threads": torch.get_num_threads()}


def save_config(run_dir: Path, given: dict, resolved) -> None:
    resolved = dataclasses.asdict(resolved) if dataclasses.is_dataclass(resolved) else resolved
    write_json(run_dir / "config.json", {"given": given, "resolved": resolved,
                                          "environment": environment()})


def setup_logging(run_dir: Path, quiet: bool = False) -> None:
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    fh = logging.FileHandler(run_dir / "log.txt")
    fh.setFormatter(fmt)
    log.addHandler(fh)
    if not quiet:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        log.addHandler(sh)
    log.propagate = False


class History:
    """One CSV row per logged step. On resume, rows past the checkpoint's step are dropped, so
    the history matches the state the run continues from."""

    def __init__(self, path: Path, fields: list[str]):
        self.path, self.fields = path, fields

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        with self.path.open() as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, self.fields)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)

    def append(self, row: dict) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, self.fields)
            if new:
                w.writeheader()
            w.writerow(row)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with self.path.open() as f:
            return list(csv.DictReader(f))


class Loop:
    """The step loop shared by search and train: progress bar, CSV history, log lines and
    periodic atomic checkpoints. Subclasses give ``train_step``, ``log_row``, ``describe``,
    ``state_dict`` and ``result``, and hold ``cfg`` (steps, log_every, ckpt_every, amp),
    ``step``, ``history``. ``timer`` times every step (part "step"); a ``train_step`` may time
    its own parts with ``self.timer.part(name)``. ``log_row`` gets the timer when the logged
    interval ends: its means are over the steps since the previous logged row."""

    name = "run"

    def __init__(self, cfg, run_dir: Path, dist: Dist | None = None):
        """Thread count, device and seeds, the same way for every loop. ``dist``: the process
        group of a distributed run (rank 0 alone writes the run folder)."""
        self.cfg, self.run_dir, self.dist = cfg, run_dir, dist or Dist()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = pick_device(cfg.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = self.dist.device  # GPU LOCAL_RANK
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.step = 0
        self.amp = Amp(cfg.amp, self.device)
        self.timer = StepTimer(self.device)
        self.workers = cfg.workers if cfg.workers is not None else (
            4 if self.device.type == "cuda" else 0)
        self.val_every = cfg.validation_interval()
        self.val_data = None  # (cache, indices) of the validation images
        self.best_val = {"psnr": -math.inf, "ssim": math.nan, "step": 0}

    # -- data ----------------------------------------------------------------------------
    def open_cache(self, folder, scale: int):
        """The image cache of ``folder``, built once per node (by local rank 0) if needed."""
        root = self.cfg.cache_dir or None
        path = self.dist.first_on_each_node(lambda: cache.build(
            folder, scale, root, self.cfg.skip_bad_images, workers=self.workers,
            progress=None if self.dist.is_main else False))
        c = cache.ImageCache(path)
        if c.skipped and self.dist.is_main:
            log.warning("%s: left out %d unreadable images (--skip-bad-images): %s", folder,
                        len(c.skipped), "; ".join(c.skipped[:5]))
        return c

    def hold_out(self, cache, indices, scale: int):
        """(the weight-training indices, and the validation set taken from them unless
        --val-dir gives one or validation is off)."""
        indices = list(indices)
        if not self.val_every:
            return indices, None
        if self.cfg.val_dir:
            val = self.open_cache(self.cfg.val_dir, scale)
            self.val_data = (val, list(range(len(val))))
        else:
            k = max(1, round(self.cfg.val_fraction * len(indices)))
            if len(indices) - k < 1:
                raise DataError(f"{cache.folder}: {len(indices)} weight-training images leave none "
                                f"after holding out {k} for validation; give --val-dir, more "
                                "images, or --val-every 0")
            indices, held = indices[:-k], indices[-k:]
            self.val_data = (cache, held)
        vc, vi = self.val_data
        small = [vc.files[i] for i in vi if min(vc.lr_size(i)) < 15]
        if small:
            raise DataError(f"{vc.folder}: validation images too small for the network (LR side "
                            f"< 15 px): {', '.join(small[:10])}")
        return indices, self.val_data

    def loader(self, sampler, steps: range):
        """This rank's uint8 batches of ``steps`` (DataLoader workers, prefetch, pinned memory
        with CUDA)."""
        return batches(sampler, steps, self.cfg.batch, self.dist.rank, self.dist.world,
                       self.workers, self.cfg.prefetch, pin_memory=self.device.type == "cuda")

    def to_device(self, batch):
        return tuple(t.to(self.device, non_blocking=True).float() for t in batch)

    def start_data(self, start: int, end: int) -> None:
        """Set up the batch iterators for steps ``start`` .. ``end - 1`` (subclasses)."""

    # -- validation ----------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        """Mean PSNR/SSIM (Y, shave = scale, as ``hdnas.evaluate``) of the validation images;
        the ranks share the images and sum their scores."""
        cache, indices = self.val_data
        s = cache.scale
        was_training = self.model.training
        self.model.eval()
        net = self.inference_model()
        total = [0.0, 0.0, 0.0]
        for i in indices[self.dist.rank::self.dist.world]:
            lr = torch.from_numpy(np.array(cache.lr(i))).permute(2, 0, 1)
            hr = torch.from_numpy(np.array(cache.hr(i))).permute(2, 0, 1)
            sr = super_resolve(net, lr, device=self.device)
            total = [total[0] + psnr(sr, hr, s), total[1] + ssim(sr, hr, s), total[2] + 1]
        self.model.train(was_training)
        p, q, n = self.dist.sum(total)
        return {"val_psnr": p / n, "val_ssim": q / n}

    def inference_model(self) -> torch.nn.Module:
        """The module validation runs (subclasses: a faster inference path)."""
        return self.model

    def on_validation(self, val: dict) -> None:
        """Called on every rank after each validation (subclasses record more)."""
        if val["val_psnr"] > self.best_val["psnr"]:
            self.best_val = {"psnr": val["val_psnr"], "ssim": val["val_ssim"], "step": self.step}
            if self.dist.is_main:
                self.save_best()

    def save_best(self) -> None:
        """Rank 0, when the validation score is the best so far (subclasses)."""

    def check_sync(self) -> None:
        """``--debug-sync``: every rank must hold bit-identical parameters."""
        self.dist.check_same(list(self.model.named_parameters()), f"at step {self.step}")

    # -- state ---------------------------------------------------------------------------
    def save(self) -> None:
        """The whole state (``state_dict``), atomically; rank 0 only."""
        if self.dist.is_main:
            state = self.state_dict()
            state["best_val"] = dict(self.best_val)
            checkpoint.save_atomic(state, self.run_dir / "checkpoint.pt")

    def restore(self, state: dict) -> None:
        """``load_state_dict`` plus the loop's own state."""
        self.load_state_dict(state)
        self.best_val = dict(state.get("best_val", self.best_val))

    def truncate_after(self, step: int) -> None:
        """Drop records of steps past ``step`` (a resumed run continues from it)."""
        if self.dist.is_main:
            self.history.truncate_after(step)

    def run(self, stop_after: int | None = None, quiet: bool = False):
        """Run to ``cfg.steps``. ``stop_after`` stops early without a final checkpoint: tests use
        it as a kill between checkpoints."""
        cfg, main = self.cfg, self.dist.is_main
        end = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        self.start_data(self.step, end)
        # every rank starts from rank 0's weights (as DDP does), whatever its RNG did so far
        self.dist.broadcast_tensors(list(self.model.state_dict().values()))
        bar = tqdm(total=cfg.steps, initial=self.step, disable=quiet or not main, desc=self.name,
                   unit="step")
        timer = self.timer
        timer.reset()
        while self.step < end:
            with timer.part("step"):
                out = self.train_step()
            timer.end_step()
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss_train']:.3f}")
            last = self.step == cfg.steps
            val = None
            if self.val_data is not None and (self.step % self.val_every == 0 or last):
                val = self.validate()
                self.on_validation(val)
                log.info("step %d validation PSNR %.4f dB SSIM %.4f (best %.4f dB at step %d)",
                         self.step, val["val_psnr"], val["val_ssim"], self.best_val["psnr"],
                         self.best_val["step"])
            if cfg.debug_sync and self.step % cfg.debug_sync == 0:
                self.check_sync()
            if self.step % cfg.log_every == 0 or last or val:
                if main:
                    self.history.append(self.log_row(out, timer) | (
                        {k: f"{v:.4f}" for k, v in val.items()} if val else {}))
                parts = ", ".join(f"{k} {timer.mean(k):.3f}s" for k in sorted(timer.steps)
                                  if k != "step")
                log.info("step %d/%d loss %.4f %.3fs/step%s %s", self.step, cfg.steps,
                         out["loss_train"], timer.mean("step"), f" ({parts})" if parts else "",
                         self.describe(out))
                timer.reset()
            if self.step % cfg.ckpt_every == 0 or last:
                self.save()
        bar.close()
        return self.result()


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


def cli_main(argv, loop_cls, cfg_cls, presets: dict, prog: str, doc: str,
             add_arguments=None, adjust_config=None) -> int:
    """The shared command line of search and train: new run or ``--resume RUN_DIR``."""
    p = argparse.ArgumentParser(prog=prog, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--preset", choices=sorted(presets),
                   help="start from these settings (each one's differences from the release: "
                        "docs/presets.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or console log")
    if add_arguments:
        add_arguments(p)
    p.epilog = ((p.epilog or "") + " Distributed: torchrun --nproc-per-node N -m "
                + prog.split()[-1] + " ... (docs/distributed.md).").strip()
    add_config_arguments(p, cfg_cls, FIELD_HELP)
    args = p.parse_args(argv)
    allocator.tune()  # reuse freed memory between steps (HDNAS_MALLOC=default: glibc's default)
    try:
        d = init_from_env(args.device or "auto")
    except (ValueError, RuntimeError) as e:
        print(f"error: cannot start the distributed run: {e}", file=sys.stderr)
        return 2
    ended = False
    try:
        code = _run(args, d, loop_cls, cfg_cls, presets, adjust_config)
        ended = True
        return code
    except ValueError as e:  # DataError, SearchSpaceError, GenotypeError, bad settings
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - only failed collectives are explained here
        if d.enabled and is_comm_failure(e):
            print(f"error: {describe_failure(d, e)}", file=sys.stderr)
            return 1
        raise
    finally:
        d.close(sync=ended)


def _read_resume(run_dir: Path) -> tuple[dict, dict]:
    """(resolved config, checkpoint state) of a run folder; rank 0 reads them."""
    cfg_file = run_dir / "config.json"
    if not (run_dir / "checkpoint.pt").is_file() or not cfg_file.is_file():
        raise SystemExit(f"error: {run_dir} holds no run to resume (config.json and "
                         "checkpoint.pt are needed)")
    return json.loads(cfg_file.read_text())["resolved"], checkpoint.load(run_dir / "checkpoint.pt")


def _run(args, d: Dist, loop_cls, cfg_cls, presets, adjust_config) -> int:
    quiet = args.quiet or not d.is_main  # one console (and one log file) per run: rank 0's
    if args.resume:
        run_dir = Path(args.resume)
        # rank 0 reads the folder and sends it to the others, which need no shared filesystem
        resolved, state = d.on_main(lambda: _read_resume(run_dir))
        cfg = cfg_cls(**resolved)
        if d.is_main:
            setup_logging(run_dir, quiet)
        loop = loop_cls(cfg, run_dir, d)
        loop.restore(state)
        loop.truncate_after(loop.step)
        log.info("resumed %s at step %d", run_dir, loop.step)
    else:
        given = {k: v for k, v in vars(args).items() if v not in (None, False)}
        cfg = cfg_cls(**presets.get(args.preset, {}))
        for f in dataclasses.fields(cfg_cls):
            if getattr(args, f.name) is not None:
                setattr(cfg, f.name, getattr(args, f.name))
        if adjust_config:
            adjust_config(cfg, args)
        cfg.validate()
        if cfg.batch % d.world:
            raise ValueError(f"--batch {cfg.batch} (the global batch) is not divisible by the "
                             f"{d.world} ranks")
        run_dir = Path(d.on_main(lambda: str(new_run_dir(cfg.out, loop_cls.name))))
        cfg.out = str(run_dir)
        if d.is_main:
            setup_logging(run_dir, quiet)
        loop = loop_cls(cfg, run_dir, d)
        if d.is_main:
            save_config(run_dir, given, cfg)
        log.info("run folder %s", run_dir)
    if d.enabled:
        log.info("distributed: %d ranks (%s), global batch %d = %d per rank", d.world, d.backend,
                 cfg.batch, cfg.batch // d.world)
    log.info("%s", loop.summary())
    if os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE" \
            and torch.get_num_threads() > 1:
        log.warning("OMP_WAIT_POLICY=PASSIVE with %d threads: OpenMP threads sleep between the "
                    "many small parallel regions of a step (measured: a 2-thread CPU step 2.5x "
                    "slower); unset it, or run 1 thread", torch.get_num_threads())
    result = loop.run(quiet=quiet)
    if d.is_main:
        print(loop.finish(result))
    return 0
