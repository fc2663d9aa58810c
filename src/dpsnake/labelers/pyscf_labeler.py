"""PySCF labeler for molecules and clusters (non-periodic frames): SCF energy and analytic forces.

Config (``label:`` section, ``type: pyscf``), see docs/labelers.md: ``basis`` (default "def2-svp"),
``xc`` (a DFT functional, e.g. "pbe", "b3lyp"; "hf" for Hartree-Fock), ``charge``, ``spin``
(2S, unrestricted when non-zero), ``conv_tol`` (Ha), ``max_cycle``, ``grid_level``, ``density_fit``
(bool), ``nthreads``. Periodic frames are refused (a failure naming the reason): PySCF's periodic
code is not meant for metals, and this labeler does not compute stress.
"""

from __future__ import annotations

import pathlib

import numpy as np

from dpsnake.errors import UserError
from dpsnake.labelers.base import LabelResult, sanity_check


class PySCFLabeler:
    """RKS/UKS (or RHF/UHF) single point with analytic gradients; one frame per call, in-process."""

    name = "pyscf"

    def __init__(
        self,
        basis: str = "def2-svp",
        xc: str = "pbe",
        charge: int = 0,
        spin: int = 0,
        conv_tol: float = 1e-9,
        max_cycle: int = 100,
        grid_level: int = 3,
        density_fit: bool = False,
        nthreads: int = 1,
        verbose: int = 0,
        **unknown,
    ):
        if unknown:
            raise UserError(f"label: unknown key(s) {sorted(unknown)} for label.type 'pyscf'")
        try:
            import pyscf  # noqa: F401
        except ImportError:
            raise UserError("label.type: pyscf needs the PySCF package (pip install pyscf)") from None
        from pyscf import gto

        if not isinstance(nthreads, int) or nthreads < 1:
            raise UserError(f"label.nthreads: must be a positive integer, got {nthreads!r}")
        try:  # an unknown basis name fails here, before any frame, with PySCF's message
            gto.basis.load(basis, "H")
        except Exception as err:
            raise UserError(f"label.basis: PySCF does not know basis {basis!r}: {err}") from None
        self.basis, self.xc, self.charge, self.spin = basis, str(xc).lower(), int(charge), int(spin)
        self.conv_tol, self.max_cycle, self.grid_level = float(conv_tol), int(max_cycle), int(grid_level)
        self.density_fit, self.nthreads, self.verbose = bool(density_fit), nthreads, int(verbose)

    def build(self, atoms):
        """The PySCF mean-field object for one frame (positions in A)."""
        from pyscf import dft, gto, scf

        mol = gto.M(
            atom=[(a.symbol, tuple(a.position)) for a in atoms],
            unit="Angstrom",
            basis=self.basis,
            charge=self.charge,
            spin=self.spin,
            verbose=self.verbose,
        )
        if self.xc == "hf":
            mf = scf.RHF(mol) if self.spin == 0 else scf.UHF(mol)
        else:
            mf = dft.RKS(mol) if self.spin == 0 else dft.UKS(mol)
            mf.xc = self.xc
            mf.grids.level = self.grid_level
        if self.density_fit:
            mf = mf.density_fit()
        mf.conv_tol, mf.max_cycle = self.conv_tol, self.max_cycle
        return mf

    def label(self, atoms, workdir: pathlib.Path) -> LabelResult:
        """Energy (eV) and forces (eV/A) of one non-periodic frame; virial None."""
        from pyscf import lib

        if np.any(atoms.pbc):
            return LabelResult.failed("pyscf labeler: frame is periodic; it labels molecules/clusters only")
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        lib.num_threads(self.nthreads)
        try:
            mf = self.build(atoms)
            mf.chkfile = None
            energy = mf.kernel()
            if not mf.converged:
                return LabelResult.failed(f"SCF not converged in {self.max_cycle} cycles (PySCF)")
            grad = mf.nuc_grad_method().kernel()  # (n, 3) Ha/Bohr
        except Exception as err:  # e.g. odd electron count for the spin given: a failed frame
            return LabelResult.failed(f"PySCF: {type(err).__name__}: {err}")
        from pyscf.data.nist import BOHR, HARTREE2EV  # PySCF's own constants: it read the A input with BOHR

        forces = -np.asarray(grad) * HARTREE2EV / BOHR
        result = LabelResult(ok=True, energy=float(energy) * HARTREE2EV, forces=forces, virial=None)
        return sanity_check(result, len(atoms), None)
