"""Exporting a derived network: safetensors + genotype, ONNX and a ``torch.export`` program,
each checked against PyTorch on request, and a CPU latency comparison.

* ``export_safetensors``: ``NAME.safetensors``, the weights with the genotype JSON in the header
  metadata (``hdnas.io.weights``), and ``NAME.genotype.json`` beside it.
* ``export_onnx``: opset ``MIN_OPSET`` (17) or later, input ``lr`` (N, 3, H, W) float32 in 0..255,
  output ``sr`` (N, 3, sH, sW); batch, height and width are dynamic (LR >= 15 px, as for the
  network itself). Made with torch's TorchScript-based exporter (``dynamo=False``: the dynamo
  exporter needs the extra package onnxscript). Needs the ``export`` extra (onnx; onnxruntime
  for ``check_onnx`` / ``bench``).
* ``export_pt2``: a ``torch.export`` program (``torch.export.load(p).module()(x)``) with dynamic
  batch and LR sizes from ``PT2_MIN_LR`` = 21 px up (below that ESA's pooled map has one row,
  which torch.export specialises on).

``check_onnx`` / ``check_pt2`` compare ONNX Runtime (CPU) and the ``.pt2`` program with PyTorch
on random inputs of two sizes and batches (max abs difference on the 0..255 scale must be <=
``CHECK_TOLERANCE``). ``bench`` times one 1280x720-output image with PyTorch eager and ONNX
Runtime on the CPU (minimum of ``repeats`` runs after a warm-up). ``export`` makes the asked
formats and checks in one call.

Files: every file goes through the command's ``OutputDir`` (``hdnas.io.atomic``): ``NAME`` is a
plain file name (a genotype name from a file, such as ``../../x``, is made one by
``hdnas.safeio.plain_name``; ``--name`` must be one), no file is replaced without
``overwrite``, an input (the weights, the genotype file) never, and all targets are checked
before the first is written. A non-finite difference (NaN or infinite outputs) is a mismatch.

Why here, in the file layer: an export is a set of files in other formats, written next to the
safetensors weights (``hdnas.io.weights``) that every ``--weights`` reads.
"""
from __future__ import annotations

import io
import math
import platform
import time
import warnings
from pathlib import Path

import torch

from hdnas.io import weights as weights_io
from hdnas.io.atomic import OutputDir
from hdnas.model.complexity import lr_size_for
from hdnas.model.network import DerivedNet

__all__ = ["FORMATS", "MIN_OPSET", "MAX_OPSET", "PT2_MIN_LR", "CHECK_TOLERANCE", "ExportError",
           "export_safetensors", "export_onnx", "export_pt2", "check_onnx", "check_pt2", "bench",
           "export"]

FORMATS = ("safetensors", "onnx", "pt2")
MIN_OPSET = 17
#: the newest opset torch's TorchScript-based exporter writes
MAX_OPSET = getattr(getattr(torch.onnx, "_constants", None), "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET",
                    20)
SUFFIXES = {"safetensors": (".safetensors", ".genotype.json"), "onnx": (".onnx",), "pt2": (".pt2",)}
PT2_MIN_LR = 21
CHECK_TOLERANCE = 2e-2  # 0..255 scale: float32 reassociation across runtimes (measured ~1e-4)


class ExportError(ValueError):
    """An export that cannot be made or that does not match PyTorch."""


def _outdir(out) -> OutputDir:
    return out if isinstance(out, OutputDir) else OutputDir(out, overwrite=True)


def export_safetensors(model: DerivedNet, out, name: str) -> list[Path]:
    out = _outdir(out)
    st = weights_io.save_weights(model, model.genotype, out.path(f"{name}.safetensors"), out)
    js = out.write(out.path(f"{name}.genotype.json"), model.genotype.to_json())
    return [st, js]


def _example(model: DerivedNet, batch: int = 2, size=(32, 36)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, *size, generator=g) * 255


def check_opset(opset: int) -> int:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"--opset {opset}: use {MIN_OPSET} to {MAX_OPSET} (the opsets this "
                          "torch exports)")
    return opset


def export_onnx(model: DerivedNet, path: Path, opset: int = MIN_OPSET,
                out: OutputDir | None = None) -> Path:
    check_opset(opset)
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'hdnas[export]'") \
            from None
    model = model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        # the input-size checks in forward are Python ifs: the tracer warns that they are constant
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        buf = io.BytesIO()
        torch.onnx.export(model, (_example(model),), buf, dynamo=False, opset_version=opset,
                          input_names=["lr"], output_names=["sr"],
                          dynamic_axes={"lr": {0: "batch", 2: "height", 3: "width"},
                                        "sr": {0: "batch", 2: "out_height", 3: "out_width"}})
    onnx.checker.check_model(onnx.load_from_string(buf.getvalue()))
    return _outdir(out if out is not None else Path(path).parent).write(path, buf.getvalue())


