"""Weights as safetensors: tensors only, so reading a file can never run code.

A weights file written here holds the model's state dict (contiguous, on CPU) and, in the
safetensors header metadata, the genotype as JSON under ``hdnas_genotype`` (the same dict as
``genotype.json``) plus ``format: pt``. ``hdnas.io.official.read_state_dict`` (and so every command
that takes ``--weights``) reads these files first: a ``.safetensors`` suffix or the safetensors
header (an 8-byte little-endian header length, then a JSON object) selects this reader, with no
trust flag, because the format cannot hold anything but tensors and strings.

    save_weights(model, genotype, "net.safetensors")
    sd, genotype = read_weights("net.safetensors")   # genotype None if the file has none
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from hdnas.io.atomic import write_atomic
from hdnas.model.genotype import Genotype, GenotypeError

__all__ = ["SafetensorsError", "GENOTYPE_KEY", "is_safetensors", "save_weights", "read_weights",
           "read_genotype"]

GENOTYPE_KEY = "hdnas_genotype"
SUFFIX = ".safetensors"
# a header longer than this is not a weights file of ours (the format itself caps it at 100 MB)
_MAX_HEADER = 100_000_000


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


def save_weights(model_or_state, genotype: Genotype | None, path) -> Path:
    """Write a state dict (or a module's) and the genotype to ``path`` atomically."""
    from safetensors.torch import save

    sd = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) \
        else model_or_state
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    meta = {"format": "pt"}
    if genotype is not None:
        meta[GENOTYPE_KEY] = json.dumps(genotype.to_dict())
    return write_atomic(path, lambda f: f.write(save(tensors, metadata=meta)))


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def read_genotype(path) -> Genotype | None:
    """The genotype stored in a safetensors file's metadata, or None if it has none."""
    path = Path(path)
    try:
        meta = _metadata(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise SafetensorsError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") \
            from None
    text = meta.get(GENOTYPE_KEY)
    if text is None:
        return None
    try:
        return Genotype.from_dict(json.loads(text))
    except (json.JSONDecodeError, GenotypeError) as e:
        raise SafetensorsError(f"{path}: malformed genotype in the metadata ({e})") from None


def read_weights(path) -> tuple[dict[str, torch.Tensor], Genotype | None]:
    """(state dict on CPU, genotype or None) of a safetensors file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise SafetensorsError(f"weights file {path} does not exist")
    try:
        sd = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise SafetensorsError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") \
            from None
    return sd, read_genotype(path)
