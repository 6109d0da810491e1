"""Versions of the run files: ``config.json`` and ``checkpoint.pt`` of a search or a retraining
carry ``schema`` (an integer) and ``kind`` (``hdnas-search`` or ``hdnas-train``).

Schema 1 is the format from before versioning (no ``schema`` key); schema 2 adds the two keys
and nothing else. Reading goes through ``upgrade``: an older file is migrated step by step
(``MIGRATIONS[v]`` turns version v into v + 1), transparently; a newer or unknown version, or a
file of the other kind, is a ``SchemaError`` that names the file and the versions.
"""
from __future__ import annotations

SCHEMA = 2
KINDS = ("hdnas-search", "hdnas-train")


class SchemaError(ValueError):
    """A run file of a version this code does not read, or of the other kind."""


def stamp(doc: dict, kind: str) -> dict:
    """``doc`` with this version's ``schema`` and ``kind`` as its first keys."""
    return {"schema": SCHEMA, "kind": kind,
            **{k: v for k, v in doc.items() if k not in ("schema", "kind")}}


def _v1_kind(doc: dict) -> str | None:
    """The kind of an unversioned file, told by what it holds: the search's resolved config has a
    rule and its checkpoint an architecture optimizer; the retraining's a genotype and ``opt``."""
    keys = set(doc["resolved"]) if isinstance(doc.get("resolved"), dict) else set(doc)
    if keys & {"rule", "a_opt"}:
        return "hdnas-search"
    if keys & {"genotype", "opt"}:
        return "hdnas-train"
    return None


def _v1_to_v2(doc: dict, kind: str) -> dict:
    return stamp(doc, kind)


MIGRATIONS = {1: _v1_to_v2}


def _command(kind: str) -> str:
    return f"python -m hdnas.{kind.removeprefix('hdnas-')}" if kind in KINDS else "another program"


def upgrade(doc: dict, kind: str, path) -> dict:
    """``doc``, read from ``path``, as this version writes it, for a run of ``kind``."""
    version = doc.get("schema", 1)
    found = doc.get("kind") or (_v1_kind(doc) if version == 1 else None)
    known = isinstance(version, int) and not isinstance(version, bool)
    if not known or not 1 <= version <= SCHEMA:
        why = "newer than" if known and version > SCHEMA else "not a version"
        raise SchemaError(f"{path}: schema {version!r} ({found or 'unknown kind'}) is {why} this "
                          f"hdnas reads (schema 1 to {SCHEMA}); resume it with the hdnas that "
                          "wrote it")
    if found is not None and found != kind:
        raise SchemaError(f"{path} is a {found} file (schema {version}), not {kind} (schema "
                          f"{SCHEMA}): resume it with {_command(found)}")
    while version < SCHEMA:
        doc, version = MIGRATIONS[version](doc, kind), version + 1
    return doc
