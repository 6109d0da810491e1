"""Weights as safetensors: tensors only, so reading a file can never run code.

A weights file written here holds the model's state dict (contiguous, on CPU) and, in the
safetensors header metadata, the genotype as JSON under ``hdnas_genotype`` (the same dict as
``genotype.json``) plus ``format: pt``. ``hdnas.io.official.read_state_dict`` (and so every command
that takes ``--weights``) reads these files first: a ``.safetensors`` suffix or the safetensors
header (an 8-byte little-endian header length, then a JSON object) selects this reader, with no
trust flag, because the format cannot hold anything but tensors and strings.

    save_weights(model, genotype, "net.safetensors")
    sd, genotype = read_weights("net.safetensors")   # genotype None if the file has none

Reading checks the header before any tensor is read: every tensor floating point (F16, BF16,
F32, F64: weights of another kind would load silently and give black images), shapes of
non-negative integers, and the total size within ``max_weight_bytes()`` (``HDNAS_MAX_MODEL_BYTES``,
default 2 GiB); the genotype in the metadata is validated (``hdnas.model.genotype``: channels and
cells bounded). Every error names the file and, where one is at fault, the tensor.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from hdnas.io.atomic import OutputDir, write_file
from hdnas.model.genotype import Genotype
from hdnas.safeio import env_int

__all__ = ["SafetensorsError", "GENOTYPE_KEY", "is_safetensors", "save_weights", "read_weights",
           "read_genotype", "safetensors_bytes", "max_weight_bytes", "MAX_MODEL_BYTES",
           "FLOAT_DTYPES"]

GENOTYPE_KEY = "hdnas_genotype"
SUFFIX = ".safetensors"
# a header longer than this is not a weights file of ours (the format itself caps it at 100 MB)
_MAX_HEADER = 100_000_000


#: default bound on the bytes of a model's weights (HDNAS_MAX_MODEL_BYTES overrides it)
MAX_MODEL_BYTES = 2 * 2**30
#: safetensors dtypes accepted for weights, with their sizes in bytes
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


def max_weight_bytes() -> int:
    return env_int("HDNAS_MAX_MODEL_BYTES", MAX_MODEL_BYTES)


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read, or whose genotype metadata is malformed."""


def is_safetensors(path) -> bool:
    """True for a ``.safetensors`` file name, or for a file that starts like one (header length
    then ``{``), whatever its name."""
    path = Path(path)
    if path.suffix.lower() == SUFFIX:
        return True
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= min(_MAX_HEADER, path.stat().st_size - 8) and head[8:9] == b"{"


def safetensors_bytes(model_or_state, genotype: Genotype | None) -> bytes:
    """A state dict (or a module's) and the genotype, as the bytes of a safetensors file."""
    from safetensors.torch import save

    sd = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) \
        else model_or_state
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    meta = {"format": "pt"}
    if genotype is not None:
        meta[GENOTYPE_KEY] = json.dumps(genotype.to_dict(), allow_nan=False)
    return save(tensors, metadata=meta)


def save_weights(model_or_state, genotype: Genotype | None, path,
                 out: OutputDir | None = None) -> Path:
    """Write a state dict (or a module's) and the genotype to ``path`` atomically (through
    ``out`` when given)."""
    return write_file(path, safetensors_bytes(model_or_state, genotype), out)


def _check_header(path: Path) -> None:
    """The header's tensors: floating point, sane shapes, a bounded total (module docstring)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path}: cannot read safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise SafetensorsError(f"{path}: cannot read safetensors file (header length "
                                       f"{n} beyond the file)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SafetensorsError(f"{path}: cannot read safetensors file ({type(e).__name__}: "
                               f"{str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: cannot read safetensors file (the header is not an "
                               "object)")
    total, limit = 0, max_weight_bytes()
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise SafetensorsError(f"{path}: tensor {name!r}: malformed header entry")
        dtype, shape = info.get("dtype"), info.get("shape")
        if dtype not in FLOAT_DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} is {str(dtype)[:20]}; weights must "
                                   f"be floating point ({', '.join(FLOAT_DTYPES)})")
        if not isinstance(shape, list) or len(shape) > 8 or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise SafetensorsError(f"{path}: tensor {name!r}: malformed shape {str(shape)[:60]}")
        total += math.prod(shape) * FLOAT_DTYPES[dtype]
        if total > limit:
            raise SafetensorsError(f"{path}: the tensors need more than {limit:,} bytes "
                                   f"(at {name!r}); HDNAS_MAX_MODEL_BYTES raises the limit")


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _no_constant(text):
    raise ValueError(f"{text} is not a finite number")


def read_genotype(path) -> Genotype | None:
    """The genotype stored in a safetensors file's metadata, or None if it has none."""
    path = Path(path)
    _check_header(path)
    try:
        meta = _metadata(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise SafetensorsError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") \
            from None
    text = meta.get(GENOTYPE_KEY)
    if text is None:
        return None
    try:
        return Genotype.from_dict(json.loads(text, parse_constant=_no_constant))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, GenotypeError
        raise SafetensorsError(f"{path}: malformed genotype in the metadata "
                               f"({type(e).__name__}: {str(e)[:200]})") from None


def read_weights(path) -> tuple[dict[str, torch.Tensor], Genotype | None]:
    """(state dict on CPU, genotype or None) of a safetensors file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise SafetensorsError(f"weights file {path} does not exist")
    genotype = read_genotype(path)  # header and genotype checked before the tensors are read
    try:
        sd = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise SafetensorsError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") \
            from None
    return sd, genotype
