"""Export a derived network: safetensors + genotype, ONNX, and a ``torch.export`` program.

    python -m hdnas.export --genotype TINY18 --weights tiny.pt --out export/
    python -m hdnas.export --weights net.safetensors --out export/ --formats onnx --bench

Writes to ``--out`` (file stem ``--name``, default the genotype's name or ``model``)
``NAME.safetensors`` with ``NAME.genotype.json`` (every ``--weights`` option reads it),
``NAME.onnx`` (opset ``--opset``, at least 17; dynamic batch and LR size; needs the ``export``
extra: onnx, and onnxruntime for ``--check``/``--bench``) and ``NAME.pt2`` (dynamic batch and LR
sizes from 21 px). ``--check`` compares ONNX Runtime and the ``.pt2`` program with PyTorch on
random inputs; ``--bench`` times one 1280x720-output image with PyTorch eager and ONNX Runtime on
the CPU (minimum of ``--repeats`` runs after a warm-up) and prints the file sizes. The formats,
tolerances and checks: ``hdnas.io.export``.

Nothing is written outside ``--out``: a genotype name that is not a plain file name (``../x``)
is made one, ``--name`` must be one. Existing files are replaced only with ``--overwrite``, the
input files never. Bad input: ``error: ...`` and exit status 2 (``--debug``: the traceback).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from hdnas.cliargs import add_common, int_range, command
from hdnas.io.atomic import OutputDir
from hdnas.io.export import FORMATS, MAX_OPSET, MIN_OPSET, export
from hdnas.io.models import load_model
from hdnas.safeio import check_plain_name, plain_name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hdnas.export",
                                description="Export a derived network as safetensors, ONNX and "
                                            "a torch.export program.")
    p.add_argument("--genotype", help="genotype JSON or a named one; default: the one stored in "
                                      "a .safetensors --weights")
    p.add_argument("--weights", required=True)
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow the full unpickler for --weights (only for files you trust)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", help="file stem (default: the genotype's name, else 'model')")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    p.add_argument("--opset", type=int_range(MIN_OPSET, MAX_OPSET), default=MIN_OPSET,
                   help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default %(default)s)")
    p.add_argument("--check", action="store_true",
                   help="compare ONNX Runtime and the .pt2 program with PyTorch")
    p.add_argument("--bench", action="store_true",
                   help="CPU latency for a 1280x720 output: PyTorch vs ONNX Runtime")
    p.add_argument("--repeats", type=int_range(1, 1000), default=3)
    add_common(p, overwrite=True, threads=True)
    return p


def main(argv=None) -> int:
    return command(build_parser, _main, argv, torch.set_num_threads)


def _main(args) -> int:
    if args.name is not None:
        check_plain_name(args.name, "--name")
    model = load_model(args.genotype, args.weights, trust_pickle=args.trust_pickle)
    name = args.name or plain_name(model.genotype.name)
    if args.name is None and model.genotype.name and name != model.genotype.name:
        print(f"note: the genotype's name {model.genotype.name[:80]!r} is not a plain file name; "
              f"the files are named {name!r}", file=sys.stderr)
    out = OutputDir(args.out, args.overwrite, inputs=[args.weights, args.genotype])
    try:
        written, report = export(model, out, name, args.formats, args.opset, args.check,
                                 args.bench, args.repeats, args.threads)
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in written:
        print(f"wrote {p} ({p.stat().st_size / 1e6:.3f} MB)")
    print(json.dumps({k: v for k, v in report.items() if k != "genotype"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