def export_pt2(model: DerivedNet, path: Path, out: OutputDir | None = None) -> Path:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1024)
    h, w = (Dim(n, min=PT2_MIN_LR, max=16384) for n in ("height", "width"))
    with torch.no_grad():
        program = torch.export.export(model.eval(), (_example(model),),
                                      dynamic_shapes={"x": {0: batch, 2: h, 3: w}})
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return _outdir(out if out is not None else Path(path).parent).write(path, buf.getvalue())


def _check_sizes():
    return [(1, (PT2_MIN_LR, 40)), (3, (47, 29))]


def _worse(worst: float, got: torch.Tensor, ref: torch.Tensor) -> float:
    """The larger of ``worst`` and max |got - ref|; NaN if either side is not finite (then no
    tolerance passes it: ``max(0.0, nan)`` would be 0.0)."""
    if math.isnan(worst) or not (torch.isfinite(got).all() and torch.isfinite(ref).all()):
        return math.nan
    d = float((got - ref).abs().max()) if got.numel() else 0.0
    return d if not d <= worst else worst


def check_onnx(model: DerivedNet, path: Path, inputs=None) -> float:
    """Max abs difference ONNX Runtime (CPU) vs PyTorch over ``inputs`` (default: random batches
    of two sizes); ExportError above CHECK_TOLERANCE."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = inputs if inputs is not None else \
        [_example(model, b, size) for b, size in _check_sizes()]
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            got = torch.from_numpy(sess.run(None, {"lr": x.numpy()})[0])
            ref = model(x)
            if got.shape != ref.shape:
                raise ExportError(f"{path}: output {tuple(got.shape)} for input {tuple(x.shape)}, "
                                  f"PyTorch gives {tuple(ref.shape)}")
            worst = _worse(worst, got, ref)
    if not worst <= CHECK_TOLERANCE:
        raise ExportError(f"{path}: ONNX Runtime differs from PyTorch by {worst:.3g} "
                          f"(> {CHECK_TOLERANCE})" + _nan_note(worst))
    return worst


def check_pt2(model: DerivedNet, path: Path, inputs=None) -> float:
    program = torch.export.load(str(path)).module()
    inputs = inputs if inputs is not None else \
        [_example(model, b, size) for b, size in _check_sizes()]
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            worst = _worse(worst, program(x), model(x))
    if not worst <= CHECK_TOLERANCE:
        raise ExportError(f"{path}: the exported program differs from PyTorch by {worst:.3g}"
                          + _nan_note(worst))
    return worst


def _nan_note(worst: float) -> str:
    return "; the outputs are not finite (NaN or infinity)" if math.isnan(worst) else ""


def _min_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, ONNX Runtime's first-run graph work)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(model: DerivedNet, onnx_path: Path | None, repeats: int = 3, threads: int = 0) -> dict:
    """Seconds (minimum of ``repeats``) for one image with a 1280x720 output on the CPU."""
    h, w = lr_size_for(model.scale)
    x = torch.rand(1, 3, h, w) * 255
    res = {"lr_size": f"{w}x{h}", "threads": threads or torch.get_num_threads()}
    with torch.no_grad():
        res["pytorch_s"] = _min_time(lambda: model(x), repeats)
    if onnx_path is not None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        res["onnxruntime_s"] = _min_time(lambda: sess.run(None, {"lr": x.numpy()}), repeats)
        res["onnxruntime_version"] = ort.__version__
    return res


def export(model: DerivedNet, out, name: str, formats=FORMATS, opset: int = MIN_OPSET,
           check: bool = False, bench_cpu: bool = False, repeats: int = 3,
           threads: int = 0) -> tuple[list[Path], dict]:
    """Write ``formats`` of ``model`` to ``out`` (an ``OutputDir``, or a folder: then existing
    files are replaced) as ``name``.*, checked against PyTorch if ``check`` and timed on the CPU
    if ``bench_cpu``. Every target is claimed before the first file is written. Returns the files
    and a report (genotype, versions, check differences, bench timings, file sizes).
    ExportError, UnsafeWriteError, or ImportError for a missing optional package."""
    out = _outdir(out)
    if "onnx" in formats:
        check_opset(opset)
    if repeats < 1:
        raise ExportError(f"--repeats {repeats}: at least 1")
    out.claim_all(out.path(name + suf) for f in formats for suf in SUFFIXES[f])
    written, report = [], {"genotype": model.genotype.to_dict(), "torch": torch.__version__,
                           "python": platform.python_version()}
    if "safetensors" in formats:
        written += export_safetensors(model, out, name)
    onnx_path = None
    if "onnx" in formats:
        onnx_path = export_onnx(model, out.path(f"{name}.onnx"), opset, out)
        written.append(onnx_path)
        if check:
            report["onnx_max_abs_diff"] = check_onnx(model, onnx_path)
    if "pt2" in formats:
        pt2 = export_pt2(model, out.path(f"{name}.pt2"), out)
        written.append(pt2)
        if check:
            report["pt2_max_abs_diff"] = check_pt2(model, pt2)
    if bench_cpu:
        report["bench"] = bench(model, onnx_path, repeats, threads)
    report["files"] = {str(p): p.stat().st_size for p in written}
    return written, report
