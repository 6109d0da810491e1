"""TensorBoard logs of a run (``--tensorboard``; ``tensorboard --logdir RUN_DIR/tensorboard``).

Rank 0 writes, under ``RUN_DIR/tensorboard/``, with ``torch.utils.tensorboard.SummaryWriter``:

- at every history row, the scalars of ``history.csv`` (``SCALARS``: ``loss/train``,
  ``loss/arch``, ``loss/penalty``, ``lr``, ``time/sec_per_step``, ``time/sec_weight_step``,
  ``time/sec_arch_step``, ``val/psnr``, ``val/ssim``; a nan or empty value, such as the
  architecture loss during the warm-up, is left out) and, for a search, softmax(alpha) per op
  (``alpha/step{s}/{op}``, ``alpha/cell{c}/step{s}/{op}`` with ``--alpha-per-cell``) and
  softmax(beta) per predecessor (``beta/cell{c}/B{j}``);
- the genotype as text (``genotype``: a table of the ops and inputs of each cell, and its JSON):
  a search's at every checkpoint, a retraining's once;
- at every validation, 1-2 validation images (``val/image{k}``: the LR image upscaled with
  MATLAB's bicubic, the network's SR and the HR, side by side; a centre crop of at most
  ``CROP`` HR pixels a side, so the event file stays small);
- a custom-scalars layout (the CUSTOM SCALARS tab): the losses in one chart, the step times in
  one, the ops of each distillation step in one, the predecessors of each cell in one.

``tensorboard`` is an optional dependency (``pip install 'hdnas[tensorboard]'``), imported only
when a run asks for it; without it ``--tensorboard`` stops the run before it starts with an
error naming that command. The event files are streams, appended to by the writer (like
``history.csv``), not rewritten; the folder must be a plain folder inside the run folder (a
symbolic link planted there is refused). A resumed run purges the events past its checkpoint
(``purge_step``), as it truncates ``history.csv``. A new run that stops before its first
checkpoint removes the folder with the rest of the run."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from hdnas.data.imresize import imresize
from hdnas.engine.errors import RunError
from hdnas.model.genotype import Genotype
from hdnas.safeio import inside

__all__ = ["Board", "FOLDER", "INSTALL", "SCALARS", "CROP", "search_layout", "genotype_text",
           "side_by_side"]

FOLDER = "tensorboard"
INSTALL = "pip install 'hdnas[tensorboard]'"
#: history.csv column -> TensorBoard tag
SCALARS = {"loss_train": "loss/train", "loss_arch": "loss/arch", "penalty": "loss/penalty",
           "lr": "lr", "sec_per_step": "time/sec_per_step",
           "sec_weight_step": "time/sec_weight_step", "sec_arch_step": "time/sec_arch_step",
           "val_psnr": "val/psnr", "val_ssim": "val/ssim"}
#: the largest side (HR pixels) of a logged validation image
CROP = 256
#: validation images logged at each validation
IMAGES = 2


def _writer_class():
    try:  # optional dependency: loaded only by a run given --tensorboard
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise RunError(f"--tensorboard needs the tensorboard package ({e}); install it with "
                       f"{INSTALL}") from None
    return SummaryWriter


def search_layout(ops: list[str], groups: int, cells: int) -> dict:
    """The custom-scalars charts of a search's alpha (``groups``: 1 shared, else one per cell)
    and beta."""
    alpha = {}
    for g in range(groups):
        cell = f"cell{g + 1}/" if groups > 1 else ""
        for s in range(3):
            title = f"cell {g + 1}, step {s + 1}" if groups > 1 else f"step {s + 1}"
            alpha[title] = ["Multiline", [f"alpha/{cell}step{s + 1}/"]]
    beta = {f"input of cell {c}": ["Multiline", [f"beta/cell{c}/"]] for c in range(3, cells + 1)}
    return {"softmax(alpha)": alpha, "softmax(beta)": beta}


def genotype_text(g: Genotype) -> str:
    """Markdown: a table of the cells (ops of the three steps, inputs) and the genotype's JSON."""
    lines = [f"**{g.name or 'genotype'}**: C={g.channels}, x{g.scale}, {g.num_cells} cells", "",
             "| cell | step 1 | step 2 | step 3 | input |", "|---|---|---|---|---|"]
    for i in range(g.num_cells):
        src = "head" if i == 0 else "B1" if i == 1 else \
            " + ".join(f"B{j + 1}" for j in g.inputs[i - 2])
        lines.append(f"| B{i + 1} | " + " | ".join(g.ops_of_cell(i)) + f" | {src} |")
    return "\n".join(lines + ["", "    " + json.dumps(g.to_dict())])


def _crop(t: torch.Tensor, top: int, left: int, h: int, w: int) -> torch.Tensor:
    return t[:, top:top + h, left:left + w]


