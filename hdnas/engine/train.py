"""Retraining a derived genotype from scratch (``python -m hdnas.train``): its settings, its
preset and its loop."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hdnas.data.train import DEFAULT_DIR, PatchSampler
from hdnas.engine.config import Range, RunConfig
from hdnas.engine.history import VAL_COLUMNS, History
from hdnas.engine.loop import Loop
from hdnas.engine.plots import plot_genotype, plot_run
from hdnas.engine.rundir import write_json
from hdnas.engine.runtime import step_schedule
from hdnas import native_build
from hdnas.infer import run
from hdnas.mixed import native
from hdnas.io import checkpoint
from hdnas.io import weights as weights_io
from hdnas.model.complexity import count_params
from hdnas.model.genotype import Genotype
from hdnas.io.official import build_net
from hdnas.nas.losses import SRLoss

log = logging.getLogger("hdnas")

@dataclass
class TrainConfig(RunConfig):
    """The retraining's settings: the genotype, and the shared fields of ``RunConfig`` with the
    retraining's own defaults (plain L1, clipping at norm 50, a longer schedule)."""

    genotype: str = "BETA21"  # a genotype.json, or BETA21 / PARA_LOSS / TINY18
    scale: int = 0  # 0: the genotype's own scale
    batch: int = 8  # the global batch: split over the ranks of a distributed run
    steps: int = 200
    lr: float = 3e-4
    lr_milestones: list = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8])
    grad_clip: float = 50.0
    hfen: float = 0.0
    seed: int = 1
    ckpt_every: int = 50
    backend: str = "auto"  # auto: the native depthwise kernels where they serve; reference: plain

    RANGES = RunConfig.RANGES | {"scale": Range(0)}
    #: the backend computes the same numbers, faster or slower, and --tensorboard only adds
    #: logs: both may change on resume
    RESUMABLE = RunConfig.RESUMABLE + ("backend", "tensorboard")

    def validate(self):
        super().validate()
        if self.backend not in TRAIN_BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(TRAIN_BACKENDS)}, got "
                             f"{self.backend!r}")
        self.load_genotype()

    def load_genotype(self) -> Genotype:
        g = Genotype.load(self.genotype)
        if self.scale and self.scale != g.scale:
            g = dataclasses.replace(g, scale=self.scale)
        self.check_patch(g.scale)
        return g


#: --backend of the retraining -> how the derived network's depthwise convs run
#: (hdnas.model.ops.DEPTHWISE_MODES): auto = the native kernels where they serve (CPU, proven
#: exact by tests/mixed/test_native.py), reference = the plain nn.Conv2d modules
TRAIN_BACKENDS = {"auto": "auto", "reference": "torch"}

PRESETS = {"paper": dict(batch=32, patch=128, lr=3e-4, grad_clip=50.0, steps=1_941_000,
                         log_every=1000, ckpt_every=10_000)}


