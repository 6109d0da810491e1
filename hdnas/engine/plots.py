"""``python -m hdnas.visualize RUN_DIR``: pictures of a search, for people who would rather look
than read a CSV: softmax(alpha) of each distillation step and softmax(beta) of each cell input
over the search, one panel each, and the validation PSNR/SSIM when the run validated
(``val.png``), drawn with Pillow (no plotting dependency).

The run folder is input like any other: ``config.json`` is read within bounds
(``hdnas.safeio.read_json``) and its ``ops`` / ``cells`` checked, ``history.csv`` must have the
columns they imply with finite numbers; anything else is a ``PlotError`` naming the file. The
pictures are written atomically inside the run folder (a symbolic link planted at ``alpha.png``
is replaced, never written through; one in the folder's path leading elsewhere is refused)."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from hdnas.engine.history import History
from hdnas.model.genotype import MAX_CELLS
from hdnas.safeio import read_json, write_atomic


class PlotError(ValueError):
    """A run folder whose files cannot be drawn (the message names the file)."""

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]
PANEL_W, PANEL_H, MARGIN = 360, 180, 36


def _panel(draw, x0, y0, title, steps, series, labels):
    draw.rectangle([x0, y0, x0 + PANEL_W, y0 + PANEL_H], outline="black")
    draw.text((x0 + 4, y0 - 14), title, fill="black")
    lo, hi = min(steps), max(steps)
    ymin, ymax = min(min(s) for s in series), max(max(s) for s in series)
    pad = 0.05 * (ymax - ymin) or 1e-3
    ymin, ymax = ymin - pad, ymax + pad  # zoom: early in a search all weights sit near 1/K
    for i, s in enumerate(series):
        pts = [(x0 + (st - lo) / max(1, hi - lo) * PANEL_W,
                y0 + PANEL_H - (v - ymin) / (ymax - ymin) * PANEL_H)
               for st, v in zip(steps, s)]
        color = PALETTE[i % len(PALETTE)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        draw.text((x0 + PANEL_W + 6, y0 + 12 * i), labels[i], fill=color)
    draw.text((x0, y0 + PANEL_H + 2), f"step {lo}", fill="black")
    draw.text((x0 + PANEL_W - 60, y0 + PANEL_H + 2), f"step {hi}", fill="black")
    draw.text((x0 + 4, y0 + 2), f"{ymax:.4f}", fill="black")
    draw.text((x0 + 4, y0 + PANEL_H - 12), f"{ymin:.4f}", fill="black")


def _figure(panels, path: Path, root: Path):
    label_w = 120
    img = Image.new("RGB", (PANEL_W + label_w + 2 * MARGIN,
                            len(panels) * (PANEL_H + 2 * MARGIN) + MARGIN), "white")
    draw = ImageDraw.Draw(img)
    for i, args in enumerate(panels):
        _panel(draw, MARGIN, MARGIN + i * (PANEL_H + 2 * MARGIN), *args)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_atomic(path, buf.getvalue(), root=root)


def _config(run_dir: Path) -> tuple[list[str], int]:
    path = run_dir / "config.json"
    cfg = read_json(path, "run config", error=PlotError)
    res = cfg.get("resolved") if isinstance(cfg, dict) else None
    if not isinstance(res, dict):
        raise PlotError(f"{path}: no 'resolved' settings; not the config of a run")
    ops, cells = res.get("ops"), res.get("cells")
    if not (isinstance(ops, list) and 1 <= len(ops) <= 64 and all(isinstance(o, str) for o in ops)):
        raise PlotError(f"{path}: 'ops' is not a list of op names")
    if not (isinstance(cells, int) and not isinstance(cells, bool) and 2 <= cells <= MAX_CELLS):
        raise PlotError(f"{path}: 'cells' is {str(cells)[:40]}, not an integer in 2..{MAX_CELLS}")
    return [o[:40] for o in ops], cells


def _num(row: dict, key: str, path: Path, line: int) -> float:
    try:
        v = float(row[key])
    except (KeyError, TypeError, ValueError):
        raise PlotError(f"{path}: row {line} has no number in column {key!r}") from None
    if not math.isfinite(v):
        raise PlotError(f"{path}: row {line}, column {key!r} is {v}")
    return v


def plot_run(run_dir) -> list[Path]:
    """Write alpha.png, beta.png (and val.png when the history has validation scores) into
    the run folder; returns their paths."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PlotError(f"run folder {run_dir} does not exist")
    ops, cells = _config(run_dir)
    hist = run_dir / "history.csv"
    try:
        rows = History(hist, []).read()
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PlotError(f"{hist}: cannot read the history ({type(e).__name__}: {e})") from None
    if not rows:
        raise PlotError(f"{run_dir} has no history yet")
    steps = [int(_num(r, "step", hist, i)) for i, r in enumerate(rows, start=2)]
    akeys = [k for k in rows[0] if k and k.startswith("alpha_")]
    if not akeys or len(akeys) % (3 * len(ops)):
        raise PlotError(f"{hist}: {len(akeys)} alpha columns do not fit {len(ops)} ops x 3 steps "
                        "(config.json and history.csv of different runs?)")
    alpha = torch.tensor([[_num(r, k, hist, i) for k in akeys]
                          for i, r in enumerate(rows, start=2)], dtype=torch.float64)
    alpha = alpha.view(len(rows), -1, 3, len(ops)).mean(1)  # per-cell alphas: cell average
    panels = [(f"softmax(alpha), step {s + 1}", steps, alpha[:, s].softmax(-1).T.tolist(), ops)
              for s in range(3)]
    out = [run_dir / "alpha.png", run_dir / "beta.png"]
    _figure(panels, out[0], run_dir)
    panels = []
    for c in range(3, cells + 1):
        b = torch.tensor([[_num(r, f"beta{c}_{j}", hist, i) for j in range(c - 1)]
                          for i, r in enumerate(rows, start=2)], dtype=torch.float64)
        panels.append((f"softmax(beta): input of cell {c}", steps, b.softmax(-1).T.tolist(),
                       [f"B{j + 1}" for j in range(c - 1)]))
    _figure(panels, out[1], run_dir)
    val = [(st, float(r["val_psnr"]), float(r["val_ssim"])) for st, r in zip(steps, rows)
           if _finite(r.get("val_psnr")) and _finite(r.get("val_ssim"))]
    if val:  # validation scores (Y, shave = scale) at each validation
        vs = [v[0] for v in val]
        _figure([("validation PSNR (dB, Y)", vs, [[v[1] for v in val]], ["PSNR"]),
                 ("validation SSIM (Y)", vs, [[v[2] for v in val]], ["SSIM"])],
                run_dir / "val.png", run_dir)
        out.append(run_dir / "val.png")
    return out


def _finite(text) -> bool:
    try:
        return math.isfinite(float(text))
    except (TypeError, ValueError):
        return False
