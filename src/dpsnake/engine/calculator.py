"""ASE calculator ``DP`` on the dpsnake engine (like ``deepmd.calculator.DP``).

Properties: energy, free_energy (= energy), forces (eV/A), stress (eV/A^3, Voigt 6, ASE sign:
stress = -0.5 (W + W^T) / volume; cells periodic in all directions only), energies (per atom, eV).
Periodicity per direction as ``atoms.pbc`` says: slabs (T, T, F) and wires (F, F, T) are imaged
along their periodic directions only (the cell rows along the others play no part).
"""

from __future__ import annotations

import numpy as np
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from dpsnake.engine.dispatch import make_ensemble
from dpsnake.errors import UserError


class DP(Calculator):
    """ASE calculator. model: path to a ``.dp`` file (or DPModel); type_dict: symbol -> type index
    (default from the model's type_map); precision "double" or "mixed"; ``settings``: an
    EngineSettings (as :class:`~dpsnake.engine.ensemble.Ensemble`)."""

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(
        self,
        model,
        label: str = "DP",
        type_dict: dict | None = None,
        precision: str = "double",
        settings=None,
        **kwargs,
    ):
        super().__init__(label=label, **kwargs)
        self.ensemble = make_ensemble([model], precision=precision, settings=settings)
        self.type_dict = type_dict or {s: k for k, s in enumerate(self.ensemble.type_map)}

    def calculate(self, atoms=None, properties=("energy", "forces"), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        try:
            atype = np.array([self.type_dict[s] for s in a.get_chemical_symbols()], dtype=np.int64)
        except KeyError as err:
            raise UserError(
                f"atoms: element {err.args[0]} is not in the model's type_map {self.ensemble.type_map}"
            ) from None
        pbc = np.array(a.pbc, dtype=bool)  # per direction: slabs (T T F) and wires (F F T) too
        n = len(a)
        out = self.ensemble.evaluate(
            a.positions,
            atype,
            np.zeros(n, dtype=np.int64),
            a.cell.array[None],
            pbc[None],
            atomic="energies" in properties,
        )
        e = float(out["energy"][0, 0])
        self.results["energy"] = e
        self.results["free_energy"] = e
        self.results["forces"] = np.asarray(out["force"][0])
        if "energies" in properties:
            self.results["energies"] = np.asarray(out["atom_energy"][0])
        if pbc.all():
            w = np.asarray(out["virial"][0]).reshape(3, 3)
            s = -0.5 * (w + w.T) / a.get_volume()
            self.results["stress"] = s.flat[[0, 4, 8, 5, 2, 1]]
        elif "stress" in properties:  # a slab's or wire's volume is not defined
            raise PropertyNotImplementedError("stress needs a cell periodic in all directions")
