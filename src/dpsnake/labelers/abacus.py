"""ABACUS labeler: INPUT, STRU (written by dpdata) and KPT; output parsed with dpdata's ``abacus/scf``.

STRU holds one block per element (atoms grouped in order of first appearance); the parsed forces
are mapped back to the frame's own atom order.

Config (``label:`` section, ``type: abacus``), see docs/labelers.md: ``pseudo_dir``,
``pseudopotentials`` {element: file}, ``basis_type`` ("pw" default, or "lcao" with ``orbital_dir``
and ``orbitals`` {element: file}), ``ecutwfc`` (Ry), ``kspacing`` (1/A, 2 pi included) or
``kpts``, ``smearing_method`` / ``smearing_sigma`` (Ry), ``input`` (extra INPUT keys),
``command`` (default "abacus"; e.g. "mpirun -np {nproc} abacus"), ``nproc``, ``nthreads``,
``timeout``, ``env``, ``keep_scratch``.
"""

from __future__ import annotations

import pathlib
import re
import shutil

from dpsnake.errors import UserError
from dpsnake.fsio import atomic_path, write_text_atomic
from dpsnake.labelers.base import LabelResult
from dpsnake.labelers.filebased import (
    CommandLabeler,
    RunOutcome,
    kmesh,
    require_dir,
    require_pseudopotentials,
    result_from_system,
    species_order,
)

SUFFIX = "dpsnake"
OWNED = (
    "suffix",
    "calculation",
    "cal_force",
    "cal_stress",
    "pseudo_dir",
    "orbital_dir",
    "stru_file",
    "kpoint_file",
    "ntype",
)


