"""The DLSR bilevel search (``python -m hdnas.search``): its settings, its presets and its loop.

Alternates weight steps on the train split and architecture steps on the arch split (after a
warm-up), logs alpha/beta, writes the genotype, and checkpoints atomically so a resumed run
continues a killed one exactly where its last checkpoint left it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hdnas import native_build
from hdnas.data.train import DEFAULT_DIR, PatchSampler, split
from hdnas.engine.config import (FRACTION, FRACTION_OPEN, NON_NEGATIVE, POSITIVE, Range,
                                 RunConfig)
from hdnas.engine.history import VAL_COLUMNS, History, open_append
from hdnas.engine.loop import Loop
from hdnas.engine.plots import plot_genotype, plot_run
from hdnas.engine.rundir import write_json
from hdnas.engine.runtime import step_schedule
from hdnas.engine.tensorboard import search_layout
from hdnas.io import weights as weights_io
from hdnas.io.atomic import write_atomic
from hdnas.mixed import dense, resolve_backend
from hdnas.model.genotype import check_scale
from hdnas.model.network import SuperNet
from hdnas.model.space import DLSR_PRIMITIVES, check_op_set
from hdnas.nas.architect import RULES, Architect
from hdnas.nas.budget import fixed_cost
from hdnas.nas.losses import ComplexityPenalty, LatencyPenalty, SRLoss

log = logging.getLogger("hdnas")


@dataclass
class SearchConfig(RunConfig):
    """Defaults finish on 2 CPU cores in about 10 minutes; ``--preset paper`` is the release's
    search (docs/presets.md lists what still differs). The shared fields and their defaults:
    ``RunConfig``."""

    arch_dir: str = ""  # empty with a train_dir: the last arch_fraction of train_dir's images
    arch_fraction: float = 0.13  # the release: DF2K images 3000-3450 of 3450
    scale: int = 2
    channels: int = 48
    cells: int = 6
    ops: list = field(default_factory=lambda: list(DLSR_PRIMITIVES))
    alpha_per_cell: bool = False
    warmup: int | None = None  # weight-only steps before alpha/beta updates; None: auto
    warmup_fraction: float = 0.25  # the auto warm-up: this share of the steps
    rule: str = "joint"
    arch_lr: float = 3e-4
    arch_weight_decay: float = 1e-8
    penalty: float = 1.0
    budget: float | None = None
    budget_kind: str = "params"
    penalty_kind: str = "complexity"  # or "latency" (a table from python -m hdnas.latency)
    latency_table: str = ""
    budget_ms: float | None = None
    backend: str = "auto"  # a backend name, or auto/fused: the fastest exact one here
    deterministic: bool = False  # fix every timed choice up front (the dense-conv route)

    RANGES = RunConfig.RANGES | {
        "arch_fraction": FRACTION_OPEN, "channels": Range(4), "cells": Range(2),
        "warmup": Range(0), "warmup_fraction": FRACTION, "arch_lr": POSITIVE,
        "arch_weight_decay": NON_NEGATIVE, "penalty": NON_NEGATIVE, "budget": POSITIVE,
        "budget_ms": POSITIVE,
    }
    #: the backend computes the same numbers, faster or slower, and --tensorboard only adds
    #: logs: both may change on resume
    RESUMABLE = RunConfig.RESUMABLE + ("backend", "tensorboard")

    def validate(self):
        check_scale(self.scale)
        check_op_set(self.ops)
        if self.rule not in RULES:
            raise ValueError(f"--rule must be one of {RULES}, got {self.rule!r}")
        super().validate()
        self.check_patch(self.scale)
        if self.warmup is not None and not 0 <= self.warmup <= self.steps:
            raise ValueError(f"--warmup {self.warmup} is not between 0 and --steps {self.steps}; "
                             "leave --warmup out for a warm-up of --warmup-fraction "
                             f"({self.warmup_fraction}) of the steps")
        if self.budget_kind not in ("params", "macs"):
            raise ValueError("--budget-kind must be 'params' or 'macs'")
        if self.penalty_kind not in ("complexity", "latency"):
            raise ValueError(f"--penalty-kind must be 'complexity' or 'latency', got "
                             f"{self.penalty_kind!r}")
        if self.penalty_kind == "latency" and not self.latency_table:
            raise ValueError("--penalty-kind latency needs --latency-table T.json (measure one "
                             "with python -m hdnas.latency)")
        if self.penalty_kind != "latency" and (self.latency_table or self.budget_ms is not None):
            raise ValueError("--latency-table and --budget-ms need --penalty-kind latency")

    def set(self, name: str, value) -> dict:
        """A resumed run given more ``--steps`` keeps its warm-up at the steps it had."""
        pinned = {}
        if name == "steps" and self.warmup is None:
            self.warmup = pinned["warmup"] = self.warmup_steps()
        return super().set(name, value) | pinned

    def warmup_steps(self) -> int:
        """The number of weight-only steps: ``warmup``, or when it is unset (None)
        ``warmup_fraction`` of ``steps``, rounded to the nearest integer."""
        if self.warmup is not None:
            return self.warmup
        return round(self.warmup_fraction * self.steps)


PRESETS = {
    # The release's search: DF2K, x2, HR patch 64, batch 64, 1000 epochs of about 1000 batches,
    # architecture updates after epoch 20 (2% of the run), and no working complexity penalty
    # (the release's is detached). Give --train-dir (and --arch-dir) yourself;
    # docs/presets.md lists what still differs. --penalty 1 adds our penalty with a gradient.
    "paper": dict(batch=64, patch=64, scale=2, channels=48, cells=6, lr=5e-4, arch_lr=3e-4,
                  hfen=0.2, rule="joint", penalty=0.0, warmup=None, warmup_fraction=0.02,
                  steps=1_000_000, ckpt_every=1000, log_every=100),
}


# history.csv's time columns: the mean seconds, over the steps since the previous row, of a
# whole step, of its weight part (over all steps) and of its architecture part (over the steps
# that had one; nan if none did). A step with an architecture update takes about
# sec_weight_step + sec_arch_step.
TIME_COLUMNS = {"sec_per_step": "step", "sec_weight_step": "weight", "sec_arch_step": "arch"}


def _record_step(line: str) -> int | None:
    """The step of a genotypes.jsonl record; None for a line that is not one (cut by a kill)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    step = rec.get("step") if isinstance(rec, dict) else None
    return step if isinstance(step, int) else None


