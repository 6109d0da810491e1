"""The pictures of a run, drawn with matplotlib into files (no window, no pyplot state: every
figure is a ``matplotlib.figure.Figure`` saved through the atomic writer):

- ``alpha.png`` (search): softmax(alpha) of each distillation step over the search, one line per
  candidate op, the op the genotype derives (argmax) drawn thicker and named in the panel title;
  one row of panels per cell with ``--alpha-per-cell``;
- ``beta.png`` (search): softmax(beta) over the predecessors of each cell 3.., the two the
  genotype takes named in the title;
- ``curves.png``: the training and architecture losses, the penalty, the learning rate and the
  seconds per step (whole step, weight part, architecture part), when the history has them;
- ``val.png``: validation PSNR/SSIM (Y, shave = scale), the best PSNR marked, when it validated;
- ``network.png``: the derived network of ``genotype.json`` (``hdnas.engine.drawing``).

Every panel has ticks, a grid, axis labels and a legend; the search's panels mark the end of the
warm-up; curves with few points get markers, so a run with one logged row draws a visible point.

The run folder is input like any other: ``config.json`` is read within bounds
(``hdnas.safeio.read_json``) and, for a search, its ``ops`` / ``cells`` checked; ``history.csv``
must have the alpha/beta columns they imply with finite numbers (the loss and time columns may
be empty or nan: such points are left out); anything else is a ``PlotError`` naming the file.
The pictures are written atomically inside the run folder (a symbolic link planted at
``alpha.png`` is replaced, never written through; one in the folder's path leading elsewhere is
refused)."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from hdnas.engine.drawing import draw_genotype
from hdnas.engine.history import History
from hdnas.model.genotype import MAX_CELLS, NAMED, Genotype
from hdnas.safeio import read_json, write_atomic

__all__ = ["PlotError", "plot_run", "plot_genotype", "load_genotype", "draw_source", "PICTURES"]

#: every picture a run folder may hold
PICTURES = ("alpha.png", "beta.png", "val.png", "curves.png", "network.png")
#: curves of at most this many points get markers
FEW = 40
DPI = 110
#: (column, legend) of each panel of curves.png, by panel title
CURVES = {
    "loss": [("loss_train", "weight step (train split)"),
             ("loss_arch", "architecture step (arch split)")],
    "complexity / latency penalty": [("penalty", "penalty")],
    "learning rate (weights)": [("lr", "lr")],
    "seconds per step": [("sec_per_step", "whole step"), ("sec_weight_step", "weight part"),
                         ("sec_arch_step", "architecture part")],
}


class PlotError(ValueError):
    """A run folder whose files cannot be drawn (the message names the file)."""


# --------------------------------------------------------------------------- reading
def _config(run_dir: Path) -> tuple[dict, list[str] | None, int | None]:
    """(resolved settings, ops, cells); ops and cells are None for a retraining run."""
    path = run_dir / "config.json"
    cfg = read_json(path, "run config", error=PlotError)
    res = cfg.get("resolved") if isinstance(cfg, dict) else None
    if not isinstance(res, dict):
        raise PlotError(f"{path}: no 'resolved' settings; not the config of a run")
    if cfg.get("kind") == "hdnas-train":
        return res, None, None
    ops, cells = res.get("ops"), res.get("cells")
    if not (isinstance(ops, list) and 1 <= len(ops) <= 64 and all(isinstance(o, str) for o in ops)):
        raise PlotError(f"{path}: 'ops' is not a list of op names")
    if not (isinstance(cells, int) and not isinstance(cells, bool) and 2 <= cells <= MAX_CELLS):
        raise PlotError(f"{path}: 'cells' is {str(cells)[:40]}, not an integer in 2..{MAX_CELLS}")
    return res, [o[:40] for o in ops], cells


def _num(row: dict, key: str, path: Path, line: int) -> float:
    try:
        v = float(row[key])
    except (KeyError, TypeError, ValueError):
        raise PlotError(f"{path}: row {line} has no number in column {key!r}") from None
    if not math.isfinite(v):
        raise PlotError(f"{path}: row {line}, column {key!r} is {v}")
    return v


def _maybe(text) -> float:
    """A finite number, or nan (empty, 'nan', not a number, infinite)."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def _finite(text) -> bool:
    return not math.isnan(_maybe(text))


