"""``python -m hdnas.visualize RUN_DIR``: pictures of a search, for people who would rather look
than read a CSV: softmax(alpha) of each distillation step and softmax(beta) of each cell input
over the search, one panel each, and the validation PSNR/SSIM when the run validated
(``val.png``), drawn with Pillow (no plotting dependency)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from hdnas.engine.history import History

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


def _figure(panels, path: Path):
    label_w = 120
    img = Image.new("RGB", (PANEL_W + label_w + 2 * MARGIN,
                            len(panels) * (PANEL_H + 2 * MARGIN) + MARGIN), "white")
    draw = ImageDraw.Draw(img)
    for i, args in enumerate(panels):
        _panel(draw, MARGIN, MARGIN + i * (PANEL_H + 2 * MARGIN), *args)
    img.save(path)


def plot_run(run_dir) -> list[Path]:
    """Write alpha.png, beta.png (and val.png when the history has validation scores) into
    the run folder; returns their paths."""
    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())["resolved"]
    rows = History(run_dir / "history.csv", []).read()
    if not rows:
        raise ValueError(f"{run_dir} has no history yet")
    steps = [int(r["step"]) for r in rows]
    ops, cells = cfg["ops"], cfg["cells"]
    alpha = torch.tensor([[float(v) for k, v in r.items() if k.startswith("alpha_")] for r in rows])
    alpha = alpha.view(len(rows), -1, 3, len(ops)).mean(1)  # per-cell alphas: cell average
    panels = [(f"softmax(alpha), step {s + 1}", steps, alpha[:, s].softmax(-1).T.tolist(), ops)
              for s in range(3)]
    out = [run_dir / "alpha.png", run_dir / "beta.png"]
    _figure(panels, out[0])
    panels = []
    for c in range(3, cells + 1):
        b = torch.tensor([[float(r[f"beta{c}_{j}"]) for j in range(c - 1)] for r in rows])
        panels.append((f"softmax(beta): input of cell {c}", steps, b.softmax(-1).T.tolist(),
                       [f"B{j + 1}" for j in range(c - 1)]))
    _figure(panels, out[1])
    val = [(st, float(r["val_psnr"]), float(r["val_ssim"])) for st, r in zip(steps, rows)
           if r.get("val_psnr") not in (None, "", "nan")]
    if val:  # validation scores (Y, shave = scale) at each validation
        vs = [v[0] for v in val]
        _figure([("validation PSNR (dB, Y)", vs, [[v[1] for v in val]], ["PSNR"]),
                 ("validation SSIM (Y)", vs, [[v[2] for v in val]], ["SSIM"])],
                run_dir / "val.png")
        out.append(run_dir / "val.png")
    return out
