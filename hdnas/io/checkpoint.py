"""Checkpoints that survive a kill, and that cannot run code when read.

Saving writes to a temporary file in the same folder, flushes it to disk, then renames it over the
old one (atomic on POSIX), so a checkpoint is always whole or absent.

Loading uses torch's safe loader (``torch.load(weights_only=True)``): tensors, plain containers
and numbers, which is all a run checkpoint holds (model/optimizer/scheduler state dicts, RNG state
tensors, config dicts). A pickle can name any Python callable and make the reader call it, so a
file the safe loader refuses is only handed to the full unpickler when the caller opts in with
``trust_pickle=True``; otherwise it is a ``CheckpointError`` that says why.

A safetensors file (``hdnas.io.weights``: weights only, no code) is recognised first and read as
``{'model': state_dict}`` plus ``'genotype'`` (a dict) when its metadata carries one.

Bounded: a ``torch.save`` archive whose members would decompress to more than
``max_archive_bytes()`` (4 x ``hdnas.io.weights.max_weight_bytes()``: weights, optimizer moments
and slack) is refused before torch reads it.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from hdnas.io import weights as weights_io
from hdnas.io.atomic import write_atomic


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that only the (code-running) full unpickler reads."""


def max_archive_bytes() -> int:
    return 4 * weights_io.max_weight_bytes()


def _check_archive(path: Path) -> None:
    """The uncompressed size of a torch.save zip archive against ``max_archive_bytes()``."""
    try:
        with zipfile.ZipFile(path) as z:
            total = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip archive: torch's loader says what it is
    limit = max_archive_bytes()
    if total > limit:
        raise CheckpointError(f"{path}: the archive unpacks to {total:,} bytes, more than the "
                              f"limit of {limit:,} (HDNAS_MAX_MODEL_BYTES x 4 raises it)")


def save_atomic(obj, path) -> None:
    write_atomic(path, lambda f: torch.save(obj, f))


def _looks_like_torch_file(path: Path) -> bool:
    """A torch.save zip archive or a pickle of protocol >= 2 (torch's legacy format)."""
    with path.open("rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _refusal_reason(path: Path, err: Exception) -> str:
    """What the safe loader objected to, found without unpickling: the globals a torch.save
    archive names beyond the allowed ones, else the reason in torch's message."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - legacy format or an older torch: use torch's message
        names = []
    if names:
        return "it names " + ", ".join(sorted(names))
    m = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
    reason = m.group(1) if m else str(err).strip().splitlines()[0]
    return reason.split(". ")[0].strip()  # torch goes on with advice on allow-listing


def load(path, map_location="cpu", trust_pickle: bool = False,
         hint: str = "trust_pickle=True"):
    """``torch.load`` with the safe loader. With ``trust_pickle`` a file it refuses is read with the
    full unpickler, which runs whatever code the file names: only for files you trust. ``hint``
    names the opt-in in the error message (a command-line flag, for instance)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if weights_io.is_safetensors(path):
        try:
            sd, genotype = weights_io.read_weights(path)
        except weights_io.SafetensorsError as e:
            raise CheckpointError(str(e)) from None
        if map_location is not None:
            sd = {k: v.to(map_location) for k, v in sd.items()}
        return {"model": sd, **({"genotype": genotype.to_dict()} if genotype else {})}
    _check_archive(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = e
    except Exception as e:  # noqa: BLE001 - truncated zip, empty file, I/O error, ...
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    if not trust_pickle:
        if not _looks_like_torch_file(path):
            raise CheckpointError(f"{path}: cannot read checkpoint: not a torch.save file "
                                  f"({_refusal_reason(path, refused)})")
        raise CheckpointError(
            f"{path}: the safe loader (torch.load weights_only=True) refused this file "
            f"({_refusal_reason(path, refused)}); it holds Python objects beyond tensors and plain "
            "containers and needs the full unpickler, which can run arbitrary code stored in the "
            f"file. Only if you trust its source, load it with {hint}.")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None


def rng_state(generator: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "data": generator.get_state()}


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