def _warmup(res: dict, first: int, last: int) -> int | None:
    """The search's last weight-only step, when it lies inside the plotted steps."""
    w, frac, steps = res.get("warmup"), res.get("warmup_fraction"), res.get("steps")
    if not (isinstance(w, int) and not isinstance(w, bool)):
        ok = isinstance(frac, (int, float)) and isinstance(steps, int) and 0 <= frac <= 1
        w = round(frac * steps) if ok and 0 <= steps < 2**62 else None
    return w if w is not None and max(first, 1) <= w < last else None


# --------------------------------------------------------------------------- drawing
def _axes(ax, title: str, ylabel: str | None, xs: list[int], xlabel: bool = True) -> None:
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.35, linewidth=0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    ax.tick_params(labelsize=8)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=8)
    if xlabel:
        ax.set_xlabel("step", fontsize=8)
    if xs and min(xs) == max(xs):  # one point: a window around it, not a zero-width axis
        ax.set_xlim(xs[0] - 1, xs[0] + 1)


def _line(ax, xs, ys, label=None, color=None, width=1.4, **kw):
    """A curve; points left out where ys is nan; markers when the points are few."""
    pts = [(x, y) for x, y in zip(xs, ys) if not math.isnan(y)]
    if not pts:
        return None
    few = len(pts) <= FEW
    return ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, color=color,
                   linewidth=width, marker="o" if few else None,
                   markersize=4 if len(pts) > 1 else 6, **kw)[0]


def _zoomed(ax) -> None:
    """No offset notation on the y axis (early in a search all weights sit near 1/K)."""
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")


def _mark_warmup(ax, warm: int | None) -> None:
    if warm is not None:
        ax.axvline(warm, color="#666666", linestyle=":", linewidth=1.0,
                   label=f"end of warm-up (step {warm})")


def _save(fig: Figure, path: Path, root: Path) -> Path:
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=DPI,
                                             pil_kwargs={"compress_level": 1}), root=root)
    return path


def _grid(n: int, ncols: int, w: float, h: float, min_width: float = 0.0, **kw):
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(max(min_width, w * ncols + 0.6), h * nrows + 1.0),
                 layout="constrained")
    axs = fig.subplots(nrows, ncols, squeeze=False, **kw)
    for ax in axs.flat[n:]:
        ax.set_axis_off()
    return fig, list(axs.flat[:n])


def _alpha_figure(steps, alpha: torch.Tensor, ops: list[str], warm) -> Figure:
    """``alpha``: (rows, groups, 3, K) logits; one row of panels per group (1: shared)."""
    rows, groups, _, k = alpha.shape
    w = alpha.softmax(-1)
    fig, axs = _grid(3 * groups, 3, 3.9, 2.6, sharey=True)
    fig.suptitle("softmax(alpha): the weight of each candidate op in each distillation step"
                 + (" (shared by all cells)" if groups == 1 else " of each cell"), fontsize=10)
    for g in range(groups):
        for s in range(3):
            ax = axs[3 * g + s]
            best = int(w[-1, g, s].argmax())
            for i, op in enumerate(ops):
                _line(ax, steps, w[:, g, s, i].tolist(), op, f"C{i % 10}",
                      width=2.6 if i == best else 1.2, zorder=3 if i == best else 2)
            ax.axhline(1 / k, color="#999999", linestyle="--", linewidth=0.8,
                       label=f"uniform 1/{k}")
            _mark_warmup(ax, warm)
            cell = f"cell {g + 1}, " if groups > 1 else ""
            _axes(ax, f"{cell}step {s + 1} -> {ops[best]}", "softmax(alpha)" if s == 0 else None,
                  steps, xlabel=g == groups - 1)
            _zoomed(ax)
    handles, labels = axs[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5),
               fontsize=8, frameon=False)
    return fig


