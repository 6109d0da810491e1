"""Genotypes as data: a versioned, validated JSON description of a derived architecture.

A genotype names the op of each distillation step (one row shared by all cells, as the release
searches, or one row per cell) and the two chosen predecessors of each cell from the third on
(0-based indices into [B1, B2, ...], in concat order), plus channels and scale.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hdnas.model.space import DLSR_PRIMITIVES, SearchSpaceError, get_op

FORMAT = "hdnas-genotype"
VERSION = 1
SCALES = (2, 3, 4)


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
        object.__setattr__(self, "cell_ops", tuple(tuple(r) for r in self.cell_ops))
        object.__setattr__(self, "inputs", tuple(tuple(int(i) for i in p) for p in self.inputs))
        self.validate()

    def validate(self):
        if not isinstance(self.channels, int) or self.channels < 4:
            raise GenotypeError(f"channels must be an integer >= 4, got {self.channels!r}")
        try:
            check_scale(self.scale)
        except ValueError as e:
            raise GenotypeError(str(e)) from None
        if not isinstance(self.num_cells, int) or self.num_cells < 2:
            raise GenotypeError(f"num_cells must be an integer >= 2, got {self.num_cells!r}")
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
            raise GenotypeError(f"genotype version {d.get('version')!r} is not supported "
                                f"(this hdnas reads version {VERSION})")
        known = {"cell_ops", "inputs", "channels", "scale", "num_cells", "name", "notes"}
        unknown = set(d) - known - {"format", "version"}
        if unknown:
            raise GenotypeError(f"unknown genotype fields: {sorted(unknown)}")
        missing = {"cell_ops", "inputs"} - set(d)
        if missing:
            raise GenotypeError(f"genotype misses fields: {sorted(missing)}")
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except (TypeError, ValueError) as e:
            if isinstance(e, GenotypeError):
                raise
            raise GenotypeError(f"malformed genotype: {e}") from None

    def save(self, path):
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path) -> "Genotype":
        path = Path(path)
        if not path.is_file():
            if path.name.upper() in NAMED:
                return NAMED[path.name.upper()]
            raise GenotypeError(f"genotype file {path} does not exist (named genotypes: "
                                f"{', '.join(NAMED)})")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise GenotypeError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d)


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
