"""One labelled frame on disk: extxyz with energy, forces, stress and provenance in ``info``.

A failed label is written to the same name (so a workflow rule has one fixed output), as the bare
structure with ``info["label_ok"] = False`` and ``info["label_reason"]``; it never enters a dataset.
"""

from __future__ import annotations

import pathlib

import numpy as np

from dpsnake.fsio import atomic_path
from dpsnake.labelers.base import LabelResult


def write_labeled(path, atoms, result: LabelResult, info: dict | None = None) -> None:
    """Write one frame with its label (or its failure reason) as extxyz, atomically."""
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    path = pathlib.Path(path)
    atoms = atoms.copy()
    atoms.calc = None
    atoms.info.update(info or {})
    atoms.info["label_ok"] = bool(result.ok)
    if result.ok:
        kwargs = {"energy": result.energy, "forces": np.asarray(result.forces)}
        if result.virial is not None:
            kwargs["stress"] = -np.asarray(result.virial).reshape(3, 3) / atoms.get_volume()
        atoms.calc = SinglePointCalculator(atoms, **kwargs)
    else:
        atoms.info["label_reason"] = str(result.reason).replace("\n", " ")
    with atomic_path(path, ".extxyz") as tmp:
        ase.io.write(tmp, atoms, format="extxyz")


def read_labeled(path):
    """Inverse of write_labeled: ``(atoms, ok, reason)``; ok atoms carry a SinglePointCalculator."""
    import ase.io

    atoms = ase.io.read(path, format="extxyz")
    ok = bool(atoms.info.get("label_ok", True))
    return atoms, ok, atoms.info.get("label_reason")
