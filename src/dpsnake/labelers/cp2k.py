"""CP2K labeler: an input template filled from the config and the frame, cp2k run, dpdata parses.

The parser is dpdata's ``cp2k/output`` as replaced by the ``cp2kdata`` plugin (pip install cp2kdata):
dpdata's own reader finds no stress in CP2K 2023 output.

Config (``label:`` section, ``type: cp2k``), see docs/labelers.md: ``template`` (a CP2K input file
with the markers ``{{CELL}}``, ``{{COORD}}``, ``{{KINDS}}`` and optionally ``{{KPOINTS}}``,
``{{POISSON}}``, ``{{STRESS}}`` and the config-filled ones; default:
the built-in Quickstep PBE template below), ``data_dir`` (default /usr/share/cp2k), ``basis_set_file``,
``potential_file``, ``basis`` / ``potential`` ({element: name} or one name for all), ``cutoff`` and
``rel_cutoff`` (Ry), ``xc``, ``kspacing`` or ``kpts``, ``smearing_temperature`` (K, adds Fermi-Dirac
smearing), ``added_mos``, ``charge``, ``multiplicity``, ``max_scf``, ``eps_scf``, ``command``
(default "cp2k -i {input}"), ``nproc``, ``nthreads``, ``timeout``, ``env``, ``keep_scratch``.
"""

from __future__ import annotations

import pathlib
import re

import numpy as np

from dpsnake.errors import UserError
from dpsnake.fsio import write_text_atomic
from dpsnake.labelers.base import LabelResult
from dpsnake.labelers.filebased import CommandLabeler, RunOutcome, kmesh, require_dir, require_file, result_from_system

MARKERS = ("{{CELL}}", "{{COORD}}", "{{KINDS}}")

# {{NAME}} markers, replaced literally (CP2K's own ${VAR} syntax is left alone): CELL, COORD, KINDS,
# KPOINTS, POISSON, STRESS per frame; the others from the config
DEFAULT_TEMPLATE = """\
&GLOBAL
  PROJECT dpsnake
  RUN_TYPE ENERGY_FORCE
  PRINT_LEVEL MEDIUM
&END GLOBAL
&FORCE_EVAL
  METHOD Quickstep
  STRESS_TENSOR {{STRESS}}
  &DFT
    BASIS_SET_FILE_NAME {{BASIS_SET_FILE}}
    POTENTIAL_FILE_NAME {{POTENTIAL_FILE}}
    CHARGE {{CHARGE}}
    MULTIPLICITY {{MULTIPLICITY}}
    {{UKS}}
    {{POISSON}}
    &MGRID
      CUTOFF {{CUTOFF}}
      REL_CUTOFF {{REL_CUTOFF}}
    &END MGRID
    &QS
      EPS_DEFAULT 1.0E-12
    &END QS
    &SCF
      SCF_GUESS ATOMIC
      EPS_SCF {{EPS_SCF}}
      MAX_SCF {{MAX_SCF}}
      {{ADDED_MOS}}
      &DIAGONALIZATION
        ALGORITHM STANDARD
      &END DIAGONALIZATION
      &MIXING
        METHOD BROYDEN_MIXING
        ALPHA 0.4
      &END MIXING
      {{SMEAR}}
    &END SCF
    &XC
      &XC_FUNCTIONAL {{XC}}
      &END XC_FUNCTIONAL
    &END XC
    {{KPOINTS}}
  &END DFT
  &SUBSYS
    {{CELL}}
    {{COORD}}
    {{KINDS}}
  &END SUBSYS
  &PRINT
    &FORCES ON
    &END FORCES
    &STRESS_TENSOR ON
    &END STRESS_TENSOR
  &END PRINT
&END FORCE_EVAL
"""


def abort_message(text: str) -> str:
    """The message inside CP2K's [ABORT] box, as one line (the ASCII art and source location dropped)."""
    lines = text[text.index("[ABORT]") :].splitlines()[1:]
    words = []
    for line in lines:
        if line.strip().startswith("*****"):
            break
        body = line.strip().strip("*")
        body = re.sub(r"\S+\.F:\d+\s*$", "", body)  # source file and line
        words += re.sub(r"^[\s\\_/|O]*", "", body).split()
    return " ".join(words)


def _per_element(value, key: str) -> dict | str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return {str(k): v for k, v in value.items()}
    raise UserError(f"label.{key}: give one name for all elements or a mapping element -> name")