def _beta_figure(steps, betas: list[torch.Tensor], warm) -> Figure:
    fig, axs = _grid(len(betas), 3, 3.9, 2.7, min_width=7.5)
    fig.suptitle("softmax(beta): the weight of each earlier cell Bj in the input of cell c\n"
                 "(the genotype takes the two strongest, drawn thicker)", fontsize=10)
    for ax, (c, b) in zip(axs, enumerate(betas, start=3)):
        w = b.softmax(-1)
        top = w[-1].topk(2).indices.tolist()
        for j in range(c - 1):
            _line(ax, steps, w[:, j].tolist(), f"B{j + 1}", f"C{j % 10}",
                  width=2.6 if j in top else 1.2)
        ax.axhline(1 / (c - 1), color="#999999", linestyle="--", linewidth=0.8,
                   label=f"uniform 1/{c - 1}")
        _mark_warmup(ax, warm)
        _axes(ax, f"input of cell {c} -> B{top[0] + 1}, B{top[1] + 1}", "softmax(beta)", steps)
        _zoomed(ax)
        ax.legend(fontsize=7, loc="best", ncols=2 if c > 5 else 1)
    return fig


def _curves_figure(steps, rows, warm) -> Figure | None:
    panels = []
    for title, cols in CURVES.items():
        series = [(label, [_maybe(r.get(c)) for r in rows]) for c, label in cols]
        series = [(lab, ys) for lab, ys in series if any(not math.isnan(y) for y in ys)]
        if series:
            panels.append((title, series))
    if not panels:
        return None
    fig = Figure(figsize=(8.5, 2.3 * len(panels) + 0.7), layout="constrained")
    axs = fig.subplots(len(panels), 1, squeeze=False, sharex=True)[:, 0]
    fig.suptitle("training curves (history.csv; times: the mean over the steps since the "
                 "previous row)", fontsize=10)
    for n, (ax, (title, series)) in enumerate(zip(axs, panels)):
        for i, (label, ys) in enumerate(series):
            _line(ax, steps, ys, label, f"C{i}",
                  drawstyle="steps-pre" if title.startswith("learning") else "default")
        _mark_warmup(ax, warm)
        ys = [y for _, s in series for y in s if not math.isnan(y)]
        if title in ("loss", "seconds per step") and min(ys) > 0 and max(ys) > 30 * min(ys):
            ax.set_yscale("log")
        _axes(ax, title, {"loss": "loss", "seconds per step": "s"}.get(title), steps,
              xlabel=n == len(panels) - 1)
        ax.legend(fontsize=7, loc="best")
    return fig


def _val_figure(val) -> Figure:
    fig, axs = _grid(2, 2, 4.4, 3.0)
    xs = [v[0] for v in val]
    best = max(val, key=lambda v: v[1])
    fig.suptitle(f"validation (Y channel, shave = scale): best {best[1]:.3f} dB / "
                 f"{best[2]:.4f} at step {best[0]}", fontsize=10)
    for ax, k, title, unit in ((axs[0], 1, "PSNR", "dB"), (axs[1], 2, "SSIM", None)):
        _line(ax, xs, [v[k] for v in val], title, "C0")
        ax.plot([best[0]], [best[k]], marker="*", markersize=13, color="C3", linestyle="none",
                label=f"best PSNR (step {best[0]})", zorder=4)
        _axes(ax, f"validation {title}", f"{title} ({unit})" if unit else title, xs)
        _zoomed(ax)
        ax.legend(fontsize=7, loc="lower right")
    return fig


def plot_genotype(genotype: Genotype, path, title: str | None = None, overwrite: bool = True,
                  root=None) -> Path:
    """``network.png``: the drawing of ``genotype`` (``hdnas.engine.drawing.draw_genotype``)."""
    return draw_genotype(genotype, path, title=title, overwrite=overwrite, root=root)


