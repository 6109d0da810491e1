"""Genotypes as data: a versioned, validated JSON description of a derived architecture.

A genotype names the op of each distillation step (one row shared by all cells, as the release
searches, or one row per cell) and the two chosen predecessors of each cell from the third on
(0-based indices into [B1, B2, ...], in concat order), plus channels and scale.

A genotype file is untrusted input: it is read within bounds (``hdnas.safeio.read_json``: size,
UTF-8, nesting, finite numbers), every field is type-checked, and the network it describes is
bounded (``channels`` <= ``MAX_CHANNELS``, ``num_cells`` <= ``MAX_CELLS``, so a file cannot ask
for terabytes); every error names the file. ``save`` writes through the one atomic writer.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hdnas.model.space import DLSR_PRIMITIVES, SearchSpaceError, get_op
from hdnas.safeio import read_json, write_atomic

FORMAT = "hdnas-genotype"
VERSION = 1
SCALES = (2, 3, 4)
#: bounds on what a genotype may ask for (the release: 48 channels, 6 cells)
MAX_CHANNELS = 1024
MAX_CELLS = 32
MAX_NAME = 256
#: a genotype file is a few hundred bytes
MAX_FILE_BYTES = 1 << 20


class GenotypeError(ValueError):
    """A malformed or inconsistent genotype."""


def check_scale(scale) -> int:
    if scale not in SCALES:
        raise ValueError(f"scale {scale!r} is not supported; choose one of {SCALES}")
    return int(scale)


@dataclass(frozen=True)
class Genotype:
    cell_ops: tuple  # tuple of rows, each a tuple of 3 op names; 1 row = shared by all cells
    inputs: tuple  # for cells 3..num_cells: (a, b) predecessor indices
    channels: int = 48
    scale: int = 2
    num_cells: int = 6
    name: str = ""
    notes: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        for key in ("cell_ops", "inputs"):
            v = getattr(self, key)
            if isinstance(v, (str, bytes, dict)) or not hasattr(v, "__len__") \
                    or len(v) > MAX_CELLS or any(isinstance(r, (str, bytes, dict))
                                                 or not hasattr(r, "__len__") or len(r) > 3
                                                 for r in v):
                raise GenotypeError(f"{key} must be a list of short lists, got {_short(v)}")
        if not all(isinstance(n, str) for r in self.cell_ops for n in r):
            raise GenotypeError(f"cell_ops must hold op names (strings), got "
                                f"{_short(self.cell_ops)}")
        if not all(isinstance(i, int) and not isinstance(i, bool) for p in self.inputs for i in p):
            raise GenotypeError(f"inputs must hold cell indices (integers), got "
                                f"{_short(self.inputs)}")
        object.__setattr__(self, "cell_ops", tuple(tuple(r) for r in self.cell_ops))
        object.__setattr__(self, "inputs", tuple(tuple(int(i) for i in p) for p in self.inputs))
        self.validate()

    def validate(self):
        if not _is_int(self.channels) or not 4 <= self.channels <= MAX_CHANNELS:
            raise GenotypeError(f"channels must be an integer in 4..{MAX_CHANNELS}, got "
                                f"{_short(self.channels)}")
        try:
            if not _is_int(self.scale):
                raise ValueError(f"scale must be an integer, got {_short(self.scale)}")
            check_scale(self.scale)
        except (ValueError, TypeError) as e:
            raise GenotypeError(str(e)) from None
        if not _is_int(self.num_cells) or not 2 <= self.num_cells <= MAX_CELLS:
            raise GenotypeError(f"num_cells must be an integer in 2..{MAX_CELLS}, got "
                                f"{_short(self.num_cells)}")
        if not isinstance(self.name, str) or len(self.name) > MAX_NAME:
            raise GenotypeError(f"name must be a string of at most {MAX_NAME} characters, got "
                                f"{_short(self.name)}")
        if not isinstance(self.notes, dict):
            raise GenotypeError(f"notes must be a dict, got {_short(self.notes)}")
        if len(self.cell_ops) not in (1, self.num_cells):
            raise GenotypeError(f"cell_ops needs 1 row (shared) or {self.num_cells} rows, "
                                f"got {len(self.cell_ops)}")
        for r, row in enumerate(self.cell_ops):
            if len(row) != 3:
                raise GenotypeError(f"cell_ops row {r} needs 3 op names, got {len(row)}: {row}")
            for name in row:
                try:
                    get_op(name)
                except SearchSpaceError as e:
                    raise GenotypeError(f"cell_ops row {r}: {e}") from None
        if len(self.inputs) != self.num_cells - 2:
            raise GenotypeError(f"inputs needs {self.num_cells - 2} pairs (cells 3..{self.num_cells}),"
                                f" got {len(self.inputs)}")
        for c, pair in enumerate(self.inputs, start=3):
            if len(pair) != 2 or len(set(pair)) != 2:
                raise GenotypeError(f"cell {c} needs two different predecessors, got {pair}")
            if not all(0 <= i < c - 1 for i in pair):
                raise GenotypeError(f"cell {c} may only take earlier cells 0..{c - 2}, got {pair}")

    def ops_of_cell(self, i: int) -> tuple:
        return self.cell_ops[0] if len(self.cell_ops) == 1 else self.cell_ops[i]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cell_ops"] = [list(r) for r in self.cell_ops]
        d["inputs"] = [list(p) for p in self.inputs]
        return {"format": FORMAT, "version": VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "Genotype":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise GenotypeError(f"not a genotype: expected format {FORMAT!r}")
        if d.get("version") != VERSION:
            raise GenotypeError(f"genotype version {_short(d.get('version'))} is not supported "
                                f"(this hdnas reads version {VERSION})")
        known = {"cell_ops", "inputs", "channels", "scale", "num_cells", "name", "notes"}
        unknown = set(d) - known - {"format", "version"}
        if unknown:
            raise GenotypeError(f"unknown genotype fields: {_short(sorted(map(str, unknown)))}")
        missing = {"cell_ops", "inputs"} - set(d)
        if missing:
            raise GenotypeError(f"genotype misses fields: {sorted(missing)}")
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except (TypeError, ValueError) as e:
            if isinstance(e, GenotypeError):
                raise
            raise GenotypeError(f"malformed genotype: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def save(self, path, overwrite: bool = True, root=None) -> Path:
        """Write the JSON atomically (``hdnas.safeio.write_atomic``: ``overwrite=False`` refuses
        an existing file, ``root`` a folder outside it)."""
        return write_atomic(path, self.to_json(), overwrite=overwrite, root=root)

    @classmethod
    def load(cls, path) -> "Genotype":
        """A named genotype (BETA21, PARA_LOSS, TINY18) or a genotype JSON file; GenotypeError
        naming the file for anything else."""
        path = Path(path)
        if not path.exists():
            if path.name.upper() in NAMED:
                return NAMED[path.name.upper()]
            raise GenotypeError(f"genotype file {path} does not exist (named genotypes: "
                                f"{', '.join(NAMED)})")
        d = read_json(path, "genotype file", MAX_FILE_BYTES, GenotypeError)
        try:
            return cls.from_dict(d)
        except GenotypeError as e:
            raise GenotypeError(f"{path}: {e}") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(v, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def derive(alphas: torch.Tensor, betas, op_names=DLSR_PRIMITIVES, channels=48, scale=2,
           name="") -> Genotype:
    """The release's derivation: argmax op per step; the two strongest predecessors per cell,
    strongest first. ``alphas`` is (3, K) shared or (cells, 3, K) per cell."""
    alphas = alphas.detach()
    rows = alphas.unsqueeze(0) if alphas.dim() == 2 else alphas
    cell_ops = [[op_names[int(i)] for i in r.argmax(dim=-1)] for r in rows]
    inputs = []
    for b in betas:
        top = torch.softmax(b.detach(), dim=-1).topk(2).indices.tolist()
        inputs.append(top)
    return Genotype(cell_ops, inputs, channels=channels, scale=scale,
                    num_cells=len(betas) + 2, name=name)


#: The released architectures (docs/method.md §4), in the concat order of the retrain files.
BETA21 = Genotype([["conv_1x1", "sep_conv_7x7", "sep_conv_5x5"]], [[0, 1], [1, 2], [1, 3], [3, 4]],
                  channels=48, scale=2, name="beta21")
PARA_LOSS = Genotype([["sep_conv_3x3", "sep_conv_5x5", "sep_conv_5x5"]],
                     [[1, 0], [2, 1], [3, 2], [0, 2]], channels=48, scale=2, name="para_loss")
TINY18 = Genotype([["conv_1x1", "sep_conv_7x7", "sep_conv_5x5"]], [[0, 1], [1, 2], [1, 3], [3, 4]],
                  channels=18, scale=2, name="tiny18")
NAMED = {"BETA21": BETA21, "PARA_LOSS": PARA_LOSS, "TINY18": TINY18}
