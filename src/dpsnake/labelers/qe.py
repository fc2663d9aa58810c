"""Quantum ESPRESSO (pw.x) labeler: ASE writes the input, a command template runs pw.x, dpdata parses.

Config (``label:`` section, ``type: qe``), see docs/labelers.md:
``pseudo_dir``, ``pseudopotentials`` {element: file}, ``ecutwfc`` (Ry), ``ecutrho`` (Ry, optional),
``kspacing`` (1/A, VASP convention, 2 pi included) or ``kpts`` [n1, n2, n3] (neither: Gamma only),
``koffset`` [0|1]*3, ``smearing`` (e.g. "mv") with ``degauss`` (Ry), ``control`` / ``system`` /
``electrons`` (extra namelist entries), ``starting_magnetization`` ({element: -1..1}, sets
nspin = 2), ``command`` (default "pw.x -in {input}"), ``nproc``,
``nthreads``, ``timeout``, ``env``, ``keep_scratch``.
"""

from __future__ import annotations

import pathlib
import re
import shutil

from dpsnake.errors import UserError
from dpsnake.fsio import open_atomic
from dpsnake.labelers.base import LabelResult
from dpsnake.labelers.filebased import CommandLabeler, RunOutcome, kmesh, require_pseudopotentials, result_from_system

# namelist entries the labeler sets itself: a user value would break parsing or the scratch layout
OWNED = {
    "control": ("calculation", "tprnfor", "tstress", "outdir", "pseudo_dir", "prefix"),
    "system": ("nat", "ntyp", "ibrav"),
}


