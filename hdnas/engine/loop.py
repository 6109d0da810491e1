"""The step loop shared by search and train: device and seeds, data, validation, checkpoints,
the progress bar, the CSV history and the log."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hdnas.data import cache
from hdnas.data.train import DataError, batches
from hdnas.engine.config import RunConfig
from hdnas.engine.distributed import Dist
from hdnas.engine.errors import DivergedError
from hdnas.engine.rundir import save_checkpoint
from hdnas.engine.runtime import Amp, StepTimer, pick_device
from hdnas.engine.plots import plot_run
from hdnas.engine.threads import ThreadGovernor
from hdnas.engine.schema import stamp
from hdnas.engine.tensorboard import Board
from hdnas.eval.metrics import psnr, ssim
from hdnas.infer.run import super_resolve
from hdnas.model.cell import MIN_LR_SIZE

log = logging.getLogger("hdnas")


class Loop:
    """The step loop shared by search and train: progress bar, CSV history, log lines and
    periodic atomic checkpoints. Subclasses give ``train_step``, ``log_row``, ``describe``,
    ``state_dict`` and ``result``, and hold ``cfg`` (steps, log_every, ckpt_every, amp),
    ``step``, ``history``. ``timer`` times every step (part "step"); a ``train_step`` may time
    its own parts with ``self.timer.part(name)``. ``log_row`` gets the timer when the logged
    interval ends: its means are over the steps since the previous logged row. ``name`` prefixes
    new run folders; ``kind`` is written into ``config.json`` and ``checkpoint.pt``
    (``hdnas.engine.schema``).

    Finite or stop: a ``train_step`` checks its losses and gradients (``check_finite``,
    ``check_grads``) before it updates anything, and raises ``FloatingPointError``; ``run``
    turns that into a ``DivergedError`` naming the step. ``save`` refuses weights that are not
    finite, so the last checkpoint is always a good state."""

    name = "run"
    kind = "hdnas-run"

    def __init__(self, cfg: RunConfig, run_dir: Path, dist: Dist | None = None):
        """Thread count, device and seeds, the same way for every loop. ``dist``: the process
        group of a distributed run (rank 0 alone writes the run folder)."""
        self.cfg, self.run_dir, self.dist = cfg, run_dir, dist or Dist()
        self.threads = ThreadGovernor(cfg.threads, getattr(cfg, "deterministic", False))
        self.device = pick_device(cfg.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = self.dist.device  # GPU LOCAL_RANK
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.step = 0
        self.saved_step = None  # the step of the last checkpoint this process wrote
        self.amp = Amp(cfg.amp, self.device)
        self.timer = StepTimer(self.device)
        self.workers = cfg.workers if cfg.workers is not None else (
            4 if self.device.type == "cuda" else 0)
        self.val_every = cfg.validation_interval()
        self.val_data = None  # (cache, indices) of the validation images
        self.best_val = {"psnr": -math.inf, "ssim": math.nan, "step": 0}
        # --tensorboard: rank 0's writer (hdnas.engine.tensorboard), opened when the run starts
        self.board = Board(run_dir) if cfg.tensorboard and self.dist.is_main else None

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
        small = [vc.files[i] for i in vi if min(vc.lr_size(i)) < MIN_LR_SIZE]
        if small:
            raise DataError(f"{vc.folder}: validation images too small for the network (LR side "
                            f"< {MIN_LR_SIZE} px): {', '.join(small[:10])}")
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
        total, samples = [0.0, 0.0, 0.0], []
        for i in indices[self.dist.rank::self.dist.world]:
            lr = torch.from_numpy(np.array(cache.lr(i))).permute(2, 0, 1)
            hr = torch.from_numpy(np.array(cache.hr(i))).permute(2, 0, 1)
            sr = super_resolve(net, lr, device=self.device)
            total = [total[0] + psnr(sr, hr, s), total[1] + ssim(sr, hr, s), total[2] + 1]
            if self.board is not None and len(samples) < 2:
                samples.append((lr, sr, hr))
        if samples:  # --tensorboard: LR bicubic / SR / HR of the first images
            self.board.images(samples, self.step)
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

    # -- TensorBoard (rank 0 with --tensorboard) -----------------------------------------
    def board_start(self) -> None:
        """Open the writer when the run starts (subclasses add their charts and text)."""
        self.board.open(self.step)

    def board_row(self, row: dict) -> None:
        """The scalars of a history row (subclasses add theirs)."""
        self.board.row(row, self.step)

    def check_sync(self) -> None:
        """``--debug-sync``: every rank must hold bit-identical parameters."""
        self.dist.check_same(list(self.model.named_parameters()), f"at step {self.step}")

    # -- state ---------------------------------------------------------------------------
    def save(self) -> None:
        """The whole state (``state_dict``) with its schema version and kind, atomically, the
        previous checkpoint kept as checkpoint.prev.pt; rank 0 only. Weights that are not
        finite are not saved (``DivergedError``): every rank checks (they hold the same)."""
        for name, t in self.model.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise DivergedError(f"the weights ({name}) are not finite numbers", self.step)
        if self.dist.is_main:
            state = stamp(self.state_dict(), self.kind)
            state["best_val"] = dict(self.best_val)
            save_checkpoint(state, self.run_dir)
        if self.board is not None:
            self.board.flush()
        self.saved_step = self.step

    # -- finite or stop ------------------------------------------------------------------
    @staticmethod
    def check_finite(what: str, value) -> None:
        """``FloatingPointError`` unless ``value`` (a float or tensor) is finite."""
        v = float(value.detach() if torch.is_tensor(value) else value)
        if not math.isfinite(v):
            raise FloatingPointError(f"the {what} is {v}")

    @staticmethod
    def check_grads(what: str, params, scaler=None, clip: float = 0.0) -> None:
        """Clip the gradients of ``params`` to norm ``clip`` (0: no clipping) and check that
        their norm is finite (``FloatingPointError``), unless ``scaler`` is an active fp16
        gradient scaler: it skips the update of an inf/nan gradient itself."""
        params = [p for p in params if p.grad is not None]
        if not params:
            return
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
        elif scaler is not None and scaler.is_enabled():
            return
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if scaler is None or not scaler.is_enabled():
            Loop.check_finite(f"gradient norm of the {what}", norm)

    def restore(self, state: dict) -> None:
        """``load_state_dict`` plus the loop's own state."""
        self.load_state_dict(state)
        self.best_val = dict(state.get("best_val", self.best_val))
        self.saved_step = self.step

    def truncate_after(self, step: int) -> None:
        """Drop records of steps past ``step`` (a resumed run continues from it)."""
        if self.dist.is_main:
            self.history.truncate_after(step)

    def draw_pictures(self) -> None:
        """The run's pictures (hdnas.engine.plots), by rank 0 at the end of a run: a picture that
        cannot be drawn is a warning, never a failed run."""
        if not self.dist.is_main:
            return
        try:
            log.info("pictures: %s", ", ".join(str(p) for p in plot_run(self.run_dir)))
        except (ValueError, KeyError, IndexError, RuntimeError, OSError) as e:
            log.warning("the pictures could not be drawn (%s: %s); python -m hdnas.visualize "
                        "%s redraws them", type(e).__name__, e, self.run_dir)

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
        if self.board is not None:
            self.board_start()
        try:
            self._steps(end, bar)
        except BaseException:  # a new run that stops before its first checkpoint leaves nothing
            if self.board is not None:
                self.board.close(discard=self.saved_step is None)
            raise
        if self.board is not None:
            self.board.close()
        bar.close()
        return self.result()

    def _steps(self, end: int, bar) -> None:
        """The steps up to ``end``: train, validate, log, checkpoint."""
        cfg, main = self.cfg, self.dist.is_main
        timer = self.timer
        timer.reset()
        while self.step < end:
            with timer.part("step"):
                try:
                    out = self.train_step()
                except FloatingPointError as e:  # the diverged state is never saved
                    raise DivergedError(str(e), self.step + 1) from None
            timer.end_step()
            self.threads.check()  # follow the load of other processes (engine/threads.py)
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
                    row = self.log_row(out, timer) | (
                        {k: f"{v:.4f}" for k, v in val.items()} if val else {})
                    self.history.append(row)
                    if self.board is not None:
                        self.board_row(row)
                parts = ", ".join(f"{k} {timer.mean(k):.3f}s" for k in sorted(timer.steps)
                                  if k != "step")
                log.info("step %d/%d loss %.4f %.3fs/step%s %s", self.step, cfg.steps,
                         out["loss_train"], timer.mean("step"), f" ({parts})" if parts else "",
                         self.describe(out))
                timer.reset()
            if self.step % cfg.ckpt_every == 0 or last:
                self.save()