def side_by_side(lr: torch.Tensor, sr: torch.Tensor, hr: torch.Tensor, crop: int = CROP):
    """uint8 (3, h, W) of [LR bicubic | SR | HR], a centre crop of at most ``crop`` HR pixels a
    side, 4 white pixels between, under a line naming them. ``lr``, ``hr``: uint8 (3, h, w);
    ``sr``: float 0..255."""
    h, w = min(sr.shape[1], hr.shape[1]), min(sr.shape[2], hr.shape[2])
    bic = imresize(lr.double(), size=(hr.shape[1], hr.shape[2]))
    ch, cw = min(h, crop), min(w, crop)
    top, left = (h - ch) // 2, (w - cw) // 2
    parts = [_crop(t.double(), top, left, ch, cw).round().clamp(0, 255).to(torch.uint8)
             for t in (bic, sr, hr)]
    gap = torch.full((3, ch, 4), 255, dtype=torch.uint8)
    body = torch.cat([parts[0], gap, parts[1], gap, parts[2]], dim=2)
    head = Image.new("RGB", (body.shape[2], 14), "white")  # what each tile is
    draw = ImageDraw.Draw(head)
    for k, text in enumerate(("LR, bicubic", "SR (network)", "HR")):
        draw.text((k * (cw + 4) + 2, 1), text, fill="black")
    head = torch.from_numpy(np.array(head)).permute(2, 0, 1)
    return torch.cat([head, body], dim=1)


class Board:
    """The TensorBoard writer of one run (rank 0 only). ``Board(run_dir)`` checks that
    tensorboard can be imported (``RunError`` naming the install command) and that the folder is
    safe; ``open`` starts the writer."""

    def __init__(self, run_dir: Path):
        self._cls = _writer_class()
        self.run_dir, self.dir = Path(run_dir), Path(run_dir) / FOLDER
        if self.dir.is_symlink() or (self.dir.exists() and not self.dir.is_dir()) \
                or not inside(self.dir, self.run_dir):
            raise RunError(f"{self.dir} is not a plain folder of the run (a symbolic link or a "
                           "file?); remove it for --tensorboard")
        self.writer = None

    def open(self, step: int, layout: dict | None = None) -> None:
        """Start writing; a run resumed at ``step`` (its checkpoint's) hides the events that
        an earlier process logged past it, as ``history.csv`` drops their rows."""
        self.writer = self._cls(str(self.dir), purge_step=step + 1 if step else None,
                                flush_secs=30)
        charts = {"losses": {"train and arch": ["Multiline", ["loss/train", "loss/arch"]],
                             "penalty": ["Multiline", ["loss/penalty"]]},
                  "time": {"seconds per step": ["Multiline", ["time/"]]},
                  "validation": {"PSNR": ["Multiline", ["val/psnr"]],
                                 "SSIM": ["Multiline", ["val/ssim"]]}}
        self.writer.add_custom_scalars(charts | (layout or {}))

    def scalar(self, tag: str, value, step: int) -> None:
        try:
            v = float(value)
        except (TypeError, ValueError):
            return
        if math.isfinite(v):
            self.writer.add_scalar(tag, v, step)

    def row(self, row: dict, step: int) -> None:
        """The ``SCALARS`` of a history row."""
        for column, tag in SCALARS.items():
            if column in row:
                self.scalar(tag, row[column], step)

    def weights(self, prefix: str, values: torch.Tensor, names: list[str], step: int) -> None:
        """``prefix/name`` for each of ``values`` (1-D)."""
        for v, name in zip(values.tolist(), names):
            self.writer.add_scalar(f"{prefix}/{name}", v, step)

    def architecture(self, alphas: torch.Tensor, betas, ops: list[str], step: int) -> None:
        """softmax(alpha) per op of each distillation step (``alphas``: (3, K) shared or
        (cells, 3, K)) and softmax(beta) per predecessor of each cell 3.. (``betas``)."""
        a = alphas.detach().float().cpu().reshape(-1, 3, len(ops)).softmax(-1)
        for g in range(a.shape[0]):
            cell = f"cell{g + 1}/" if a.shape[0] > 1 else ""
            for s in range(3):
                self.weights(f"alpha/{cell}step{s + 1}", a[g, s], ops, step)
        for c, b in enumerate(betas, start=3):
            self.weights(f"beta/cell{c}", b.detach().float().cpu().softmax(-1),
                         [f"B{j + 1}" for j in range(c - 1)], step)

    def genotype(self, g: Genotype, step: int) -> None:
        self.writer.add_text("genotype", genotype_text(g), step)

    def images(self, samples: list, step: int) -> None:
        """``val/image{k}`` for each (lr, sr, hr) of ``samples``."""
        for k, (lr, sr, hr) in enumerate(samples[:IMAGES]):
            self.writer.add_image(f"val/image{k}", side_by_side(lr, sr, hr), step,
                                  dataformats="CHW")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self, discard: bool = False) -> None:
        """Close the writer; ``discard``: remove the folder (a new run that left nothing)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if discard and self.dir.is_dir() and not self.dir.is_symlink():
            shutil.rmtree(self.dir, ignore_errors=True)
