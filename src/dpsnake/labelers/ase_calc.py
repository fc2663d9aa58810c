"""Label with any ASE calculator, named by import path or by a short name (EMT is the default)."""

from __future__ import annotations

import importlib
import pathlib

import numpy as np

from dpsnake.errors import UserError
from dpsnake.labelers.base import LabelResult

SHORT_NAMES = {
    "EMT": "ase.calculators.emt.EMT",
    "LennardJones": "ase.calculators.lj.LennardJones",
    "MorsePotential": "ase.calculators.morse.MorsePotential",
}


def import_calculator(name: str):
    """'EMT' or 'package.module.Class' -> the calculator class; one clear error if it is not there."""
    path = SHORT_NAMES.get(name, name)
    module, _, cls = path.rpartition(".")
    if not module:
        raise UserError(f"label.calculator: {name!r} is neither a known short name "
                        f"({', '.join(SHORT_NAMES)}) nor a 'module.Class' path")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as err:
        raise UserError(f"label.calculator: cannot import {path!r}: {err}") from None


class ASELabeler:
    """Runs ``atoms.calc = Calculator(**kwargs)`` and reads energy, forces and (if periodic) stress."""

    def __init__(self, calculator: str = "EMT", kwargs: dict | None = None):
        self.name = f"ase:{calculator}"
        self.cls = import_calculator(calculator)
        self.kwargs = dict(kwargs or {})

    def label(self, atoms, workdir: pathlib.Path) -> LabelResult:
        atoms = atoms.copy()
        try:
            atoms.calc = self.cls(**self.kwargs)
            energy = float(atoms.get_potential_energy())
            forces = np.array(atoms.get_forces())
            virial = None
            if atoms.pbc.all():
                # ASE stress (Voigt, eV/A^3) -> virial = -stress * volume (DeePMD-kit / dpdata convention)
                virial = -atoms.get_stress(voigt=False) * atoms.get_volume()
        except Exception as err:  # a calculator failure is a failed label, not a crash of the job
            return LabelResult.failed(f"{type(err).__name__}: {err}")
        return LabelResult(ok=True, energy=energy, forces=forces, virial=virial)
