"""VASP labeler: INCAR, KPOINTS, POSCAR and a POTCAR assembled from the user's POTCAR folder; OUTCAR
parsed with dpdata's ``vasp/outcar`` (or vasprun.xml with ``vasp/xml``).

POSCAR holds one block per element (atoms grouped in order of first appearance); the parsed
forces are mapped back to the frame's own atom order.

Config (``label:`` section, ``type: vasp``), see docs/labelers.md: ``potcar_dir``, ``potcars``
({element: path relative to potcar_dir}, default ``<element>/POTCAR``), ``incar`` (tags),
``kspacing`` (1/A, 2 pi included as VASP's KSPACING) or ``kpts``, ``gamma`` (Gamma-centred mesh,
default true), ``parser`` ("outcar", default, or "xml" for vasprun.xml), ``command`` (default
"vasp_std"; e.g. "mpirun -np {nproc} vasp_std"), ``nproc``,
``nthreads``, ``timeout``, ``env``, ``keep_scratch``.
"""

from __future__ import annotations

import pathlib
import re

from dpsnake.errors import UserError
from dpsnake.fsio import atomic_path, write_text_atomic
from dpsnake.labelers.base import LabelResult
from dpsnake.labelers.filebased import CommandLabeler, RunOutcome, kmesh, require_dir, result_from_system, species_order

# tags the labeler sets: one single point per frame, no big files left behind
FIXED = {"NSW": 0, "IBRION": -1}
DEFAULTS = {"LWAVE": False, "LCHARG": False, "NELM": 60}


def incar_value(value) -> str:
    """Python value -> INCAR text: booleans as .TRUE./.FALSE., lists space-joined."""
    if isinstance(value, bool):
        return ".TRUE." if value else ".FALSE."
    if isinstance(value, (list, tuple)):
        return " ".join(incar_value(v) for v in value)
    return str(value)


