"""The labeler interface: one frame in; energy, forces, virial out, or a failure with its reason."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Protocol

import numpy as np


@dataclasses.dataclass
class LabelResult:
    """Outcome of labelling one frame.

    energy: total energy (eV); forces: (natoms, 3) eV/A; virial: (3, 3) eV, None when not periodic;
    ok False means the frame must never enter the dataset, and reason says why.
    """

    ok: bool
    energy: float | None = None
    forces: np.ndarray | None = None
    virial: np.ndarray | None = None
    reason: str | None = None

    @classmethod
    def failed(cls, reason: str) -> LabelResult:
        return cls(ok=False, reason=reason)


class Labeler(Protocol):
    """Anything with ``label(atoms, workdir) -> LabelResult``. Never raises for a failed calculation."""

    name: str

    def label(self, atoms, workdir: pathlib.Path) -> LabelResult: ...


def sanity_check(result: LabelResult, natoms: int, max_force: float | None) -> LabelResult:
    """Turn results that cannot be trusted (NaN, wrong shape, forces above a cap) into failures."""
    if not result.ok:
        return result
    if result.energy is None or not np.isfinite(result.energy):
        return LabelResult.failed(f"energy is missing or not finite: {result.energy}")
    f = None if result.forces is None else np.asarray(result.forces, dtype=float)
    if f is None or f.shape != (natoms, 3):
        return LabelResult.failed(f"forces have shape {None if f is None else f.shape}, expected ({natoms}, 3)")
    if not np.all(np.isfinite(f)):
        return LabelResult.failed("forces contain NaN or inf")
    fmax = float(np.linalg.norm(f, axis=1).max()) if natoms else 0.0
    if max_force is not None and fmax > max_force:
        return LabelResult.failed(f"max force {fmax:.3g} eV/A above the sanity cap {max_force:g} eV/A")
    if result.virial is not None:
        v = np.asarray(result.virial, dtype=float).reshape(3, 3)
        if not np.all(np.isfinite(v)):
            return LabelResult.failed("virial contains NaN or inf")
        result.virial = v
    result.forces = f
    return result
