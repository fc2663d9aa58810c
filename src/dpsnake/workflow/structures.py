"""Start structures of the systems: a file ASE reads, or an ASE builder call, optionally substituted
and transformed (surfaces, supercells, alloys, defects, strain: dpsnake.workflow.generators).

``fingerprint`` records where a structure came from (the file's content hash, the spec's hash), so
data built from it can later be compared with the current file (the report names data labelled
from an older version of a structure file).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import pathlib

import numpy as np

from dpsnake.errors import UserError


def _builder(name: str, key: str):
    module, _, func = name.rpartition(".")
    module = module or "ase.build"
    try:
        return getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError):
        raise UserError(f"{key}.builder: {name!r} is not a function of ase.build nor a module.function path") from None


def build_structure(spec: dict, base: pathlib.Path | str = ".", key: str = "structure"):
    """spec: {'file', 'format', 'index'} or {'builder', 'kwargs'}; then 'repeat' (3 ints),
    'substitute' {'from', 'to', 'fraction', 'seed'} and the 'transform' steps (dpsnake.workflow.generators:
    supercell, surface, alloy, vacancies, interstitials, strain). Returns an ase.Atoms (cell rows =
    lattice vectors, A)."""
    import ase.io

    if "file" in spec:
        path = pathlib.Path(spec["file"])
        path = path if path.is_absolute() else pathlib.Path(base) / path
        if not path.is_file():
            raise UserError(f"{key}.file: {spec['file']}: no such file")
        try:
            atoms = ase.io.read(path, index=spec.get("index", 0), format=spec.get("format"))
        except Exception as err:  # ASE raises many kinds for unreadable files
            raise UserError(f"{key}.file: {spec['file']}: ASE cannot read it ({type(err).__name__}: {err})") from None
    elif "random" in spec:  # AIRSS-style: a random cell and positions (dpsnake.workflow.random_structures)
        from dpsnake.workflow.random_structures import random_structure

        atoms = random_structure(spec["random"], f"{key}.random")
    else:
        try:
            atoms = _builder(spec["builder"], key)(**(spec.get("kwargs") or {}))
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"{key}: {spec['builder']}(**kwargs) failed: {type(err).__name__}: {err}") from None
    if spec.get("repeat"):
        atoms = atoms.repeat(tuple(spec["repeat"]))
    sub = spec.get("substitute")
    if sub:
        symbols = np.array(atoms.get_chemical_symbols())
        idx = np.flatnonzero(symbols == sub["from"])
        if not len(idx):
            raise UserError(f"{key}.substitute.from: no {sub['from']!r} atoms in the structure")
        rng = np.random.default_rng(sub.get("seed", 0))
        n = int(round(sub["fraction"] * len(idx)))
        symbols[rng.choice(idx, size=n, replace=False)] = sub["to"]
        atoms.set_chemical_symbols(list(symbols))
    if spec.get("transform"):
        from dpsnake.workflow.generators import apply

        atoms = apply(atoms, spec["transform"], f"{key}.transform")
    if len(atoms) == 0:
        raise UserError(f"{key}: the structure has no atoms")
    return atoms


def with_masses(atoms, masses: dict):
    """Set per-atom masses (amu) from a {symbol: mass} mapping; others keep ASE's standard masses."""
    if masses:
        m = atoms.get_masses()
        for i, s in enumerate(atoms.get_chemical_symbols()):
            if s in masses:
                m[i] = masses[s]
        atoms.set_masses(m)
    return atoms


def file_sha256(path) -> str | None:
    """sha256 of a file's bytes (hex), None if it does not exist."""
    path = pathlib.Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def path_sha256(path) -> str | None:
    """sha256 of a file, or of a folder's files (relative names and bytes, sorted); None if absent."""
    path = pathlib.Path(path)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + bytes.fromhex(file_sha256(f)))
    return h.hexdigest()


def path_stat(path) -> list[int] | None:
    """[files, bytes, latest mtime (ns)] of a file or folder: a cheap "unchanged" check before hashing
    a large dataset again. None if absent."""
    path = pathlib.Path(path)
    files = [path] if path.is_file() else sorted(q for q in path.rglob("*") if q.is_file()) if path.is_dir() else None
    if files is None:
        return None
    st = [f.stat() for f in files]
    return [len(st), sum(s.st_size for s in st), max((s.st_mtime_ns for s in st), default=0)]


def fingerprint(spec: dict, base: pathlib.Path | str = ".") -> dict:
    """Where a structure comes from: {"file": path as configured, "sha256": of its bytes (None when the
    file is missing)} for a file, {"builder": name} for a builder; both with "spec_sha256", the hash of
    the whole spec (repeat, substitute, index, ... change the structure too)."""
    out = {"spec_sha256": hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()}
    if "file" in spec:
        path = pathlib.Path(spec["file"])
        out |= {
            "file": str(spec["file"]),
            "sha256": file_sha256(path if path.is_absolute() else pathlib.Path(base) / path),
        }
    else:
        out["builder"] = spec.get("builder")
    return out


def changed(recorded: dict | None, current: dict | None) -> str | None:
    """How the structure a piece of data was built from differs from the current one, in words, or None
    (same, or nothing recorded). ``recorded``/``current``: ``fingerprint`` dicts."""
    if not recorded or not current:
        return None
    if recorded.get("file") != current.get("file"):
        was = recorded.get("file") or f"builder {recorded.get('builder')}"
        now = current.get("file") or f"builder {current.get('builder')}"
        return f"built from {was}; the config now names {now}"
    if recorded.get("file") and recorded.get("sha256") != current.get("sha256"):
        if current.get("sha256") is None:
            return f"built from {recorded['file']}, which no longer exists"
        return (
            f"built from an older version of {recorded['file']} (sha256 {str(recorded.get('sha256'))[:12]}, "
            f"now {current['sha256'][:12]})"
        )
    if recorded.get("spec_sha256") != current.get("spec_sha256"):
        return "built from an older version of the system's structure settings in the config"
    return None