def load_genotype(source) -> Genotype:
    """A genotype file or a released name (BETA21, PARA_LOSS, TINY18); ``PlotError`` otherwise."""
    try:
        return Genotype.load(source)
    except ValueError as e:
        raise PlotError(str(e)) from None


def draw_source(source, out=None, overwrite: bool = False) -> list[Path]:
    """``python -m hdnas.visualize``: a run folder's pictures (``plot_run``), or the drawing of
    a genotype file or released name to ``out`` (default: the file's name with ``.png``, or
    ``<name>.png`` here; ``overwrite=False`` refuses an existing file)."""
    path = Path(source)
    if path.is_dir():
        if out is not None:
            raise PlotError(f"--out is for a genotype; the pictures of the run folder {path} "
                            "go into it")
        return plot_run(path)
    if not path.exists() and path.name.upper() not in NAMED:
        raise PlotError(f"{path}: no run folder, genotype file or released genotype "
                        f"({', '.join(NAMED)})")
    g = load_genotype(path)
    if out is None:
        out = path.with_suffix(".png") if path.exists() else Path(f"{path.name.lower()}.png")
    return [plot_genotype(g, out, overwrite=overwrite)]


# --------------------------------------------------------------------------- the run
def plot_run(run_dir) -> list[Path]:
    """Draw the pictures of the run folder ``run_dir`` into it (module docstring): alpha.png and
    beta.png for a search, val.png when the history has validation scores, curves.png when it
    has losses or times, network.png when the folder has a genotype.json. Returns their paths."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PlotError(f"run folder {run_dir} does not exist")
    res, ops, cells = _config(run_dir)
    hist = run_dir / "history.csv"
    try:
        rows = History(hist, []).read()
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PlotError(f"{hist}: cannot read the history ({type(e).__name__}: {e})") from None
    if not rows:
        raise PlotError(f"{run_dir} has no history yet")
    steps = [int(_num(r, "step", hist, i)) for i, r in enumerate(rows, start=2)]
    out = []
    warm = _warmup(res, min(steps), max(steps)) if ops is not None else None
    if ops is not None:
        akeys = [k for k in rows[0] if k and k.startswith("alpha_")]
        if len(akeys) not in (3 * len(ops), 3 * len(ops) * cells):  # shared, or per cell
            raise PlotError(f"{hist}: {len(akeys)} alpha columns do not fit {len(ops)} ops x 3 "
                            f"steps (x {cells} cells) (config.json and history.csv of different "
                            "runs?)")
        alpha = torch.tensor([[_num(r, k, hist, i) for k in akeys]
                              for i, r in enumerate(rows, start=2)], dtype=torch.float64)
        alpha = alpha.view(len(rows), -1, 3, len(ops))
        betas = [torch.tensor([[_num(r, f"beta{c}_{j}", hist, i) for j in range(c - 1)]
                               for i, r in enumerate(rows, start=2)], dtype=torch.float64)
                 for c in range(3, cells + 1)]
        out.append(_save(_alpha_figure(steps, alpha, ops, warm), run_dir / "alpha.png", run_dir))
        if betas:  # a 2-cell network has no searched cell inputs
            out.append(_save(_beta_figure(steps, betas, warm), run_dir / "beta.png", run_dir))
    val = [(st, float(r["val_psnr"]), float(r["val_ssim"])) for st, r in zip(steps, rows)
           if _finite(r.get("val_psnr")) and _finite(r.get("val_ssim"))]
    if val:
        out.append(_save(_val_figure(val), run_dir / "val.png", run_dir))
    fig = _curves_figure(steps, rows, warm)
    if fig is not None:
        out.append(_save(fig, run_dir / "curves.png", run_dir))
    if (run_dir / "genotype.json").is_file():
        g = load_genotype(run_dir / "genotype.json")
        out.append(plot_genotype(g, run_dir / "network.png", title=g.name or run_dir.name,
                                 root=run_dir))
    return out
