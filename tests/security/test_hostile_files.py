"""Hostile inputs to the file commands (export, upscale, evaluate, latency, visualize, the data
cache): each case runs the command's ``main([...])`` in process on tiny files and checks the exit
status, the message, and that nothing outside the output folder changed (a snapshot of the whole
temporary tree: type, size, mtime and content of every file, target of every link).
docs/security.md (docs/security-files.md).

Promises checked: no write outside ``--out`` (names from files are made plain names, symbolic
links are never written through, temporary files are unpredictable); no overwrite without
``--overwrite`` and never over an input; weights of the wrong kind or not finite refused; every
image reader bounded by one pixel limit (16-bit PNGs included) and a bomb is an image error;
sizes from files bounded; bad input is ``error: ...`` naming the file with exit status 2, not a
traceback.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import resource
import stat
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from hdnas import evaluate, export, latency, upscale, visualize
from hdnas.data import cache
from hdnas.io import weights as weights_io
from hdnas.model.genotype import Genotype
from hdnas.model.network import DerivedNet
from hdnas.nas.latency import LatencyTableError, load_table

torch.set_num_threads(2)
png = pytest.importorskip("png")

G = Genotype([["conv_1x1", "conv_3x3", "dil_conv_3x3"]], [], channels=8, num_cells=2, name="tiny")
COMMANDS = {"export": export.main, "upscale": upscale.main, "evaluate": evaluate.main,
            "latency": latency.main, "visualize": visualize.main, "cache": cache.main}


# --------------------------------------------------------------------------- files
def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.lru_cache(maxsize=None)
def _zero_rows(w: int, h: int, depth: int, full: bool) -> bytes:
    """The zlib stream of h zero rows of w RGB pixels (all of them if ``full``, else 4)."""
    row = b"\0" * (1 + w * 3 * depth // 8)
    c = zlib.compressobj(1)
    return b"".join([c.compress(row) for _ in range(h if full else 4)] + [c.flush()])


def png_bomb(path: Path, w: int, h: int, depth: int, full: bool = False) -> Path:
    """A PNG whose IHDR declares w x h RGB pixels of ``depth`` bits: with ``full`` a complete,
    valid image of zeros (15000 x 15000 x 16-bit: a 6 MB file that decodes into 1.35 GB, and
    into several GB through pypng's rows), else a few rows of data (a few hundred bytes)."""
    rows = _zero_rows(w, h, depth, full)
    ihdr = struct.pack(">IIBBBBB", w, h, depth, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows)
                     + chunk(b"IEND", b""))
    return path


def safetensors_raw(path: Path, header: dict, data: bytes = b"") -> Path:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def state(seed=0) -> dict:
    torch.manual_seed(seed)
    return DerivedNet(G).state_dict()


class World:
    """A temporary tree: inputs under ``in/``, a victim file outside every output folder."""

    def __init__(self, root: Path):
        self.root = root
        self.inp = root / "in"
        self.inp.mkdir()
        self.out = root / "out"
        self.victim = root / "victim.txt"
        self.victim.write_text("precious\n")
        rng = np.random.default_rng(0)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                self.inp / f"im{i}.png")
        self.weights = weights_io.save_weights(state(), G, root / "w.safetensors")
        self.genotype = root / "g.json"
        G.save(self.genotype)
        torch.save({"model": state()}, root / "w.pt")
        self.pt = root / "w.pt"

    def weights_named(self, name) -> Path:
        g = Genotype(G.cell_ops, G.inputs, channels=8, num_cells=2, name=name)
        return weights_io.save_weights(state(), g, self.root / "named.safetensors")

    def weights_with(self, fn) -> Path:
        sd = {k: fn(v) for k, v in state().items()}
        return weights_io.save_weights(sd, G, self.root / "odd.safetensors")

    def text(self, name, text: str | bytes) -> Path:
        p = self.root / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return p