class QELabeler(CommandLabeler):
    """One pw.x SCF per frame: energy, forces and (periodic frames) virial from the output."""

    name = "qe"
    input_name = "pw.in"
    output_name = "pw.out"
    stale = ("pw.out", "CRASH")

    def __init__(
        self,
        pseudo_dir: str,
        pseudopotentials: dict,
        ecutwfc: float,
        ecutrho: float | None = None,
        kspacing: float | None = None,
        kpts=None,
        koffset=(0, 0, 0),
        smearing: str | None = None,
        degauss: float | None = None,
        control: dict | None = None,
        system: dict | None = None,
        electrons: dict | None = None,
        starting_magnetization: dict | None = None,
        command: str = "pw.x -in {input}",
        **run_keys,
    ):
        super().__init__(command, **run_keys)
        self.pseudo_dir, self.pseudopotentials = require_pseudopotentials(pseudo_dir, pseudopotentials)
        for key, val in (("ecutwfc", ecutwfc), ("ecutrho", ecutrho), ("kspacing", kspacing), ("degauss", degauss)):
            if val is not None and not (isinstance(val, (int, float)) and val > 0):
                raise UserError(f"label.{key}: must be a positive number, got {val!r}")
        if kspacing is not None and kpts is not None:
            raise UserError("label.kspacing / label.kpts: give one of them, not both")
        if kpts is not None and not (
            isinstance(kpts, (list, tuple)) and len(kpts) == 3 and all(isinstance(k, int) and k > 0 for k in kpts)
        ):
            raise UserError(f"label.kpts: must be three positive integers, got {kpts!r}")
        if smearing is not None and degauss is None:
            raise UserError("label.degauss: required with label.smearing (width in Ry, e.g. 0.02)")
        self.kspacing, self.kpts, self.koffset = kspacing, kpts, tuple(koffset)
        extra = {"control": dict(control or {}), "system": dict(system or {}), "electrons": dict(electrons or {})}
        for nl, keys in OWNED.items():
            for key in keys:
                if key in extra[nl]:
                    raise UserError(f"label.{nl}.{key}: set by the labeler itself; remove it")
        self.input_data = extra
        self.magnetization = None
        if starting_magnetization:
            if not isinstance(starting_magnetization, dict) or not all(
                isinstance(v, (int, float)) and -1 <= v <= 1 for v in starting_magnetization.values()
            ):
                raise UserError("label.starting_magnetization: give {element: value in [-1, 1]} (QE's meaning)")
            self.magnetization = {str(k): float(v) for k, v in starting_magnetization.items()}
            self.input_data["system"].setdefault("nspin", 2)
        self.input_data["system"].update({"ecutwfc": ecutwfc})
        if ecutrho is not None:
            self.input_data["system"]["ecutrho"] = ecutrho
        if smearing is not None:
            self.input_data["system"].update({"occupations": "smearing", "smearing": smearing, "degauss": degauss})

    def check_elements(self, elements) -> None:
        """Check time: a pseudopotential for every element of the systems."""
        missing = sorted(set(elements) - set(self.pseudopotentials))
        if missing:
            raise UserError(f"label.pseudopotentials: no pseudopotential for element(s) {missing} of the systems")

    def write_inputs(self, atoms, workdir: pathlib.Path) -> dict:
        from ase.io.espresso import write_espresso_in

        missing = sorted(set(atoms.get_chemical_symbols()) - set(self.pseudopotentials))
        if missing:
            raise UserError(f"label.pseudopotentials: no pseudopotential for element(s) {missing}")
        periodic = bool(atoms.pbc.all())
        atoms = atoms.copy()
        # ASE writes starting_magnetization(i) from the initial moments (one value per element keeps
        # the species labels plain, which dpdata's reader needs); frames' own moments are not used
        atoms.set_initial_magnetic_moments([(self.magnetization or {}).get(s, 0.0) for s in atoms.symbols])
        data = {nl: dict(v) for nl, v in self.input_data.items()}
        data["control"].update(
            {
                "calculation": "scf",
                "tprnfor": True,
                "tstress": periodic,
                "outdir": "./scratch",
                "prefix": "dpsnake",
                "pseudo_dir": str(self.pseudo_dir),
            }
        )
        if self.kspacing is not None:
            kpts = kmesh(atoms, self.kspacing)
        else:
            kpts = self.kpts  # None: ASE writes "K_POINTS gamma"
        with open_atomic(workdir / self.input_name) as fd:
            write_espresso_in(
                fd,
                atoms,
                input_data=data,
                pseudopotentials=self.pseudopotentials,
                kpts=None if kpts is None else tuple(kpts),
                koffset=self.koffset if kpts is not None else (0, 0, 0),
            )
        return {"stdout": self.output_name, "periodic": periodic}

    def parse(self, atoms, workdir: pathlib.Path, outcome: RunOutcome, ctx: dict) -> LabelResult:
        import dpdata

        out = workdir / self.output_name
        text = out.read_text(errors="replace") if out.is_file() else ""
        m = re.search(r"convergence NOT achieved[^\n]*", text)
        if m:
            return LabelResult.failed(f"SCF not converged: {m.group(0).strip()}")
        if outcome.returncode is None:  # could not start, or timed out
            return LabelResult.failed(outcome.reason)
        err = re.search(r"%{20,}\n(.*?)\n\s*%{20,}", text, re.S)
        if err:
            msg = " ".join(err.group(1).split())
            return LabelResult.failed(f"pw.x error: {msg}")
        if not text.strip():
            return LabelResult.failed(f"missing output {out.name}" + (f"; {outcome.reason}" if outcome.reason else ""))
        ranks = re.findall(r"running on\s+(\d+) processors", text)
        if self.nproc > 1 and ranks and int(ranks[0]) != self.nproc:
            # e.g. the mpich wheel that DeePMD-kit's torch extra installs puts its own mpirun first on
            # PATH: launching an Open MPI pw.x with it starts nproc serial copies writing one output
            launcher = shutil.which(self.command.split()[0]) or self.command.split()[0]
            return LabelResult.failed(
                f"pw.x ran as {len(ranks)} copies on {ranks[0]} processor(s) each instead of one run on "
                f"{self.nproc}: the launcher {launcher} is not the MPI pw.x was built with (give its full "
                "path in label.command, e.g. /usr/bin/mpirun)"
            )
        if "convergence has been achieved" not in text:
            why = f"; {outcome.reason}" if outcome.reason else ""
            return LabelResult.failed(f"no converged SCF in {out.name}{why}")
        if outcome.reason:
            return LabelResult.failed(outcome.reason)
        if "Forces acting on atoms" not in text:
            return LabelResult.failed(f"no forces in {out.name}")
        if ctx["periodic"] and "total   stress" not in text:
            return LabelResult.failed(f"no stress in {out.name}")
        system = dpdata.LabeledSystem([str(workdir / self.input_name), str(out)], fmt="qe/pw/scf")
        return result_from_system(system, atoms)

    def cleanup(self, workdir: pathlib.Path) -> None:
        shutil.rmtree(workdir / "scratch", ignore_errors=True)  # wavefunctions and charge density
