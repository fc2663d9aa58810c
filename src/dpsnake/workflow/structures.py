"""Start structures of the systems: a file ASE reads, or an ASE builder call, optionally substituted."""

from __future__ import annotations

import importlib
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
    """spec: {'file', 'format', 'index'} or {'builder', 'kwargs'}; then 'repeat' (3 ints) and
    'substitute' {'from', 'to', 'fraction', 'seed'}. Returns an ase.Atoms (cell rows = lattice vectors, A)."""
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
