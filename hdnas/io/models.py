"""A derived network with its weights, from the files a user names: a genotype (a released name,
a JSON file, or the one stored in a safetensors weights file) and a weights file (safetensors,
our checkpoints, or the official DLSR checkpoints), checked against each other."""
from __future__ import annotations

from pathlib import Path

from hdnas.io import weights as weights_io
from hdnas.io.official import WeightsError, build_net, load_weights
from hdnas.model.genotype import NAMED, Genotype, GenotypeError
from hdnas.model.network import DerivedNet


class ModelFileError(ValueError):
    """A genotype or weights file that does not give a usable network (the message names it)."""


def load_model(genotype=None, weights=None, scale: int | None = None,
               trust_pickle: bool = False) -> DerivedNet:
    """The derived network of ``genotype`` (a name, a JSON path, a Genotype, or None: the one
    stored in a safetensors ``weights`` file) with ``weights``, in eval mode on CPU."""
    if weights is None:
        raise ModelFileError("--weights is required (the named networks need their weights too)")
    stored = None
    if Path(weights).is_file() and weights_io.is_safetensors(weights):
        try:
            stored = weights_io.read_genotype(weights)
        except weights_io.SafetensorsError as e:
            raise ModelFileError(str(e)) from None
    if genotype is None:
        if stored is None:
            raise ModelFileError(f"{weights} holds no genotype; give --genotype (a JSON file or "
                               f"one of {', '.join(NAMED)})")
        genotype = stored
    elif not isinstance(genotype, Genotype):
        try:
            genotype = Genotype.load(genotype)
        except GenotypeError as e:
            raise ModelFileError(str(e)) from None
    if stored is not None and _arch(stored) != _arch(genotype):
        raise ModelFileError(f"--genotype {genotype.name or ''} differs from the genotype stored "
                             f"in {weights} ({stored.to_dict()})")
    if scale is not None and scale != genotype.scale:
        raise ModelFileError(f"--scale {scale} does not match the network: the genotype and its "
                           f"weights are for x{genotype.scale}")
    try:
        return load_weights(build_net(genotype, str(weights)), weights,
                            trust_pickle=trust_pickle).eval()
    except WeightsError as e:
        raise ModelFileError(str(e)) from None


def _arch(g: Genotype) -> dict:
    d = g.to_dict()
    d.pop("name"), d.pop("notes")
    return d