class VASPLabeler(CommandLabeler):
    """One VASP single point per frame (NSW = 0): energy (free energy TOTEN), forces, virial."""

    name = "vasp"
    input_name, output_name = "INCAR", "OUTCAR"
    stale = ("OUTCAR", "OSZICAR", "vasprun.xml", "CONTCAR")

    def __init__(
        self,
        potcar_dir: str,
        potcars: dict | None = None,
        incar: dict | None = None,
        kspacing: float | None = None,
        kpts=None,
        gamma: bool = True,
        command: str = "vasp_std",
        parser: str = "outcar",
        **run_keys,
    ):
        super().__init__(command, **run_keys)
        if parser not in ("outcar", "xml"):
            raise UserError(f"label.parser: 'outcar' (OUTCAR) or 'xml' (vasprun.xml), got {parser!r}")
        self.parser = parser
        self.potcar_dir = require_dir(potcar_dir, "label.potcar_dir").resolve()
        self.potcars = {str(k): str(v) for k, v in (potcars or {}).items()}
        for el in self.potcars:
            self._potcar(el)  # configured ones must exist now, before any frame
        incar = {str(k).upper(): v for k, v in (incar or {}).items()}
        for key in FIXED:
            if key in incar and incar[key] != FIXED[key]:
                raise UserError(f"label.incar.{key}: the labeler runs single points ({key} = {FIXED[key]}); remove it")
        self.incar = {**DEFAULTS, **incar, **FIXED}
        if not isinstance(self.incar["NELM"], int) or self.incar["NELM"] < 1:
            raise UserError(f"label.incar.NELM: must be a positive integer, got {self.incar['NELM']!r}")
        if kspacing is not None and kpts is not None:
            raise UserError("label.kspacing / label.kpts: give one of them, not both")
        if kspacing is not None and not (isinstance(kspacing, (int, float)) and kspacing > 0):
            raise UserError(f"label.kspacing: must be a positive number, got {kspacing!r}")
        if kpts is not None and not (
            isinstance(kpts, (list, tuple)) and len(kpts) == 3 and all(isinstance(k, int) and k > 0 for k in kpts)
        ):
            raise UserError(f"label.kpts: must be three positive integers, got {kpts!r}")
        if kspacing is None and kpts is None and "KSPACING" not in self.incar:
            raise UserError("label.kspacing: give kspacing (1/A) or kpts, or KSPACING in label.incar")
        self.kspacing, self.kpts, self.gamma = kspacing, kpts, bool(gamma)

    def check_elements(self, elements) -> None:
        """Check time: a POTCAR file for every element of the systems."""
        for el in sorted(set(elements)):
            self._potcar(el)

    def _potcar(self, element: str) -> pathlib.Path:
        rel = self.potcars.get(element, f"{element}/POTCAR")
        path = self.potcar_dir / rel
        if not path.is_file():
            raise UserError(f"label.potcars.{element}: POTCAR not found: {path}")
        return path

    def write_inputs(self, atoms, workdir: pathlib.Path) -> dict:
        import ase.io

        elements, order = species_order(atoms.get_chemical_symbols())
        potcar = "".join(self._potcar(el).read_text() for el in elements)
        incar = dict(self.incar)
        incar.setdefault("ISIF", 2 if atoms.pbc.all() else 0)  # 2: stress without relaxing anything
        write_text_atomic(workdir / "INCAR", "".join(f"{k} = {incar_value(v)}\n" for k, v in incar.items()))
        write_text_atomic(workdir / "POTCAR", potcar)
        if self.kspacing is not None or self.kpts is not None:
            mesh = kmesh(atoms, self.kspacing) if self.kspacing is not None else list(self.kpts)
            style = "Gamma" if self.gamma else "Monkhorst-Pack"
            write_text_atomic(workdir / "KPOINTS", f"dpsnake mesh\n0\n{style}\n{mesh[0]} {mesh[1]} {mesh[2]}\n0 0 0\n")
        with atomic_path(workdir / "POSCAR") as tmp:
            ase.io.write(tmp, atoms[order], format="vasp", direct=True, vasp5=True)
        return {"order": order, "periodic": bool(atoms.pbc.all()), "stdout": "stdout", "nelm": incar["NELM"]}

    def parse(self, atoms, workdir: pathlib.Path, outcome: RunOutcome, ctx: dict) -> LabelResult:
        if self.parser == "xml":
            return self.parse_xml(atoms, workdir, outcome, ctx)
        import dpdata

        out = workdir / "OUTCAR"
        text = out.read_text(errors="replace") if out.is_file() else ""
        if outcome.returncode is None:
            return LabelResult.failed(outcome.reason)
        if not text.strip():
            return LabelResult.failed("missing output OUTCAR" + (f"; {outcome.reason}" if outcome.reason else ""))
        steps = [int(m) for m in re.findall(r"Iteration\s+\d+\(\s*(\d+)\)", text)]
        nelm = re.search(r"NELM\s*=\s*(\d+)", text)
        nelm = int(nelm.group(1)) if nelm else ctx["nelm"]
        if (
            "EDIFF was not reached" in text
            or (steps and max(steps) >= nelm)
            or "aborting loop because EDIFF is reached" not in text
        ):
            nsteps = max(steps) if steps else 0
            return LabelResult.failed(f"SCF not converged (electronic steps: {nsteps}, NELM = {nelm})")
        if outcome.reason:
            return LabelResult.failed(outcome.reason)
        if "General timing and accounting" not in text:
            return LabelResult.failed("OUTCAR is incomplete (no final timing section): the run was interrupted")
        system = dpdata.LabeledSystem(str(out), fmt="vasp/outcar")
        if ctx["periodic"] and "virials" not in system.data:
            return LabelResult.failed("no stress in OUTCAR (set ISIF >= 1)")
        return result_from_system(system, atoms, order=ctx["order"])

    def parse_xml(self, atoms, workdir: pathlib.Path, outcome: RunOutcome, ctx: dict) -> LabelResult:
        """vasprun.xml with dpdata's ``vasp/xml``: converged when the last calculation's electronic
        steps stay below NELM (dpdata's own criterion); complete when the file closes </modeling>."""
        import dpdata

        out = workdir / "vasprun.xml"
        text = out.read_text(errors="replace") if out.is_file() else ""
        if outcome.returncode is None:
            return LabelResult.failed(outcome.reason)
        if not text.strip():
            return LabelResult.failed("missing output vasprun.xml" + (f"; {outcome.reason}" if outcome.reason else ""))
        last = text[text.rfind("<calculation>") :]
        nsteps = last.count("<scstep>")
        nelm = re.search(r'name="NELM">\s*(\d+)', text)
        nelm = int(nelm.group(1)) if nelm else ctx["nelm"]
        if nsteps >= nelm:
            return LabelResult.failed(f"SCF not converged (electronic steps: {nsteps}, NELM = {nelm})")
        if outcome.reason:
            return LabelResult.failed(outcome.reason)
        if "</modeling>" not in text:
            return LabelResult.failed("vasprun.xml is incomplete (no closing </modeling>): the run was interrupted")
        system = dpdata.LabeledSystem(str(out), fmt="vasp/xml")
        if ctx["periodic"] and "virials" not in system.data:
            return LabelResult.failed("no stress in vasprun.xml (set ISIF >= 1)")
        return result_from_system(system, atoms, order=ctx["order"])

    def cleanup(self, workdir: pathlib.Path) -> None:
        for name in ("WAVECAR", "CHGCAR", "CHG", "WAVEDER", "PROCAR", "vaspout.h5"):
            (workdir / name).unlink(missing_ok=True)
