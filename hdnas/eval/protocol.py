"""The benchmark protocol of the published tables: PSNR/SSIM of a derived network (or of plain
bicubic) on benchmark sets, and the tables of results.

Protocol (docs/method.md §6): PSNR/SSIM on Y (BT.601, MATLAB ``rgb2ycbcr``), shave = scale,
SR output clamped and rounded to 8 bits, MATLAB-style SSIM; LR from the set's files or made by
the MATLAB-exact ``imresize``; HR cropped to a multiple of the scale. Grey images are replicated
to RGB for the model (EDSR's loader; the convention of the tiny checkpoint's reference scores).
Params and Multi-Adds are counted by hooks for a 1280x720 output (``hdnas.model.complexity``).

Bicubic (no model): the protocol ``matlab-y`` is the one behind the published "Bicubic" rows:
the Y channel of HR (``rgb2ycbcr`` on uint8, so rounded; a grey image is its own Y) is
downscaled and upscaled in double precision with no intermediate rounding (``bicubic_matlab_y``);
this ignores shipped LR files. The protocol ``rgb`` upscales the set's 8-bit RGB LR images
instead and scores them like a model output.

Decisions where the sources are silent (docs/method.md §8.10): rounding is
half away from zero (MATLAB), not torch's half to even; the Y of the bicubic protocol is rounded
to uint8 as ``rgb2ycbcr`` does on uint8 input (unrounded Y is within 0.006 dB); the mean PSNR of
a set is the mean of per-image PSNRs.

``evaluate_set`` scores one set at one scale (optionally saving SR images and bicubic / model /
HR crop pictures, ``compare_picture``), ``evaluate_sets`` every folder at every scale, and
``write_tables`` writes ``results.md``, ``results.csv`` (one row per method, scale and set) and
``per_image.csv``.

Files: everything goes through an ``OutputDir`` (``hdnas.io.atomic``): the set's images are its
inputs (never replaced), and every output path (tables, SR images, pictures) is claimed before
the first image is scored, so an existing file stops the run at once unless ``overwrite``.
"""
from __future__ import annotations

import csv
import io
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from hdnas.data.benchmark import BenchmarkError, BenchmarkSet
from hdnas.data.imresize import imresize, matlab_round
from hdnas.eval.metrics import psnr, quantize, rgb_to_y, ssim
from hdnas.infer.run import prepare_model, super_resolve
from hdnas.io.atomic import OutputDir, UnsafeWriteError, write_file
from hdnas.io.images import save_rgb, to_hwc_uint8
from hdnas.io.official import build_net, load_weights
from hdnas.model.cell import MIN_LR_SIZE
from hdnas.model.complexity import count_params_and_macs, format_count
from hdnas.model.genotype import Genotype, GenotypeError

__all__ = ["bicubic_matlab_y", "compare_picture", "evaluate_set", "evaluate_sets",
           "load_scored_model", "COLUMNS", "TABLES", "write_tables", "table_note"]


def bicubic_matlab_y(hr: torch.Tensor, scale: int) -> tuple[float, float]:
    """(PSNR, SSIM) of the published bicubic protocol on one modcropped uint8 HR (C, H, W)."""
    y = matlab_round(rgb_to_y(hr)) if hr.shape[0] == 3 else hr[0].to(torch.float64)
    up = imresize(imresize(y, 1 / scale), scale)
    return psnr(up, y, scale), ssim(up, y, scale)


# --------------------------------------------------------------------------- pictures
def _crop_box(H: int, W: int, scale: int, crop) -> tuple[int, int, int]:
    if crop:
        y, x, size = crop
    else:
        size = min(96, H, W)
        y, x = (H - size) // 2, (W - size) // 2
    size = max(scale, size - size % scale)
    y, x = max(0, min(y, H - size)), max(0, min(x, W - size))
    return y, x, size