class Search(Loop):
    """The search state: model, optimizers, samplers, RNG. ``run`` advances it."""

    name, kind = "search", "hdnas-search"

    def __init__(self, cfg: SearchConfig, run_dir: Path, dist=None):
        super().__init__(cfg, run_dir, dist)
        self.train_data, self.arch_data = self._samplers()
        # timed choices: none with --deterministic; otherwise made once per shape, saved in each
        # checkpoint and timed_choices.json, and adopted again by --resume (load_state_dict)
        dense.pin("direct" if cfg.deterministic else None)
        self.backend = resolve_backend(cfg.backend, self.device, torch.float32, cfg.ops)
        self.model = SuperNet(cfg.channels, cfg.cells, cfg.scale, cfg.ops, cfg.alpha_per_cell,
                              self.backend).to(self.device)
        # what the steps call for the supernet's output: the module itself. There is no --compile
        # (BENCHMARKS.md, "compile peer": measured no faster); bench/bench_compile.py
        # --whole-step puts a torch.compile wrapper here and in the architect to measure it
        self.forward = self.model
        self.loss_fn = SRLoss(cfg.hfen)
        self.w_opt = torch.optim.Adam(self.model.weight_parameters(), lr=cfg.lr,
                                      betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
        milestones = sorted({max(1, int(m * cfg.steps)) for m in cfg.lr_milestones})
        self.sched = torch.optim.lr_scheduler.MultiStepLR(self.w_opt, milestones, cfg.lr_gamma)
        self.w_scaler = self.amp.scaler()
        self.architect = Architect(self.model, self.loss_fn, cfg.rule, cfg.arch_lr,
                                   weight_decay=cfg.arch_weight_decay, penalty=self._penalty(),
                                   w_weight_decay=cfg.weight_decay, autocast=self.amp.autocast,
                                   scaler=self.amp.scaler(), average=self.dist.average,
                                   forward=self.forward)
        self.warmup = cfg.warmup_steps()
        n_alpha = self.model.alphas.numel()
        self.history = History(run_dir / "history.csv",
                               ["step", "lr", "loss_train", "loss_arch", "penalty"]
                               + list(TIME_COLUMNS)
                               + [f"alpha_{i}" for i in range(n_alpha)]
                               + [f"beta{c + 3}_{j}" for c in range(cfg.cells - 2)
                                  for j in range(c + 2)] + VAL_COLUMNS)
        self.genotypes = run_dir / "genotypes.jsonl"

    def _samplers(self):
        """Weight and architecture patch samplers (streams 0 and 1 of the seed); the
        validation images are held out of the weight images."""
        cfg = self.cfg
        if cfg.arch_dir and not cfg.train_dir:
            raise ValueError("--arch-dir needs a --train-dir")
        train = self.open_cache(cfg.train_dir or DEFAULT_DIR / "train", cfg.scale)
        if cfg.arch_dir or not cfg.train_dir:
            arch = self.open_cache(cfg.arch_dir or DEFAULT_DIR / "arch", cfg.scale)
            w_idx, a_idx = range(len(train)), range(len(arch))
        else:  # one folder split by name order
            arch, cut = train, 1.0 - cfg.arch_fraction
            w_idx, a_idx = split(len(train), (0.0, cut)), split(len(train), (cut, 1.0))
        w_idx, _ = self.hold_out(train, w_idx, cfg.scale)
        opts = dict(seed=cfg.seed, skip_bad=cfg.skip_bad_images)
        return (PatchSampler(train, cfg.scale, cfg.patch, w_idx, stream=0, **opts),
                PatchSampler(arch, cfg.scale, cfg.patch, a_idx, stream=1, **opts))

    def start_data(self, start: int, end: int) -> None:
        self.train_batches = self.loader(self.train_data, range(start, end))
        self.arch_batches = self.loader(self.arch_data, range(max(start, self.warmup), end))

    def _penalty(self):
        cfg = self.cfg
        if cfg.penalty_kind == "latency":
            return LatencyPenalty(cfg.latency_table, cfg.ops, cfg.penalty, cfg.budget_ms,
                                  cfg.channels)
        fixed, pixels = 0.0, 1.0
        if cfg.budget is not None:
            fixed, pixels = fixed_cost(cfg.channels, cfg.cells, cfg.scale, cfg.budget_kind)
        return ComplexityPenalty(cfg.ops, cfg.channels, cfg.penalty, cfg.budget, cfg.budget_kind,
                                 fixed, pixels)

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "model": self.model.state_dict(), "w_opt": self.w_opt.state_dict(),
                "sched": self.sched.state_dict(), "a_opt": self.architect.optimizer.state_dict(),
                "w_scaler": self.w_scaler.state_dict(),
                "a_scaler": self.architect.scaler.state_dict(),
                "torch_rng": torch.get_rng_state(), "config": dataclasses.asdict(self.cfg),
                "timed_choices": dense.export_choices()}

    def load_state_dict(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.w_opt.load_state_dict(s["w_opt"])
        self.sched.load_state_dict(s["sched"])
        self.architect.optimizer.load_state_dict(s["a_opt"])
        # a disabled scaler's state is {}; checkpoints from before --amp have none
        self.w_scaler.load_state_dict(s.get("w_scaler", {}))
        self.architect.scaler.load_state_dict(s.get("a_scaler", {}))
        torch.set_rng_state(s["torch_rng"] if "torch_rng" in s else s["rng"]["torch"])
        n = dense.load_choices(s.get("timed_choices", []))
        if n:
            log.info("resume: %d timed dense-conv route(s) of the run adopted", n)
        self.step = s["step"]

    def save(self) -> None:
        super().save()
        if self.dist.is_main:
            write_json(self.run_dir / "genotype.json",
                       self.model.genotype(name=self.run_dir.name).to_dict())
            write_json(self.run_dir / "timed_choices.json",
                       {"dense_conv": dense.export_choices(),
                        "deterministic": self.cfg.deterministic})
            # the supernet's weights (no genotype: they do not fit the derived network)
            weights_io.save_weights(self.model, None, self.run_dir / "supernet.safetensors")
            self.draw_network()

    def draw_network(self) -> None:
        """network.png (and the genotype as TensorBoard text) when the derived genotype changed
        since the last checkpoint; a drawing that fails is a warning (the run goes on)."""
        g = self.model.genotype(name=self.run_dir.name)
        if g == getattr(self, "_drawn", None):
            return
        if self.board is not None:
            self.board.genotype(g, self.step)
            self.board.flush()
        try:
            plot_genotype(g, self.run_dir / "network.png", root=self.run_dir)
            self._drawn = g
        except (ValueError, RuntimeError, OSError) as e:
            log.warning("network.png could not be drawn (%s: %s)", type(e).__name__, e)

    def board_start(self) -> None:
        """--tensorboard: the charts of alpha (per distillation step) and beta (per cell)."""
        groups = self.model.alphas.numel() // (3 * len(self.cfg.ops))
        self.board.open(self.step, search_layout(self.cfg.ops, groups, self.cfg.cells))

    def board_row(self, row: dict) -> None:
        super().board_row(row)
        self.board.architecture(self.model.alphas, self.model.betas, self.cfg.ops, self.step)

    def on_validation(self, val: dict) -> None:
        """Record the genotype derived at each validation (genotypes.jsonl, one JSON per line)."""
        super().on_validation(val)
        if self.dist.is_main:
            rec = {"step": self.step, **val,
                   "genotype": self.model.genotype(name=f"{self.run_dir.name}@{self.step}").to_dict()}
            with open_append(self.genotypes) as f:
                f.write(json.dumps(rec) + "\n")

    def truncate_after(self, step: int) -> None:
        super().truncate_after(step)
        if self.dist.is_main and self.genotypes.exists():
            keep = "".join(ln + "\n" for ln in self.genotypes.read_text().splitlines()
                           if _record_step(ln) is not None and _record_step(ln) <= step)
            write_atomic(self.genotypes, lambda f: f.write(keep.encode()))

    def result(self):
        return self.model.genotype(name=self.run_dir.name)

    def summary(self) -> str:
        cfg = self.cfg
        auto = "" if cfg.warmup is not None else f" (auto: {cfg.warmup_fraction:g} of the steps)"
        amp = f"; amp {cfg.amp}" if cfg.amp != "off" else ""
        if amp and cfg.rule == "darts2":
            amp += " for the weight steps (darts2's architecture step runs in fp32)"
        val = (f" / {len(self.val_data[1])} validation (every {self.val_every} steps)"
               if self.val_data else "")
        kern = ""
        if self.backend.name == "native" and self.device.type == "cpu":
            kern = f" (CPU kernels {native_build.isa()})"
        chose = f" (chosen for --backend {cfg.backend})" if cfg.backend != self.backend.name \
            else ""
        det = "; timed choices pinned (--deterministic)" if cfg.deterministic else ""
        return (f"backend {self.backend.name}{kern} on {self.device}{chose}{amp}{det}; "
                f"{len(self.train_data)} "
                f"train / {len(self.arch_data)} arch{val} images; supernet "
                f"{sum(p.numel() for p in self.model.weight_parameters())} weights; "
                f"architecture updates from step {self.warmup + 1}, warm-up {self.warmup} of "
                f"{cfg.steps} steps{auto}")

    def finish(self, genotype) -> str:
        log.info("genotype: %s", genotype.to_dict())
        self.draw_pictures()
        return str(self.run_dir / "genotype.json")

    # -- loop ----------------------------------------------------------------------------
    def batch(self, batches):
        return self.to_device(next(batches))

    def train_step(self) -> dict:
        """One weight step, and after the warm-up one architecture step (before the weight step
        for the DARTS rules, after it for joint). Timed as the parts "weight" and "arch"."""
        self.model.train()
        arch_update = self.step >= self.warmup
        eta = self.sched.get_last_lr()[0]
        with self.timer.part("weight"):
            train_batch = self.batch(self.train_batches)
        out = {}
        if arch_update and self.architect.before_weight_step:
            out.update(self.arch_step(train_batch, eta))
        with self.timer.part("weight"):
            loss = self.weight_step(train_batch)
        if arch_update and not self.architect.before_weight_step:
            out.update(self.arch_step(train_batch, eta))
        self.step += 1
        out["loss_train"] = loss
        out["lr"] = eta
        return out

    def weight_step(self, batch) -> float:
        cfg, m = self.cfg, self.model
        self.w_opt.zero_grad(set_to_none=True)
        with self.amp.autocast():
            loss = self.loss_fn(self.forward(batch[0]), batch[1])
        weights = m.weight_parameters()
        self.w_scaler.scale(loss).backward(inputs=weights)
        # the mean over the ranks: the gradient (and loss) of the global batch
        loss_mean, = self.dist.average_grads(weights, (loss,))
        self.check_finite("training loss", loss_mean)
        if cfg.grad_clip:
            self.w_scaler.unscale_(self.w_opt)
        self.check_grads("weights", weights, self.w_scaler, cfg.grad_clip)
        self.w_scaler.step(self.w_opt)  # with fp16, skipped when a gradient is inf/nan
        self.w_scaler.update()
        step_schedule(self.sched)
        return loss_mean

    def arch_step(self, train_batch, eta: float) -> dict:
        with self.timer.part("arch"):
            return self.architect.step(train_batch, self.batch(self.arch_batches), eta)

    def log_row(self, out: dict, timer) -> dict:
        row = {"step": self.step, "lr": out["lr"], "loss_train": f"{out['loss_train']:.6f}",
               "loss_arch": f"{out.get('loss_arch', float('nan')):.6f}",
               "penalty": f"{out.get('penalty', float('nan')):.6f}"}
        for column, part in TIME_COLUMNS.items():
            row[column] = f"{timer.mean(part):.4f}"
        for i, a in enumerate(self.model.alphas.detach().flatten().tolist()):
            row[f"alpha_{i}"] = f"{a:.6g}"
        for c, b in enumerate(self.model.betas):
            for j, v in enumerate(b.detach().tolist()):
                row[f"beta{c + 3}_{j}"] = f"{v:.6g}"
        return row

    def describe(self, out: dict) -> str:
        g = self.model.genotype()
        arch = f"arch {out['loss_arch']:.4f} " if "loss_arch" in out else ""
        return f"{arch}genotype {[list(r) for r in g.cell_ops]} inputs {[list(p) for p in g.inputs]}"
