"""Score a derived network (or plain bicubic) on benchmark sets, as the published tables do.

    python -m hdnas.evaluate --genotype TINY18 --weights tiny.pt --data ../shared/data/Set5 \\
        ../shared/data/Set14 --scales 2 --out runs/eval/tiny18
    python -m hdnas.evaluate --bicubic --data ../shared/data/Set5 --scales 2 3 4

Protocol (docs/method.md §6): PSNR/SSIM on Y (BT.601, MATLAB ``rgb2ycbcr``), shave = scale,
SR output clamped and rounded to 8 bits, MATLAB-style SSIM; LR from the set's files or made by
the MATLAB-exact ``imresize``; HR cropped to a multiple of the scale. Grey images are replicated
to RGB for the model (EDSR's loader; the convention of the tiny checkpoint's reference scores).
Params and Multi-Adds are counted by hooks for a 1280x720 output (``hdnas.model.complexity``).

``--bicubic`` scores bicubic upscaling instead of a model. Its default protocol ``matlab-y``
is the one behind the published "Bicubic" rows: the Y channel of HR (``rgb2ycbcr`` on uint8, so
rounded; a grey image is its own Y) is downscaled and upscaled in double precision with no
intermediate rounding; this ignores shipped LR files. ``--bicubic-protocol rgb`` upscales the
set's 8-bit RGB LR images instead and scores them like a model output.

Decisions where the sources are silent (docs/method.md §8.10): rounding is
half away from zero (MATLAB), not torch's half to even; the Y of the bicubic protocol is rounded
to uint8 as ``rgb2ycbcr`` does on uint8 input (unrounded Y is within 0.006 dB); the mean PSNR of
a set is the mean of per-image PSNRs.

Writes ``results.md`` and ``results.csv`` (one row per method, scale and set) and
``per_image.csv`` to ``--out``; ``--save-images`` and ``--compare`` add SR images and
bicubic / model / HR crop pictures. A progress bar per set (one tick per image) goes to stderr
when it is a terminal (``--progress`` / ``--no-progress`` force it).

``--weights`` is read with torch's safe loader; a file it refuses (a pickled module, anything
naming other Python objects) stops with an error unless ``--trust-pickle`` allows the full
unpickler, which can run code stored in the file (``hdnas.io.official``).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hdnas.infer.run import BACKENDS, prepare_model, self_ensemble, super_resolve
from hdnas.model.complexity import count_params_and_macs, format_count
from hdnas.data.benchmark import MIN_LR_SIZE, BenchmarkError, BenchmarkSet
from hdnas.io.images import ImageError, save_rgb, to_hwc_uint8
from hdnas.model.genotype import Genotype, GenotypeError
from hdnas.data.imresize import imresize, matlab_round
from hdnas.eval.metrics import psnr, quantize, rgb_to_y, ssim
from hdnas.model.network import DerivedNet
from hdnas.io.official import WeightsError, load_weights

__all__ = ["main", "build_parser", "evaluate_set", "self_ensemble", "super_resolve", "prepare_model",
           "bicubic_matlab_y", "write_tables", "compare_picture"]


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


def compare_picture(path, panels: list[tuple[str, np.ndarray]], box, panel_px: int = 256) -> Path:
    """Side-by-side crops (HWC uint8 full images) with their labels, enlarged without smoothing."""
    from PIL import Image, ImageDraw

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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# --------------------------------------------------------------------------- scoring
def evaluate_set(bench: BenchmarkSet, model=None, method: str = "model", ensemble: bool = False,
                 device: str = "cpu", bicubic_protocol: str = "matlab-y", save_dir=None,
                 compare_dir=None, crop=None, log=None, progress: bool = False) -> dict:
    """Mean PSNR/SSIM of one set at one scale, with the per-image scores; ``progress`` shows a
    bar (one tick per image) on stderr."""
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
            p, q = psnr(sr, hr, s), ssim(sr, hr, s)
        per_image.append({"set": bench.name, "scale": s, "image": item["name"], "psnr": p,
                          "ssim": q, "lr_made": item["lr_made"]})
        if log:
            log(f"  {bench.name} x{s} {item['name']}: {p:.4f} dB / {q:.4f}")
        if sr is not None and save_dir is not None:
            save_rgb(Path(save_dir) / bench.name / f"x{s}" / f"{item['name']}.png", quantize(sr))
        if sr is not None and compare_dir is not None:
            bic = quantize(imresize(lr.to(torch.float64), s))
            box = _crop_box(*hr.shape[-2:], s, crop)
            panels = [(f"Bicubic {psnr(bic, hr, s):.2f} dB", to_hwc_uint8(bic))]
            if model is not None:
                panels.append((f"{method} {p:.2f} dB", to_hwc_uint8(quantize(sr))))
            panels.append(("HR", to_hwc_uint8(hr)))
            compare_picture(Path(compare_dir) / f"{bench.name}_x{s}_{item['name']}.png", panels, box)
    return {"set": bench.name, "scale": s, "images": len(per_image),
            "psnr": float(np.mean([r["psnr"] for r in per_image])),
            "ssim": float(np.mean([r["ssim"] for r in per_image])), "per_image": per_image}


# --------------------------------------------------------------------------- tables
COLUMNS = ["method", "scale", "set", "images", "psnr", "ssim", "params", "multi_adds"]


def write_tables(rows: list[dict], out_dir, per_image: list[dict] | None = None,
                 note: str = "") -> tuple[Path, Path, str]:
    """results.csv (long: one row per method/scale/set) and results.md (wide: sets as columns).
    Returns the two paths and the Markdown text."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "results.csv", out / "results.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.4f}" if k == "psnr" else f"{r[k]:.5f}" if k == "ssim"
                            else r[k]) for k in COLUMNS})
    if per_image:
        with open(out / "per_image.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["set", "scale", "image", "psnr", "ssim", "lr_made"])
            w.writeheader()
            w.writerows(per_image)
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
    md_path.write_text(md)
    return md_path, csv_path, md


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hdnas.evaluate",
        description="PSNR/SSIM (Y channel, shave = scale), params and Multi-Adds (1280x720 "
                    "output) of a derived network or of bicubic upscaling on benchmark sets.")
    p.add_argument("--genotype", help="genotype JSON file or a named one (BETA21, PARA_LOSS, TINY18)")
    p.add_argument("--weights", help="hdnas checkpoint ({'model': sd}), official DLSR .pt "
                                     "({'state_dict': sd}) or a bare state dict")
    p.add_argument("--trust-pickle", action="store_true",
                   help="read --weights with the full unpickler if the safe loader refuses it "
                        "(e.g. a pickled nn.Module); this can run code stored in the file, so "
                        "only for files you trust")
    p.add_argument("--bicubic", action="store_true", help="score bicubic upscaling, no model")
    p.add_argument("--bicubic-protocol", choices=("matlab-y", "rgb"), default="matlab-y",
                   help="matlab-y: Y channel down/up in double (the published Bicubic rows); "
                        "rgb: upscale the set's 8-bit RGB LR images")
    p.add_argument("--data", nargs="+", required=True, metavar="DIR", help="benchmark folders")
    p.add_argument("--scales", nargs="+", type=int, help="default: the genotype's scale "
                                                          "(bicubic: 2 3 4)")
    p.add_argument("--make-lr", action="store_true",
                   help="ignore shipped LR images; always make LR from HR with our resize")
    p.add_argument("--self-ensemble", action="store_true", help="x8 geometric self-ensemble")
    p.add_argument("--out", default="runs/eval", help="output folder (default %(default)s)")
    p.add_argument("--save-images", action="store_true", help="save SR images under OUT/images")
    p.add_argument("--compare", action="store_true",
                   help="save bicubic / model / HR crop pictures under OUT/compare")
    p.add_argument("--crop", nargs=3, type=int, metavar=("Y", "X", "SIZE"),
                   help="HR crop for --compare (default: a centred 96 px square)")
    p.add_argument("--backend", choices=sorted(BACKENDS), default="auto",
                   help="how the network runs, the same numbers up to rounding order: "
                        + "; ".join(f"{k}: {v}" for k, v in BACKENDS.items())
                        + " (default %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--quiet", action="store_true", help="no per-image lines (and no progress "
                                                         "bar unless --progress)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar per data set on stderr (default: when stderr is a "
                        "terminal and not --quiet)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    log = (lambda m: None) if args.quiet else (lambda m: tqdm.write(m, file=sys.stderr))
    progress = args.progress if args.progress is not None else \
        (not args.quiet and sys.stderr.isatty())

    model, method, cost = None, "Bicubic", {}
    if args.bicubic:
        if args.genotype or args.weights or args.trust_pickle:
            parser.error("--bicubic takes no --genotype/--weights/--trust-pickle")
        scales = args.scales or [2, 3, 4]
    else:
        if not args.genotype or not args.weights:
            parser.error("give --genotype and --weights (or --bicubic)")
        try:
            genotype = Genotype.load(args.genotype)
        except GenotypeError as e:
            parser.error(str(e))
        scales = args.scales or [genotype.scale]
        if any(s != genotype.scale for s in scales):
            parser.error(f"the genotype is for x{genotype.scale}; a model scores one scale "
                         f"(asked for {scales})")
        try:
            model = prepare_model(load_weights(DerivedNet(genotype), args.weights,
                                               trust_pickle=args.trust_pickle),
                                  args.backend, args.device)
        except (WeightsError, ValueError) as e:  # ValueError: a backend the device lacks
            print(f"error: {e}", file=sys.stderr)
            return 2
        method = genotype.name or Path(args.genotype).stem
        params, macs = count_params_and_macs(model, genotype.scale)
        cost = {"params": params, "macs": macs}
        if args.self_ensemble:
            method += " (x8)"
    for s in scales:
        if s < 1:
            parser.error(f"bad scale {s}")

    out = Path(args.out)
    rows, per_image = [], []
    t0 = time.time()
    try:
        for s in scales:
            for folder in args.data:
                gray = "keep" if args.bicubic and args.bicubic_protocol == "matlab-y" \
                    else "replicate"
                # a model needs LR >= 15 px (ESA); bicubic only needs room for shave + SSIM window
                min_lr = MIN_LR_SIZE if model is not None else -(-(11 + 2 * s) // s)
                bench = BenchmarkSet(folder, s, gray=gray, min_lr_size=min_lr,
                                     make_lr=args.make_lr)
                res = evaluate_set(bench, model, method, args.self_ensemble, args.device,
                                   args.bicubic_protocol,
                                   out / "images" if args.save_images else None,
                                   out / "compare" if args.compare else None, args.crop, log,
                                   progress)
                per_image += res.pop("per_image")
                rows.append({"method": method, **res, "params": cost.get("params", 0),
                             "multi_adds": cost.get("macs", 0)})
    except (BenchmarkError, ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # --backend native where the native kernels cannot serve
        if "depthwise mode" not in str(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    note = ("PSNR/SSIM on Y (BT.601), shave = scale, SR rounded to 8 bits, MATLAB-style SSIM. "
            "Multi-Adds: conv MACs for a 1280x720 output.")
    if args.bicubic:
        note += f" Bicubic protocol: {args.bicubic_protocol}."
    md_path, csv_path, md = write_tables(rows, out, per_image, note)
    print(md)
    print(f"wrote {md_path} and {csv_path} ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
