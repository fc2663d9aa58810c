"""PySCF labeler on a distorted water molecule: PySCF's own gradient, a finite difference, failures."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk, molecule

from dpsnake.errors import UserError
from dpsnake.labelers import make_labeler

pytest.importorskip("pyscf")

SPEC = {"type": "pyscf", "basis": "6-31g", "xc": "pbe"}


def water():
    atoms = molecule("H2O")
    atoms.positions[1] += [0.0, 0.08, -0.05]  # off equilibrium, no symmetry: forces on every atom
    return atoms


@pytest.mark.dft
def test_pyscf_h2o_forces_match_pyscf_gradient_and_finite_difference(tmp_path):
    from pyscf import dft, gto
    from pyscf.data.nist import BOHR, HARTREE2EV

    atoms = water()
    lab = make_labeler(SPEC)
    result = lab.label(atoms, tmp_path)
    assert result.ok, result.reason
    assert result.virial is None
    # PySCF's own calculation, set up by hand
    mol = gto.M(atom=[(a.symbol, tuple(a.position)) for a in atoms], unit="Angstrom", basis="6-31g", verbose=0)
    mf = dft.RKS(mol)
    mf.xc, mf.conv_tol = "pbe", 1e-9
    energy = mf.kernel()
    grad = mf.nuc_grad_method().kernel()
    assert result.energy == pytest.approx(energy * HARTREE2EV, abs=1e-6)
    np.testing.assert_allclose(result.forces, -grad * HARTREE2EV / BOHR, atol=1e-5)
    # forces are minus the energy derivative: central difference on one coordinate of the moved H
    h = 1e-3
    plus, minus = atoms.copy(), atoms.copy()
    plus.positions[1, 1] += h
    minus.positions[1, 1] -= h
    fd = -(lab.label(plus, tmp_path).energy - lab.label(minus, tmp_path).energy) / (2 * h)
    assert result.forces[1, 1] == pytest.approx(fd, abs=2e-3)
    assert abs(result.forces[1, 1]) > 0.1
    assert np.abs(result.forces.sum(axis=0)).max() < 1e-3


def test_pyscf_failures(tmp_path):
    result = make_labeler(dict(SPEC, max_cycle=2)).label(water(), tmp_path)
    assert not result.ok and result.reason.startswith("SCF not converged")
    result = make_labeler(SPEC).label(bulk("Cu"), tmp_path)
    assert not result.ok and "periodic" in result.reason
    result = make_labeler(dict(SPEC, spin=0)).label(molecule("OH"), tmp_path)  # odd electron count
    assert not result.ok and "PySCF" in result.reason
    with pytest.raises(UserError, match="label.basis"):
        make_labeler(dict(SPEC, basis="no-such-basis"))