class CP2KLabeler(CommandLabeler):
    """One CP2K ENERGY_FORCE run per frame: energy, forces and (periodic frames) virial."""

    name = "cp2k"
    input_name = "cp2k.inp"
    output_name = "cp2k.out"
    stale = ("cp2k.out",)

    def __init__(
        self,
        template: str | None = None,
        data_dir: str = "/usr/share/cp2k",
        basis_set_file: str = "BASIS_MOLOPT",
        potential_file: str = "GTH_POTENTIALS",
        basis="DZVP-MOLOPT-SR-GTH",
        potential="GTH-PBE",
        cutoff: float = 400,
        rel_cutoff: float = 50,
        xc: str = "PBE",
        kspacing: float | None = None,
        kpts=None,
        smearing_temperature: float | None = None,
        added_mos: int = 20,
        charge: int = 0,
        multiplicity: int = 1,
        max_scf: int = 100,
        eps_scf: float = 1e-7,
        command: str = "cp2k -i {input}",
        **run_keys,
    ):
        super().__init__(command, **run_keys)
        if template is None:
            self.template = DEFAULT_TEMPLATE
        else:
            self.template = require_file(template, "label.template").read_text()
        for marker in MARKERS:
            if marker not in self.template:
                raise UserError(f"label.template: {template} lacks the marker {marker} (inside &SUBSYS)")
        if kspacing is not None and kpts is not None:
            raise UserError("label.kspacing / label.kpts: give one of them, not both")
        if (kspacing is not None or kpts is not None) and "{{KPOINTS}}" not in self.template:
            raise UserError("label.template: k-points are set but the template lacks the marker {{KPOINTS}}")
        for key, val in (
            ("cutoff", cutoff),
            ("rel_cutoff", rel_cutoff),
            ("eps_scf", eps_scf),
            ("kspacing", kspacing),
            ("smearing_temperature", smearing_temperature),
        ):
            if val is not None and not (isinstance(val, (int, float)) and val > 0):
                raise UserError(f"label.{key}: must be a positive number, got {val!r}")
        if kpts is not None and not (
            isinstance(kpts, (list, tuple)) and len(kpts) == 3 and all(isinstance(k, int) and k > 0 for k in kpts)
        ):
            raise UserError(f"label.kpts: must be three positive integers, got {kpts!r}")
        data = require_dir(data_dir, "label.data_dir")
        # file names are looked up in data_dir unless given as paths
        files = {}
        for key, name in (("basis_set_file", basis_set_file), ("potential_file", potential_file)):
            path = pathlib.Path(name)
            files[key] = require_file(path if path.is_absolute() else data / path, f"label.{key}").resolve()
        self.basis = _per_element(basis, "basis")
        self.potential = _per_element(potential, "potential")
        self.kspacing, self.kpts = kspacing, kpts
        smear = ""
        mos = ""
        if smearing_temperature is not None:
            mos = f"ADDED_MOS {int(added_mos)}"
            smear = (
                "&SMEAR ON\n        METHOD FERMI_DIRAC\n"
                f"        ELECTRONIC_TEMPERATURE [K] {smearing_temperature:g}\n      &END SMEAR"
            )
        self.fields = {
            "{{BASIS_SET_FILE}}": str(files["basis_set_file"]),
            "{{POTENTIAL_FILE}}": str(files["potential_file"]),
            "{{CHARGE}}": str(int(charge)),
            "{{MULTIPLICITY}}": str(int(multiplicity)),
            "{{UKS}}": "UKS" if int(multiplicity) != 1 else "",
            "{{CUTOFF}}": f"{cutoff:g}",
            "{{REL_CUTOFF}}": f"{rel_cutoff:g}",
            "{{EPS_SCF}}": f"{eps_scf:g}",
            "{{MAX_SCF}}": str(int(max_scf)),
            "{{ADDED_MOS}}": mos,
            "{{SMEAR}}": smear,
            "{{XC}}": str(xc),
        }

    def check_elements(self, elements) -> None:
        """Check time: a basis set and a potential named for every element of the systems."""
        for el in sorted(set(elements)):
            self._lookup(self.basis, el, "basis")
            self._lookup(self.potential, el, "potential")

    def _lookup(self, table, element: str, key: str) -> str:
        if isinstance(table, str):
            return table
        if element not in table:
            raise UserError(f"label.{key}: no entry for element {element}")
        return table[element]

    def render(self, atoms) -> str:
        """The CP2K input for one frame (cell rows in A, Cartesian coordinates in A)."""
        periodic = bool(atoms.pbc.all())
        cell = atoms.cell.array
        if abs(np.linalg.det(cell)) < 1e-8:
            raise UserError("label: CP2K needs a cell (a box) even for molecules; the frame has none")
        pbc = "".join(ax for ax, p in zip("XYZ", atoms.pbc) if p) or "NONE"
        lines = ["&CELL"] + [f"      {ax} {v[0]:.10f} {v[1]:.10f} {v[2]:.10f}" for ax, v in zip("ABC", cell)]
        lines += [f"      PERIODIC {pbc}", "    &END CELL"]
        cell_block = "\n".join(lines)
        coord = (
            ["&COORD"]
            + [f"      {a.symbol} {a.position[0]:.10f} {a.position[1]:.10f} {a.position[2]:.10f}" for a in atoms]
            + ["    &END COORD"]
        )
        kinds = []
        for el in dict.fromkeys(atoms.get_chemical_symbols()):
            kinds += [
                f"&KIND {el}",
                f"      BASIS_SET {self._lookup(self.basis, el, 'basis')}",
                f"      POTENTIAL {self._lookup(self.potential, el, 'potential')}",
                "    &END KIND",
            ]
        kblock = ""
        if self.kspacing is not None or self.kpts is not None:
            mesh = kmesh(atoms, self.kspacing) if self.kspacing is not None else list(self.kpts)
            kblock = (
                f"&KPOINTS\n      SCHEME MONKHORST-PACK {mesh[0]} {mesh[1]} {mesh[2]}\n"
                "      SYMMETRY OFF\n    &END KPOINTS"
            )
        fields = dict(self.fields)
        fields.update(
            {
                "{{CELL}}": cell_block,
                "{{COORD}}": "\n".join(coord),
                "{{KINDS}}": "\n    ".join(kinds),
                "{{KPOINTS}}": kblock,
                "{{STRESS}}": "ANALYTICAL" if periodic else "NONE",
                # molecules and slabs: the Poisson solver's periodicity must match the cell's
                "{{POISSON}}": ""
                if periodic
                else f"&POISSON\n      PERIODIC {pbc}\n      PSOLVER MT\n    &END POISSON",
            }
        )
        text = self.template
        for key, val in fields.items():
            text = text.replace(key, val)
        left = sorted(set(re.findall(r"\{\{[A-Z_]+\}\}", text)))
        if left:
            raise UserError(f"label.template: unknown marker(s) {left}")
        return text

    def write_inputs(self, atoms, workdir: pathlib.Path) -> dict:
        write_text_atomic(workdir / self.input_name, self.render(atoms))
        return {"stdout": self.output_name, "periodic": bool(atoms.pbc.all())}

    def parse(self, atoms, workdir: pathlib.Path, outcome: RunOutcome, ctx: dict) -> LabelResult:
        import logging

        import dpdata

        logging.getLogger("cp2kdata").setLevel(logging.ERROR)  # it warns about its own old versions on every read
        out = workdir / self.output_name
        text = out.read_text(errors="replace") if out.is_file() else ""
        if re.search(r"SCF run NOT converged", text):
            return LabelResult.failed("SCF not converged (CP2K: 'SCF run NOT converged')")
        if outcome.returncode is None:
            return LabelResult.failed(outcome.reason)
        if "[ABORT]" in text:
            return LabelResult.failed(f"CP2K aborted: {abort_message(text)}")
        if not text.strip():
            return LabelResult.failed(f"missing output {out.name}" + (f"; {outcome.reason}" if outcome.reason else ""))
        if outcome.reason:
            return LabelResult.failed(outcome.reason)
        if not re.search(r"SCF run converged in", text):
            return LabelResult.failed(f"no converged SCF in {out.name}")
        if "ATOMIC FORCES in" not in text:
            return LabelResult.failed(f"no forces in {out.name}")
        if ctx["periodic"] and "STRESS| Analytical stress tensor" not in text:
            return LabelResult.failed(f"no stress in {out.name}")
        system = dpdata.LabeledSystem(str(out), fmt="cp2k/output")
        if ctx["periodic"] and "virials" not in system.data:
            return LabelResult.failed("the CP2K parser found no stress (is cp2kdata installed?)")
        # CP2K keeps the input axes but prints the cell with 3 decimals (cp2kdata reads those): use the
        # frame's own cell, and its exact volume for stress x volume
        result = result_from_system(system, atoms, rotated=False)
        if result.ok and result.virial is not None:
            result.virial = result.virial * atoms.get_volume() / abs(np.linalg.det(system["cells"][0]))
        return result

    def cleanup(self, workdir: pathlib.Path) -> None:
        for path in workdir.glob("dpsnake-RESTART*"):  # wavefunction restart files
            path.unlink(missing_ok=True)
