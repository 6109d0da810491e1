"""Super-resolve your own images with a derived network.

    python -m hdnas.upscale --genotype TINY18 --weights tiny.safetensors photo.jpg scans/ --out sr/
    python -m hdnas.upscale --weights net.safetensors big.png --out sr/ --tile 768   # genotype from the file

Inputs are image files or folders (their PNG/JPEG/BMP/TIFF/WebP files, not recursive). Each
result is written losslessly as ``OUT/<name>.png``: RGB as is; grey replicated to RGB for the
network and written back grey; alpha upscaled bicubically and kept; 16-bit PNG kept 16-bit
(``hdnas.io.images.read_image``, ``hdnas.io.upscale_files``).

The network runs on the whole image, or with ``--tile T`` on LR tiles of at most T x T pixels
with ``--tile-overlap`` pixels of context on each inner side; with an overlap of at least the
receptive radius (the default) tiled equals untiled up to float reassociation
(``hdnas.infer.tiling``; docs/deploy.md). On a CPU it runs fused unless ``--no-fused``
(``hdnas.infer.run.inference_runner``).

Errors about one image (unreadable, too small, output name taken) are reported and the other
files are still processed; the exit status is then 1. Errors about the setup (genotype, weights
that do not fit it, ``--scale`` different from the weights', a tile too small for its overlap,
``--out`` an input folder, outputs that exist without ``--overwrite``) stop before any image,
with status 2 (``--debug``: the traceback). Nothing is written outside ``--out``; an input is
never replaced.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from hdnas.cliargs import add_common, int_range, command
from hdnas.infer.run import pick_device
from hdnas.infer.tiling import check_tile_sizes, tile_overlap
from hdnas.io.atomic import OutputDir
from hdnas.io.images import collect_inputs
from hdnas.io.models import load_model
from hdnas.io.upscale_files import check_outputs, upscale_files


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hdnas.upscale",
        description="Super-resolve image files or folders with a derived network; writes "
                    "OUT/<name>.png (grey stays grey, alpha is upscaled bicubically, 16-bit "
                    "PNG stays 16-bit).")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--genotype", help="genotype JSON or a named network (BETA21, PARA_LOSS, "
                                      "TINY18); default: the one stored in a .safetensors --weights")
    p.add_argument("--weights", required=True, help="safetensors, hdnas checkpoint or official "
                                                    "DLSR .pt")
    p.add_argument("--trust-pickle", action="store_true",
                   help="read --weights with the full unpickler if the safe loader refuses it "
                        "(can run code stored in the file: only for files you trust)")
    p.add_argument("--scale", type=int_range(2, 4),
                   help="check that the network upscales by this factor")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if "
                                                    "available)")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off",
                   help="run the network under torch.autocast in this precision")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="on a CPU, run the convolutions through oneDNN with fused activations "
                        "and residuals (hdnas.infer.fused; the same numbers up to summation order; "
                        "default on)")
    p.add_argument("--tile", type=int_range(0), default=0,
                   help="LR tile size in pixels (0: whole image)")
    p.add_argument("--tile-overlap", type=int_range(0), default=None,
                   help="LR context pixels on each inner side of a tile (default: the receptive "
                        "radius, which makes tiling exact)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: when stderr is a terminal)")
    add_common(p, overwrite=True, threads=True)
    return p


def main(argv=None) -> int:
    return command(build_parser, _main, argv, torch.set_num_threads)


def _main(args) -> int:
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    device = pick_device(args.device)
    check_tile_sizes(args.tile, args.tile_overlap)
    model = load_model(args.genotype, args.weights, args.scale, args.trust_pickle).to(device)
    overlap = tile_overlap(model.genotype, args.tile, args.tile_overlap)
    files, errors = collect_inputs(args.inputs)
    out = OutputDir(args.out, args.overwrite, inputs=[args.weights, args.genotype])
    check_outputs(args.inputs, files, out)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    failed = len(errors) + upscale_files(model, files, out, device, args.tile, overlap,
                                         args.amp, progress, args.fused)
    print(f"wrote {len(files) + len(errors) - failed} image(s) to {Path(args.out)}"
          + (f"; {failed} input(s) failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