def compare_picture(path, panels: list[tuple[str, np.ndarray]], box, panel_px: int = 256,
                    out: OutputDir | None = None) -> Path:
    """Side-by-side crops (HWC uint8 full images) with their labels, enlarged without smoothing."""
    y, x, size = box
    zoom = max(1, panel_px // size)
    side, pad, head = size * zoom, 8, 18
    canvas = Image.new("RGB", (len(panels) * (side + pad) + pad, side + head + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, img) in enumerate(panels):
        crop = img[y:y + size, x:x + size]
        tile = Image.fromarray(crop).convert("RGB").resize((side, side), Image.NEAREST)
        left = pad + i * (side + pad)
        canvas.paste(tile, (left, head))
        draw.text((left, 3), label, fill="black")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return write_file(Path(path), buf.getvalue(), out)


def _image_path(save_dir, bench: BenchmarkSet, name: str) -> Path:
    return Path(save_dir) / bench.name / f"x{bench.scale}" / f"{name}.png"


def _compare_path(compare_dir, bench: BenchmarkSet, name: str) -> Path:
    return Path(compare_dir) / f"{bench.name}_x{bench.scale}_{name}.png"


# --------------------------------------------------------------------------- scoring
def evaluate_set(bench: BenchmarkSet, model=None, method: str = "model", ensemble: bool = False,
                 device: str = "cpu", bicubic_protocol: str = "matlab-y", save_dir=None,
                 compare_dir=None, crop=None, log=None, progress: bool = False,
                 out: OutputDir | None = None) -> dict:
    """Mean PSNR/SSIM of one set at one scale, with the per-image scores; ``progress`` shows a
    bar (one tick per image) on stderr; images are written through ``out`` when given."""
    s = bench.scale
    per_image = []
    for item in tqdm(bench, total=len(bench), desc=f"{bench.name} x{s}", unit="img",
                     disable=not progress, file=sys.stderr):
        hr, lr = item["hr"], item["lr"]
        if model is None and bicubic_protocol == "matlab-y":
            p, q = bicubic_matlab_y(hr, s)
            sr = None
        else:
            if model is None:
                sr = imresize(lr.to(torch.float64), s)
            else:
                if lr.shape[0] != 3:
                    raise BenchmarkError(f"{item['hr_path']}: the model needs RGB input")
                sr = super_resolve(model, lr, ensemble, device)
                if not torch.isfinite(sr).all():
                    raise BenchmarkError(f"{item['hr_path']}: the network's output is not finite "
                                         "(NaN or infinity); no score is reported")
            p, q = psnr(sr, hr, s), ssim(sr, hr, s)
        per_image.append({"set": bench.name, "scale": s, "image": item["name"], "psnr": p,
                          "ssim": q, "lr_made": item["lr_made"]})
        if log:
            log(f"  {bench.name} x{s} {item['name']}: {p:.4f} dB / {q:.4f}")
        if sr is not None and save_dir is not None:
            save_rgb(_image_path(save_dir, bench, item["name"]), quantize(sr), out)
        if sr is not None and compare_dir is not None:
            bic = quantize(imresize(lr.to(torch.float64), s))
            box = _crop_box(*hr.shape[-2:], s, crop)
            panels = [(f"Bicubic {psnr(bic, hr, s):.2f} dB", to_hwc_uint8(bic))]
            if model is not None:
                panels.append((f"{method} {p:.2f} dB", to_hwc_uint8(quantize(sr))))
            panels.append(("HR", to_hwc_uint8(hr)))
            compare_picture(_compare_path(compare_dir, bench, item["name"]), panels, box, out=out)
    return {"set": bench.name, "scale": s, "images": len(per_image),
            "psnr": float(np.mean([r["psnr"] for r in per_image])),
            "ssim": float(np.mean([r["ssim"] for r in per_image])), "per_image": per_image}


def evaluate_sets(folders, scales, model=None, method: str = "Bicubic", cost: dict | None = None,
                  ensemble: bool = False, device: str = "cpu", bicubic_protocol: str = "matlab-y",
                  make_lr: bool = False, out=None, save_images: bool = False,
                  compare: bool = False, crop=None, log=None,
                  progress: bool = False) -> tuple[list[dict], list[dict]]:
    """``evaluate_set`` for every folder at every scale: (rows for ``write_tables``, per-image
    scores). ``cost``: the model's ``params`` and ``macs``; ``save_images`` / ``compare`` write
    under ``out``/images and ``out``/compare (``out``: an ``OutputDir``, or a folder whose files
    are then replaced), every path claimed before the first image is scored."""
    cost = cost or {}
    if out is not None and not isinstance(out, OutputDir):
        out = OutputDir(out, overwrite=True)
    benches = []
    for s in scales:
        for folder in folders:
            gray = "keep" if model is None and bicubic_protocol == "matlab-y" else "replicate"
            # a model needs LR >= MIN_LR_SIZE px (ESA); bicubic only room for shave + SSIM window
            min_lr = MIN_LR_SIZE if model is not None else -(-(11 + 2 * s) // s)
            benches.append(BenchmarkSet(folder, s, gray=gray, min_lr_size=min_lr,
                                        make_lr=make_lr))
    images = out is not None and (model is not None or bicubic_protocol != "matlab-y")
    save_dir = out.root / "images" if images and save_images else None
    compare_dir = out.root / "compare" if images and compare else None
    if out is not None:
        _claim_images(out, benches, save_dir, compare_dir)
    rows, per_image = [], []
    for bench in benches:
        res = evaluate_set(bench, model, method, ensemble, device, bicubic_protocol,
                           save_dir, compare_dir, crop, log, progress, out)
        per_image += res.pop("per_image")
        rows.append({"method": method, **res, "params": cost.get("params", 0),
                     "multi_adds": cost.get("macs", 0)})
    return rows, per_image


def _claim_images(out: OutputDir, benches, save_dir, compare_dir) -> None:
    """The sets' files are inputs; every image path is free, once, before any work."""
    targets = []
    for bench in benches:
        out.add_inputs(f for p in bench.pairs for f in (p.hr_path, p.lr_path))
        for p in bench.pairs:
            if save_dir is not None:
                targets.append(_image_path(save_dir, bench, p.name))
            if compare_dir is not None:
                targets.append(_compare_path(compare_dir, bench, p.name))
    dup = sorted(str(t) for t, n in Counter(targets).items() if n > 1)
    if dup:
        raise UnsafeWriteError(f"two sets or images would write the same file {dup[0]} (sets "
                               "with the same folder name?); evaluate them separately")
    out.claim_all(targets)


def load_scored_model(genotype, weights, scales=None, backend: str = "auto", device: str = "cpu",
                      trust_pickle: bool = False,
                      ensemble: bool = False) -> tuple[torch.nn.Module, str, dict, list[int]]:
    """The network of ``genotype`` (a name or a JSON file) with ``weights``, set up for
    ``backend`` on ``device``, as (model, method name for the tables, cost ``{"params", "macs"}``,
    scales: ``scales`` or the genotype's). GenotypeError for a bad genotype or scales other than
    the genotype's (checked before the weights are read), WeightsError for weights that do not
    fit, ValueError for a backend the device lacks."""
    g = Genotype.load(genotype)
    scales = scales or [g.scale]
    if any(s != g.scale for s in scales):
        raise GenotypeError(f"the genotype is for x{g.scale}; a model scores one scale "
                            f"(asked for {scales})")
    model = prepare_model(load_weights(build_net(g, str(genotype)), weights,
                                       trust_pickle=trust_pickle), backend, device)
    method = (g.name or Path(genotype).stem) + (" (x8)" if ensemble else "")
    params, macs = count_params_and_macs(model, g.scale)
    return model, method, {"params": params, "macs": macs}, scales


# --------------------------------------------------------------------------- tables
COLUMNS = ["method", "scale", "set", "images", "psnr", "ssim", "params", "multi_adds"]


#: the table files ``write_tables`` writes, in ``out``
TABLES = ("results.csv", "results.md", "per_image.csv")


def _csv(fieldnames, rows) -> str:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fieldnames)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_tables(rows: list[dict], out_dir, per_image: list[dict] | None = None,
                 note: str = "") -> tuple[Path, Path, str]:
    """results.csv (long: one row per method/scale/set) and results.md (wide: sets as columns)
    in ``out_dir`` (an ``OutputDir``, or a folder whose files are then replaced). Returns the two
    paths and the Markdown text."""
    out = out_dir if isinstance(out_dir, OutputDir) else OutputDir(out_dir, overwrite=True)
    csv_path, md_path = out.root / "results.csv", out.root / "results.md"
    out.write(csv_path, _csv(COLUMNS, [
        {k: (f"{r[k]:.4f}" if k == "psnr" else f"{r[k]:.5f}" if k == "ssim" else r[k])
         for k in COLUMNS} for r in rows]))
    if per_image:
        out.write(out.root / "per_image.csv",
                  _csv(["set", "scale", "image", "psnr", "ssim", "lr_made"], per_image))
    sets = list(dict.fromkeys(r["set"] for r in rows))
    groups = list(dict.fromkeys((r["method"], r["scale"]) for r in rows))
    lines = ["| Method | Scale | Params | Multi-Adds | " + " | ".join(sets) + " |",
             "|---|---|---|---|" + "---|" * len(sets)]
    for method, scale in groups:
        mine = {r["set"]: r for r in rows if (r["method"], r["scale"]) == (method, scale)}
        any_r = next(iter(mine.values()))
        params = f"{any_r['params']:,}" if any_r["params"] else "-"
        macs = format_count(any_r["multi_adds"]) if any_r["multi_adds"] else "-"
        cells = [f"{mine[s]['psnr']:.2f}/{mine[s]['ssim']:.4f}" if s in mine else "" for s in sets]
        lines.append(f"| {method} | x{scale} | {params} | {macs} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    if note:
        md += "\n" + note.strip() + "\n"
    out.write(md_path, md)
    return md_path, csv_path, md


def table_note(bicubic_protocol: str | None = None) -> str:
    """The protocol line under the tables (with the bicubic protocol when scoring bicubic)."""
    note = ("PSNR/SSIM on Y (BT.601), shave = scale, SR rounded to 8 bits, MATLAB-style SSIM. "
            "Multi-Adds: conv MACs for a 1280x720 output.")
    if bicubic_protocol:
        note += f" Bicubic protocol: {bicubic_protocol}."
    return note