def _input_value(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


class ABACUSLabeler(CommandLabeler):
    """One ABACUS SCF per frame: energy, forces and (periodic frames) virial."""

    name = "abacus"
    input_name, output_name = "INPUT", f"OUT.{SUFFIX}/running_scf.log"
    stale = (f"OUT.{SUFFIX}",)

    def __init__(
        self,
        pseudo_dir: str,
        pseudopotentials: dict,
        ecutwfc: float,
        basis_type: str = "pw",
        orbital_dir: str | None = None,
        orbitals: dict | None = None,
        kspacing: float | None = None,
        kpts=None,
        smearing_method: str | None = None,
        smearing_sigma: float | None = None,
        input: dict | None = None,
        command: str = "abacus",
        **run_keys,
    ):
        super().__init__(command, **run_keys)
        self.pseudo_dir, self.pseudopotentials = require_pseudopotentials(pseudo_dir, pseudopotentials)
        if basis_type not in ("pw", "lcao"):
            raise UserError(f"label.basis_type: 'pw' or 'lcao', got {basis_type!r}")
        self.orbital_dir, self.orbitals = None, None
        if basis_type == "lcao":
            if orbital_dir is None or not orbitals:
                raise UserError("label.orbitals: basis_type lcao needs orbital_dir and orbitals {element: file}")
            self.orbital_dir = require_dir(orbital_dir, "label.orbital_dir").resolve()
            for el, fname in orbitals.items():
                if not (self.orbital_dir / str(fname)).is_file():
                    raise UserError(f"label.orbitals.{el}: {fname!r} not found in {self.orbital_dir}")
            self.orbitals = {str(k): str(v) for k, v in orbitals.items()}
        if not (isinstance(ecutwfc, (int, float)) and ecutwfc > 0):
            raise UserError(f"label.ecutwfc: must be a positive number (Ry), got {ecutwfc!r}")
        if kspacing is not None and kpts is not None:
            raise UserError("label.kspacing / label.kpts: give one of them, not both")
        if kspacing is not None and not (isinstance(kspacing, (int, float)) and kspacing > 0):
            raise UserError(f"label.kspacing: must be a positive number, got {kspacing!r}")
        if kpts is not None and not (
            isinstance(kpts, (list, tuple)) and len(kpts) == 3 and all(isinstance(k, int) and k > 0 for k in kpts)
        ):
            raise UserError(f"label.kpts: must be three positive integers, got {kpts!r}")
        extra = {str(k): v for k, v in (input or {}).items()}
        for key in OWNED:
            if key in extra:
                raise UserError(f"label.input.{key}: set by the labeler itself; remove it")
        self.input = {"basis_type": basis_type, "ecutwfc": ecutwfc, **extra}
        if smearing_method is not None:
            self.input["smearing_method"] = smearing_method
        if smearing_sigma is not None:
            self.input["smearing_sigma"] = smearing_sigma
        self.kspacing, self.kpts = kspacing, kpts

    def check_elements(self, elements) -> None:
        """Check time: a pseudopotential (and orbital file with lcao) for every element of the systems."""
        for key, table in (("pseudopotentials", self.pseudopotentials), ("orbitals", self.orbitals)):
            missing = sorted(set(elements) - set(table)) if table is not None else []
            if missing:
                raise UserError(f"label.{key}: no entry for element(s) {missing} of the systems")

    def write_inputs(self, atoms, workdir: pathlib.Path) -> dict:
        import dpdata

        elements, order = species_order(atoms.get_chemical_symbols())
        missing = [el for el in elements if el not in self.pseudopotentials]
        if missing:
            raise UserError(f"label.pseudopotentials: no pseudopotential for element(s) {missing}")
        if self.orbitals is not None and any(el not in self.orbitals for el in elements):
            raise UserError(
                f"label.orbitals: no orbital file for element(s) {[el for el in elements if el not in self.orbitals]}"
            )
        periodic = bool(atoms.pbc.all())
        keys = {
            "suffix": SUFFIX,
            "calculation": "scf",
            "cal_force": 1,
            "cal_stress": int(periodic),
            "pseudo_dir": str(self.pseudo_dir),
            "stru_file": "STRU",
            "kpoint_file": "KPT",
            "ntype": len(elements),
            **self.input,
        }
        if self.orbital_dir is not None:
            keys["orbital_dir"] = str(self.orbital_dir)
        write_text_atomic(
            workdir / "INPUT", "INPUT_PARAMETERS\n" + "".join(f"{k:<20s} {_input_value(v)}\n" for k, v in keys.items())
        )
        mesh = [1, 1, 1]
        if self.kspacing is not None:
            mesh = kmesh(atoms, self.kspacing)
        elif self.kpts is not None:
            mesh = list(self.kpts)
        write_text_atomic(workdir / "KPT", f"K_POINTS\n0\nGamma\n{mesh[0]} {mesh[1]} {mesh[2]} 0 0 0\n")
        grouped = atoms[order]
        system = dpdata.System(grouped, fmt="ase/structure")
        if list(system["atom_names"]) != elements:  # STRU blocks follow atom_names: must match our order
            raise RuntimeError(f"dpdata ordered species {system['atom_names']}, expected {elements}")
        from ase.data import atomic_masses, atomic_numbers

        kwargs = {
            "pp_file": {el: self.pseudopotentials[el] for el in elements},
            "mass": [float(atomic_masses[atomic_numbers[el]]) for el in elements],
        }
        if self.orbitals is not None:
            kwargs["numerical_orbital"] = {el: self.orbitals[el] for el in elements}
        with atomic_path(workdir / "STRU") as tmp:
            system.to("abacus/stru", str(tmp), **kwargs)
        return {"order": order, "periodic": periodic, "stdout": "stdout"}

    def parse(self, atoms, workdir: pathlib.Path, outcome: RunOutcome, ctx: dict) -> LabelResult:
        import dpdata

        log = workdir / f"OUT.{SUFFIX}" / "running_scf.log"
        text = log.read_text(errors="replace") if log.is_file() else ""
        if outcome.returncode is None:
            return LabelResult.failed(outcome.reason)
        if not text.strip():
            return LabelResult.failed(
                f"missing output OUT.{SUFFIX}/running_scf.log" + (f"; {outcome.reason}" if outcome.reason else "")
            )
        if re.search(r"convergence has not been achieved", text, re.I):
            return LabelResult.failed("SCF not converged (ABACUS: 'convergence has NOT been achieved')")
        if outcome.reason:
            return LabelResult.failed(outcome.reason)
        if not re.search(r"final etot is|TOTAL ENERGY", text):
            return LabelResult.failed("no final energy in running_scf.log (run interrupted?)")
        if "TOTAL-FORCE" not in text:
            return LabelResult.failed("no forces in running_scf.log (cal_force)")
        if ctx["periodic"] and "TOTAL-STRESS" not in text:
            return LabelResult.failed("no stress in running_scf.log (cal_stress)")
        system = dpdata.LabeledSystem(str(workdir), fmt="abacus/scf")
        if ctx["periodic"] and "virials" not in system.data:
            return LabelResult.failed("the ABACUS parser found no stress")
        return result_from_system(system, atoms, order=ctx["order"])

    def cleanup(self, workdir: pathlib.Path) -> None:
        out = workdir / f"OUT.{SUFFIX}"
        for pattern in ("*.cube", "SPIN*_CHG*", "WAVEFUNC*", "*.dat"):  # charge densities, wavefunctions
            for path in out.glob(pattern):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