class Train(Loop):
    """The retraining state: model, optimizer, schedule, sampler, RNG. ``run`` advances it."""

    name, kind = "train", "hdnas-train"

    def __init__(self, cfg: TrainConfig, run_dir: Path, dist=None):
        super().__init__(cfg, run_dir, dist)
        self.genotype = cfg.load_genotype()
        s = self.genotype.scale
        cache = self.open_cache(cfg.train_dir or DEFAULT_DIR / "train", s)
        indices, _ = self.hold_out(cache, range(len(cache)), s)
        self.data = PatchSampler(cache, s, cfg.patch, indices, seed=cfg.seed,
                                 skip_bad=cfg.skip_bad_images)
        self.model = build_net(self.genotype, "--genotype").to(self.device)
        self.model.set_depthwise(TRAIN_BACKENDS[cfg.backend])
        self.fused = run.inference_runner(self.model)  # validation's path on a CPU
        self.loss_fn = SRLoss(cfg.hfen)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.999),
                                    weight_decay=cfg.weight_decay)
        milestones = sorted({max(1, int(m * cfg.steps)) for m in cfg.lr_milestones})
        self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, milestones, cfg.lr_gamma)
        self.scaler = self.amp.scaler()
        self.history = History(run_dir / "history.csv",
                               ["step", "lr", "loss_train", "sec_per_step"] + VAL_COLUMNS)

    def inference_model(self) -> torch.nn.Module:
        """Validation on a CPU runs the fused oneDNN path (hdnas.infer.fused; the same numbers up
        to summation order; it keeps its packed weights between validations); where that
        cannot serve (another device, no oneDNN) it runs the network itself."""
        return self.fused

    def start_data(self, start: int, end: int) -> None:
        self.batches = self.loader(self.data, range(start, end))

    def train_step(self) -> dict:
        self.model.train()
        lr_img, hr_img = self.to_device(next(self.batches))
        self.opt.zero_grad(set_to_none=True)
        with self.amp.autocast():
            loss = self.loss_fn(self.model(lr_img), hr_img)
        self.scaler.scale(loss).backward()
        # the mean over the ranks: the gradient (and loss) of the global batch
        loss_mean, = self.dist.average_grads(self.model.parameters(), (loss,))
        self.check_finite("training loss", loss_mean)
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.opt)
        self.check_grads("weights", self.model.parameters(), self.scaler, self.cfg.grad_clip)
        eta = self.sched.get_last_lr()[0]
        self.scaler.step(self.opt)  # with fp16, skipped when a gradient is inf/nan
        self.scaler.update()
        step_schedule(self.sched)
        self.step += 1
        return {"loss_train": loss_mean, "lr": eta}

    def log_row(self, out, timer):
        return {"step": self.step, "lr": out["lr"], "loss_train": f"{out['loss_train']:.6f}",
                "sec_per_step": f"{timer.mean('step'):.4f}"}

    def describe(self, out) -> str:
        return f"lr {out['lr']:.2e}"

    def state_dict(self) -> dict:
        return {"step": self.step, "model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                "torch_rng": torch.get_rng_state(), "genotype": self.genotype.to_dict()}

    def load_state_dict(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["opt"])
        self.sched.load_state_dict(s["sched"])
        self.scaler.load_state_dict(s.get("scaler", {}))  # {}: disabled, or from before --amp
        torch.set_rng_state(s["torch_rng"] if "torch_rng" in s else s["rng"]["torch"])
        self.step = s["step"]

    def save_best(self) -> None:
        """``best.pt``: the weights of the best validation PSNR so far (weights only, read by
        ``hdnas.evaluate --weights`` and the safe loader), written atomically."""
        checkpoint.save_atomic({"model": self.model.state_dict(), "genotype": self.genotype.to_dict(),
                                "step": self.step, "val_psnr": self.best_val["psnr"],
                                "val_ssim": self.best_val["ssim"]}, self.run_dir / "best.pt")
        weights_io.save_weights(self.model, self.genotype, self.run_dir / "best.safetensors")

    def save(self) -> None:
        """The checkpoint, and the weights with their genotype as ``model.safetensors`` (what
        ``hdnas.evaluate``, ``hdnas.upscale`` and ``hdnas.export`` read without a genotype flag)."""
        super().save()
        if self.dist.is_main:
            write_json(self.run_dir / "genotype.json", self.genotype.to_dict())
            weights_io.save_weights(self.model, self.genotype, self.run_dir / "model.safetensors")
            if not (self.run_dir / "network.png").exists():  # the genotype does not change
                try:
                    plot_genotype(self.genotype, self.run_dir / "network.png", root=self.run_dir)
                except (ValueError, RuntimeError, OSError) as e:
                    log.warning("network.png could not be drawn (%s: %s)", type(e).__name__, e)

    def board_start(self) -> None:
        """--tensorboard: the genotype as text, once."""
        super().board_start()
        self.board.genotype(self.genotype, self.step)

    def result(self):
        return self.run_dir / "checkpoint.pt"

    def summary(self) -> str:
        amp = f" (amp {self.cfg.amp})" if self.cfg.amp != "off" else ""
        return (f"retraining {self.genotype.name or 'genotype'} x{self.genotype.scale} "
                f"({count_params(self.model)} params) on {self.device}{amp}, backend "
                f"{self.cfg.backend} (depthwise convs: {self._depthwise()}), "
                f"{len(self.data)} images"
                + (f", {len(self.val_data[1])} validation images (every {self.val_every} steps)"
                   if self.val_data else ""))

    def _depthwise(self) -> str:
        if self.cfg.backend == "reference":
            return "torch"
        why = native.unavailable_reason(self.device, torch.float32)
        return f"native, {native_build.isa()}" if why is None else f"torch ({why})"

    def finish(self, path) -> str:
        self.draw_pictures()
        return str(path)
