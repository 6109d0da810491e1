"""Score a derived network (or plain bicubic) on benchmark sets, as the published tables do.

    python -m hdnas.evaluate --genotype TINY18 --weights tiny.pt --data ../shared/data/Set5 \\
        ../shared/data/Set14 --scales 2 --out runs/eval/tiny18
    python -m hdnas.evaluate --bicubic --data ../shared/data/Set5 --scales 2 3 4

The protocol (Y channel, shave = scale, SR rounded to 8 bits; ``--bicubic``: bicubic upscaling)
is ``hdnas.eval.protocol``'s. Writes ``results.md``, ``results.csv`` and ``per_image.csv`` to
``--out`` (``--save-images``, ``--compare``: SR images, crop pictures), replacing existing files
only with ``--overwrite`` (checked before any image is scored) and the inputs never. ``--weights``
is read with torch's safe loader; ``--trust-pickle`` allows the full unpickler
(``hdnas.io.official``). Bad input: ``error: ...``, exit status 2 (``--debug``: the traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from tqdm import tqdm

from hdnas.cliargs import add_common, int_range, run
from hdnas.eval.protocol import TABLES, evaluate_sets, load_scored_model, table_note, write_tables
from hdnas.infer.run import BACKENDS
from hdnas.io.atomic import OutputDir
from hdnas.model.genotype import GenotypeError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hdnas.evaluate", description=(
        "PSNR/SSIM (Y channel, shave = scale), params and Multi-Adds (1280x720 output) of a "
        "derived network or of bicubic upscaling on benchmark sets."))
    add = p.add_argument
    add("--genotype", help="genotype JSON file or a named one (BETA21, PARA_LOSS, TINY18)")
    add("--weights", help="hdnas checkpoint ({'model': sd}), official DLSR .pt ({'state_dict': "
                          "sd}) or a bare state dict")
    add("--trust-pickle", action="store_true", help=(
        "read --weights with the full unpickler if the safe loader refuses it (e.g. a pickled "
        "nn.Module); this can run code stored in the file, so only for files you trust"))
    add("--bicubic", action="store_true", help="score bicubic upscaling, no model")
    add("--bicubic-protocol", choices=("matlab-y", "rgb"), default="matlab-y", help=(
        "matlab-y: Y channel down/up in double (the published Bicubic rows); rgb: upscale the "
        "set's 8-bit RGB LR images"))
    add("--data", nargs="+", required=True, metavar="DIR", help="benchmark folders")
    add("--scales", nargs="+", type=int_range(2, 4),
        help="default: the genotype's scale (bicubic: 2 3 4)")
    add("--make-lr", action="store_true",
        help="ignore shipped LR images; always make LR from HR with our resize")
    add("--self-ensemble", action="store_true", help="x8 geometric self-ensemble")
    add("--out", default="runs/eval", help="output folder (default %(default)s)")
    add("--save-images", action="store_true", help="save SR images under OUT/images")
    add("--compare", action="store_true",
        help="save bicubic / model / HR crop pictures under OUT/compare")
    add("--crop", nargs=3, type=int_range(0, 1 << 20), metavar=("Y", "X", "SIZE"),
        help="HR crop for --compare (default: a centred 96 px square)")
    add("--backend", choices=sorted(BACKENDS), default="auto", help=(
        "how the network runs, the same numbers up to rounding order: "
        + "; ".join(f"{k}: {v}" for k, v in BACKENDS.items()) + " (default %(default)s)"))
    add("--device", default="cpu")
    add("--threads", type=int_range(1, 4096), default=min(4, os.cpu_count() or 1))
    add("--quiet", action="store_true",
        help="no per-image lines (and no progress bar unless --progress)")
    add("--progress", action=argparse.BooleanOptionalAction, default=None, help=(
        "a progress bar per data set on stderr (default: when stderr is a terminal and not "
        "--quiet)"))
    add_common(p, overwrite=True)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run(lambda: _main(parser, args), args.debug)


def _main(parser, args) -> int:
    torch.set_num_threads(max(1, args.threads))
    log = (lambda m: None) if args.quiet else (lambda m: tqdm.write(m, file=sys.stderr))
    progress = (not args.quiet and sys.stderr.isatty()) if args.progress is None else args.progress
    model, method, cost = None, "Bicubic", {}
    if args.bicubic:
        if args.genotype or args.weights or args.trust_pickle:
            parser.error("--bicubic takes no --genotype/--weights/--trust-pickle")
        scales = args.scales or [2, 3, 4]
    elif not args.genotype or not args.weights:
        parser.error("give --genotype and --weights (or --bicubic)")
    else:
        try:
            model, method, cost, scales = load_scored_model(
                args.genotype, args.weights, args.scales, args.backend, args.device,
                args.trust_pickle, args.self_ensemble)
        except GenotypeError as e:
            parser.error(str(e))
    out = OutputDir(args.out, args.overwrite, inputs=[args.weights, args.genotype])
    out.claim_all(out.root / name for name in TABLES)
    t0 = time.time()
    rows, per_image = evaluate_sets(
        args.data, scales, model, method, cost, args.self_ensemble, args.device,
        args.bicubic_protocol, args.make_lr, out, args.save_images, args.compare,
        args.crop, log, progress)
    note = table_note(args.bicubic_protocol if args.bicubic else None)
    md_path, csv_path, md = write_tables(rows, out, per_image, note)
    print(md)
    print(f"wrote {md_path} and {csv_path} ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