def snapshot(root: Path, skip: Path | None) -> dict:
    """Every entry under ``root`` but ``skip``: type, size, mtime, content hash, link target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if skip is not None and (p == skip or skip in p.parents):
                continue
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[p] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[p] = ("dir",)
            else:
                out[p] = ("file", st.st_size, st.st_mtime_ns,
                          hashlib.sha256(p.read_bytes()).hexdigest())
    return out


# --------------------------------------------------------------------------- cases
@dataclass
class Case:
    id: str
    cmd: str
    args: Callable[[World], list]  # the argv, built after any setup it does
    rc: int
    msg: str | tuple = ""  # substring(s) of stderr ("" : nothing asked)
    zone: str | None = "out"  # what may change: "out" (w.out), None (nothing)
    check: Callable[[World], None] | None = None
    env: dict = field(default_factory=dict)


def _exp(w, weights, *extra):
    return ["--weights", str(weights), "--out", str(w.out), "--formats", "safetensors", *extra]


def _up(w, *extra):
    return [str(w.inp), "--weights", str(w.weights), "--out", str(w.out), "--no-progress", *extra]


def _ev(w, *extra):
    return ["--bicubic", "--data", str(w.inp), "--scales", "2", "--out", str(w.out), "--quiet",
            *extra]


def _files(w) -> list[str]:
    return sorted(p.name for p in w.out.iterdir()) if w.out.exists() else []


def _plant_link(w, rel, target=None):
    w.out.mkdir(exist_ok=True)
    (w.out / rel).symlink_to(target or w.victim)


def _plant_then(w, rel, argv):
    _plant_link(w, rel)
    return argv


def _twice(cmd, argv):
    """Run once (must succeed), and hand back the same argv for the checked second run."""
    assert COMMANDS[cmd](argv) == 0
    return argv


def _nested_out(w):
    w.out = w.root / "a" / "b" / "out"  # ../../x from here is a/x: must not appear
    w.out.parent.mkdir(parents=True)
    return w.out


def _link_is_replaced(name):
    def check(w):
        assert (w.out / name).is_file() and not (w.out / name).is_symlink()
        assert w.victim.read_text() == "precious\n"
    return check


def _run_folder(w, config, history: str | None = None):
    run = w.root / "run"
    run.mkdir(exist_ok=True)
    (run / "config.json").write_bytes(config if isinstance(config, bytes)
                                      else json.dumps(config).encode())
    if history is not None:
        (run / "history.csv").write_text(history)
    w.out = run  # visualize writes its pictures into the run folder
    return [str(run)]


def _history(ops=2, cells=3):
    cols = ["step"] + [f"alpha_{s}_{k}" for s in range(3) for k in range(ops)] + \
        [f"beta{c}_{j}" for c in range(3, cells + 1) for j in range(c - 1)] + \
        ["val_psnr", "val_ssim"]
    rows = [",".join(cols)]
    for step in (1, 2):
        rows.append(",".join([str(step)] + ["0.1"] * (len(cols) - 3) + ["30.0", "0.9"]))
    return "\n".join(rows) + "\n"


CASES = [
    # ---- names from files: never a path
    Case("export-name-dotdot", "export",
         lambda w: (_nested_out(w), _exp(w, w.weights_named("../../x")))[1], 0,
         "not a plain file name",
         check=lambda w: _files(w) == ["x.genotype.json", "x.safetensors"]
         or pytest.fail(str(_files(w)))),
    Case("export-name-absolute", "export",
         lambda w: _exp(w, w.weights_named(str(w.root / "abs"))), 0, "not a plain file name",
         check=lambda w: all(f.endswith("abs.safetensors") or f.endswith("abs.genotype.json")
                             for f in _files(w)) or pytest.fail(str(_files(w)))),
    Case("export-name-empty", "export", lambda w: _exp(w, w.weights_named("")), 0,
         check=lambda w: "model.safetensors" in _files(w) or pytest.fail(str(_files(w)))),
    Case("export-name-dots", "export", lambda w: _exp(w, w.weights_named("..")), 0,
         check=lambda w: "model.safetensors" in _files(w) or pytest.fail(str(_files(w)))),
    Case("export-name-flag-path", "export", lambda w: _exp(w, w.weights, "--name", "../x"), 2,
         "is not a plain file name"),
    # ---- symbolic links: never written through
    Case("export-link-at-output", "export",
         lambda w: _plant_then(w, "tiny.safetensors", _exp(w, w.weights)), 2, "already exists"),
    Case("export-link-at-output-overwrite", "export",
         lambda w: _plant_then(w, "tiny.safetensors", _exp(w, w.weights, "--overwrite")), 0,
         check=_link_is_replaced("tiny.safetensors")),
    Case("export-link-at-temp-paths", "export",
         lambda w: [_plant_link(w, n) for n in ("tiny.genotype.json.tmp", "genotype.json.tmp",
                                               "tiny.safetensors.tmp")] and _exp(w, w.weights), 0,
         check=lambda w: (w.out / "genotype.json.tmp").is_symlink() or pytest.fail("touched")),
    Case("upscale-link-at-temp-path", "upscale",
         lambda w: _plant_then(w, "im0.png.tmp", _up(w)), 0,
         check=lambda w: (w.out / "im0.png.tmp").is_symlink() or pytest.fail("touched")),
    Case("evaluate-link-to-folder-elsewhere", "evaluate",
         lambda w: ((w.root / "elsewhere").mkdir(), _plant_link(w, "compare", w.root / "elsewhere"),
                    ["--genotype", str(w.genotype), "--weights", str(w.pt), "--data", str(w.inp),
                     "--out", str(w.out), "--quiet", "--compare"])[2], 2,
         "outside the output folder"),
    # ---- overwrites: only with consent, never the inputs
    Case("upscale-out-is-input-folder", "upscale",
         lambda w: [str(w.inp), "--weights", str(w.weights), "--out", str(w.inp), "--overwrite"],
         2, "is the input folder", zone=None),
    Case("upscale-output-is-an-input-file", "upscale",
         lambda w: [str(w.inp / "im0.png"), "--weights", str(w.weights), "--out", str(w.inp),
                    "--overwrite"], 2, "an output never replaces an input", zone=None),
    Case("upscale-second-run", "upscale", lambda w: _twice("upscale", _up(w)), 2,
         "already exists (--overwrite replaces it)"),
    Case("upscale-second-run-overwrite", "upscale",
         lambda w: _twice("upscale", _up(w)) + ["--overwrite"], 0),
    Case("export-second-run", "export", lambda w: _twice("export", _exp(w, w.weights)), 2,
         "already exists"),
    Case("export-over-its-own-weights", "export",
         lambda w: (_twice("export", _exp(w, w.weights)),
                    _exp(w, w.out / "tiny.safetensors", "--overwrite"))[1], 2, "is the input"),
    Case("evaluate-second-run", "evaluate", lambda w: _twice("evaluate", _ev(w)), 2,
         "results.csv already exists"),
    Case("latency-out-exists", "latency",
         lambda w: (w.out.mkdir(), (w.out / "t.json").write_text("{}"),
                    ["--channels", "8", "--out", str(w.out / "t.json")])[2], 2, "already exists"),
    # ---- weights of the wrong kind
    Case("weights-int8", "upscale", lambda w: _up(w)[:2] + [str(w.weights_with(
        lambda v: v.to(torch.int8)))] + _up(w)[3:], 2, "is I8; weights must be floating point"),
    Case("weights-bool", "export", lambda w: _exp(w, w.weights_with(lambda v: v > 0)), 2,
         ("odd.safetensors: tensor '", "is BOOL; weights must be floating point")),
    Case("weights-nan", "export", lambda w: _exp(w, w.weights_with(
        lambda v: v.fill_(math.nan) if v.dim() == 1 else v), "--check"), 2, "non-finite"),
    Case("weights-huge-finite-upscale", "upscale", lambda w: _up(w)[:2] + [str(w.weights_with(
        lambda v: v.fill_(1e30)))] + _up(w)[3:], 1, "output is not finite"),
    Case("weights-huge-finite-evaluate", "evaluate",
         lambda w: (torch.save({"model": {k: v.fill_(1e30) for k, v in state().items()}},
                               w.root / "huge.pt"),
                    ["--genotype", str(w.genotype), "--weights", str(w.root / "huge.pt"), "--data",
                     str(w.inp), "--out", str(w.out), "--quiet"])[1], 2,
         "im0.png: the network's output is not finite"),
    Case("weights-pt-int8", "evaluate",
         lambda w: (torch.save({"model": {k: v.to(torch.int8) for k, v in state().items()}},
                               w.root / "i8.pt"),
                    ["--genotype", str(w.genotype), "--weights", str(w.root / "i8.pt"), "--data",
                     str(w.inp), "--out", str(w.out), "--quiet"])[1], 2,
         "i8.pt: tensor 'fea_conv.weight' is int8; weights must be floating point"),
    # ---- sizes from files
    Case("genotype-huge-channels", "export",
         lambda w: ["--genotype", str(w.text("big.json", json.dumps(
             {**G.to_dict(), "channels": 10**7}))), "--weights", str(w.pt), "--out", str(w.out)],
         2, "big.json: channels must be an integer in 4..1024"),
    Case("safetensors-header-huge-channels", "export",
         lambda w: _exp(w, safetensors_raw(w.root / "h.safetensors", {
             "__metadata__": {"hdnas_genotype": json.dumps({**G.to_dict(), "channels": 10**7})},
             "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)),
         2, "h.safetensors: malformed genotype in the metadata"),
    Case("safetensors-header-huge-tensor", "export",
         lambda w: _exp(w, safetensors_raw(w.root / "t.safetensors", {
             "w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}},
             b"\0" * 16), "--genotype", str(w.genotype)), 2,
         "t.safetensors: the tensors need more than 2,147,483,648 bytes"),
    Case("model-bytes-limit", "export", lambda w: _exp(w, w.pt, "--genotype", str(w.genotype)),
         2, "more than the limit of 1,000", env={"HDNAS_MAX_MODEL_BYTES": "1000"}),
    Case("pt-archive-limit", "evaluate",
         lambda w: (torch.save({"model": state(), "junk": torch.zeros(10**6)}, w.root / "fat.pt"),
                    ["--genotype", str(w.genotype), "--weights", str(w.root / "fat.pt"), "--data",
                     str(w.inp), "--out", str(w.out), "--quiet"])[1], 2,
         "fat.pt: the archive unpacks to", env={"HDNAS_MAX_MODEL_BYTES": "100000"}),
    # ---- genotype files that are not genotypes
    Case("genotype-deep-json", "export",
         lambda w: ["--genotype", str(w.text("deep.json", "[" * 200_000 + "]" * 200_000)),
                    "--weights", str(w.pt), "--out", str(w.out)], 2,
         "deep.json: JSON nested too deeply"),
    Case("genotype-binary", "upscale",
         lambda w: _up(w, "--genotype", str(w.text("bin.json", bytes(range(256)) * 4))), 2,
         "bin.json: not UTF-8 text"),
    Case("genotype-nan", "export",
         lambda w: ["--genotype", str(w.text("nan.json", json.dumps(G.to_dict())[:-1]
                                             + ', "notes": {"x": NaN}}')),
                    "--weights", str(w.pt), "--out", str(w.out)], 2, "nan.json: the number NaN"),
    Case("genotype-list", "evaluate",
         lambda w: ["--genotype", str(w.text("list.json", "[1, 2]")), "--weights", str(w.pt),
                    "--data", str(w.inp), "--out", str(w.out)], 2, "list.json: not a genotype"),
    # ---- decompression bombs
    Case("png16-bomb-upscale", "upscale",
         lambda w: (png_bomb(w.inp / "bomb.png", 15000, 15000, 16, full=True), _up(w))[1], 1,
         "bomb.png: image of 15000x15000 = 225,000,000 pixels is larger than the limit"),
    Case("png8-bomb-upscale", "upscale",
         lambda w: (png_bomb(w.inp / "bomb.png", 20000, 20000, 8), _up(w))[1], 1,
         "bomb.png: image larger than the limit"),
    Case("png8-bomb-evaluate", "evaluate",
         lambda w: (png_bomb(w.inp / "bomb.png", 15000, 15000, 8), _ev(w))[1], 2,
         "bomb.png: image of 15000x15000"),
    Case("png8-bomb-cache", "cache",
         lambda w: (png_bomb(w.inp / "bomb.png", 15000, 15000, 8),
                    [str(w.inp), "--scale", "2", "--workers", "0", "--cache-dir", str(w.out)])[1],
         2, "bomb.png: image of 15000x15000"),
    Case("png16-bomb-cache-skipped", "cache",
         lambda w: (png_bomb(w.inp / "bomb.png", 15000, 15000, 16),
                    [str(w.inp), "--scale", "2", "--workers", "0", "--cache-dir", str(w.out),
                     "--skip-bad-images"])[1], 0),
    Case("pixel-limit-env", "upscale", lambda w: _up(w), 1,
         ("im0.png: image", "than the limit of 100 pixels"),
         env={"HDNAS_MAX_PIXELS": "100"}),
    Case("pixel-limit-env-bad", "upscale", lambda w: _up(w), 2, "HDNAS_MAX_PIXELS='lots'",
         env={"HDNAS_MAX_PIXELS": "lots"}),
    # ---- options out of range: refused at parse time
    Case("latency-channels-0", "latency", lambda w: ["--channels", "0", "--out", str(w.out / "t")],
         2, "argument --channels: 0 is out of range"),
    Case("latency-repeats-0", "latency", lambda w: ["--repeats", "0", "--out", str(w.out / "t")],
         2, "argument --repeats: 0 is out of range"),
    Case("latency-size-huge", "latency",
         lambda w: ["--size", "100000x100000", "--out", str(w.out / "t")], 2, "pixels"),
    Case("export-opset-999", "export", lambda w: _exp(w, w.weights, "--opset", "999"), 2,
         "argument --opset: 999 is out of range"),
    Case("upscale-device-bogus", "upscale", lambda w: _up(w, "--device", "bogus"), 2,
         "--device 'bogus': not a device"),
    Case("upscale-tile-negative", "upscale", lambda w: _up(w, "--tile", "-5"), 2,
         "argument --tile: -5 is out of range"),
    # ---- visualize on run folders that are not
    Case("visualize-missing", "visualize", lambda w: [str(w.root / "nope")], 2,
         "run folder", zone=None),
    Case("visualize-config-list", "visualize", lambda w: _run_folder(w, [1, 2], _history()), 2,
         "config.json: no 'resolved' settings"),
    Case("visualize-config-binary", "visualize", lambda w: _run_folder(w, b"\xff\xfe\0", ""), 2,
         "config.json: not UTF-8"),
    Case("visualize-config-deep", "visualize",
         lambda w: _run_folder(w, ("[" * 100_000).encode(), ""), 2, "config.json: JSON nested"),
    Case("visualize-cells-huge", "visualize",
         lambda w: _run_folder(w, {"resolved": {"ops": ["a", "b"], "cells": 10**9}}, _history()),
         2, "'cells' is 1000000000"),
    Case("visualize-history-short", "visualize",
         lambda w: _run_folder(w, {"resolved": {"ops": ["a", "b"], "cells": 4}}, _history()), 2,
         "history.csv: row 2 has no number in column 'beta4_0'"),
    Case("visualize-good", "visualize",
         lambda w: _run_folder(w, {"resolved": {"ops": ["a", "b"], "cells": 3}}, _history()), 0,
         check=lambda w: sorted(p.name for p in w.out.glob("*.png")) == ["alpha.png", "beta.png",
                                                                          "val.png"]
         or pytest.fail("pictures")),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_hostile_input(case, tmp_path, capsys, monkeypatch):
    w = World(tmp_path)
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    argv = case.args(w)
    capsys.readouterr()
    zone = w.out if case.zone == "out" else None
    before = snapshot(tmp_path, zone)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        rc = COMMANDS[case.cmd](argv)
    except SystemExit as e:  # argparse: a refused option
        rc = e.code
    err = capsys.readouterr().err
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    assert rc == case.rc, err
    for m in case.msg if isinstance(case.msg, tuple) else (case.msg,):
        assert m in err, err
    assert "Traceback" not in err
    if case.rc:
        assert "error: " in err
    after = snapshot(tmp_path, zone)
    changed = sorted(str(p) for p in set(before) | set(after) if before.get(p) != after.get(p))
    assert not changed, f"changed outside {zone}: {changed}"
    assert w.victim.read_text() == "precious\n"
    assert grown_mb < 400, f"peak memory grew by {grown_mb:.0f} MB"
    if case.check:
        case.check(w)


# --------------------------------------------------------------------------- library level
@pytest.mark.parametrize("text, match", [
    ("[1, 2]", "not a latency table"),
    ('{"format": "hdnas-latency", "version": 1, "ops_ms": {"conv_1x1": NaN}, "fixed_ms": 1, '
     '"channels": 8, "cells": 3, "scale": 2}', "the number NaN"),
    ('{"format": "hdnas-latency", "version": 1, "ops_ms": {"conv_1x1": 0}, "fixed_ms": 1, '
     '"channels": 8, "cells": 3, "scale": 2}', r"ops_ms\['conv_1x1'\] is 0"),
    ('{"format": "hdnas-latency", "version": 1, "ops_ms": {"conv_1x1": Infinity}, "fixed_ms": 1, '
     '"channels": 8, "cells": 3, "scale": 2}', "the number Infinity"),
    ('{"format": "hdnas-latency", "version": 1, "ops_ms": {"conv_1x1": 1e999}, "fixed_ms": 1, '
     '"channels": 8, "cells": 3, "scale": 2}', "overflows"),
    ('{"format": "hdnas-latency", "version": 1, "ops_ms": [1, 2], "fixed_ms": 1, '
     '"channels": 8, "cells": 3, "scale": 2}', "'ops_ms' is not an object"),
    ('{"format": "hdnas-latency", "version": 1, "ops_ms": {"a": 1}, "fixed_ms": 1, '
     '"channels": 10000000, "cells": 3, "scale": 2}', "channels is 10000000"),
    ("[" * 100_000, "nested too deeply"),
])
def test_latency_table_refused_naming_the_file(tmp_path, text, match):
    p = tmp_path / "table.json"
    p.write_text(text)
    with pytest.raises(LatencyTableError, match=match) as e:
        load_table(p)
    assert str(p) in str(e.value)


def test_check_treats_non_finite_outputs_as_a_mismatch(tmp_path):
    """max(0.0, nan) is 0.0: a NaN difference must fail the check, not pass it as 0."""
    from hdnas.io.export import ExportError, check_pt2, export_pt2

    torch.manual_seed(0)
    m = DerivedNet(G).eval()
    path = export_pt2(m, tmp_path / "m.pt2")
    with torch.no_grad():
        m.fea_conv.bias.fill_(math.nan)
    with pytest.raises(ExportError, match="not finite"):
        check_pt2(m, path, [torch.rand(1, 3, 24, 24) * 255])


def test_debug_shows_the_traceback(tmp_path):
    """--debug re-raises what would be ``error: ...`` (here a deeply nested genotype file)."""
    w = World(tmp_path)
    argv = ["--genotype", str(w.text("deep.json", "[" * 100_000)), "--weights", str(w.pt),
            "--out", str(w.out)]
    assert export.main(argv) == 2
    with pytest.raises(ValueError, match="nested too deeply"):
        export.main(argv + ["--debug"])
