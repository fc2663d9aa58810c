"""A system that produces NaN (two atoms on top of each other) must not contaminate the other
systems of the same batched call: their energies, forces and virials stay finite and equal to
evaluating them alone."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from engine_helpers import fcc


def _flat(ats):
    coords = np.concatenate([a.positions for a in ats])
    system = np.repeat(np.arange(len(ats)), [len(a) for a in ats])
    cells = np.array([a.cell.array for a in ats])
    return coords, np.zeros(len(coords), dtype=int), system, cells


@pytest.mark.parametrize("skin", [0.0, 1.0])  # 1.0: candidates kept between calls (engine/verlet.py)
@pytest.mark.parametrize("precision", ["double", "mixed"])
def test_nan_system_does_not_leak(cu_model, precision, skin):
    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.engine.settings import EngineSettings

    bad = fcc(rep=(1, 1, 2), seed=5)
    bad.positions[1] = bad.positions[0]  # r = 0: NaN energy and forces in this system
    good = [fcc(rep=(2, 1, 1), seed=6), fcc(rep=(1, 2, 1), seed=7)]
    ens = Ensemble([cu_model["dp"]], precision=precision, settings=EngineSettings(skin=skin))
    # the NaN system in the middle: flat atom 0 (where empty slots used to scatter) is a good one's
    coords, atype, system, cells = _flat([good[0], bad, good[1]])
    pbc = np.array([True, True, False])
    n0, nb = len(good[0]), len(bad)
    keep = np.r_[0:n0, n0 + nb : len(coords)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 0/0 inside the NaN system
        out = ens.evaluate(coords, atype, system, cells, pbc, atomic=True)
        again = ens.evaluate(coords, atype, system, cells, pbc, atomic=True)  # kept list: NaN rebuilds
    for k in ("energy", "force", "virial"):
        np.testing.assert_array_equal(again[k], out[k])
    assert not np.isfinite(out["energy"][0, 1]) and not np.isfinite(out["force"][0, n0 : n0 + nb]).all()
    alone = ens.evaluate(*_flat(good), pbc[[0, 2]], atomic=True)
    assert np.isfinite(out["force"][0, keep]).all() and np.isfinite(out["virial"][0, [0, 2]]).all()
    # FP32 GEMMs round differently with the batch's size, so mixed agrees to FP32 precision only
    tol = 1e-12 if precision == "double" else 1e-6
    np.testing.assert_allclose(out["energy"][0, [0, 2]], alone["energy"][0], rtol=tol, atol=0)
    for k in ("force", "atom_energy", "atom_virial"):
        scale = np.abs(alone[k][0]).max()
        np.testing.assert_allclose(out[k][0, keep], alone[k][0], rtol=0, atol=tol * scale)
    np.testing.assert_allclose(
        out["virial"][0, [0, 2]], alone["virial"][0], rtol=0, atol=tol * np.abs(alone["virial"]).max()
    )
    # the non-atomic path (virial from per-centre products) agrees with the atomic one
    plain = ens.evaluate(*_flat(good), pbc[[0, 2]])
    np.testing.assert_allclose(
        plain["virial"][0], alone["virial"][0], rtol=0, atol=1e-12 * np.abs(alone["virial"]).max()
    )
    np.testing.assert_array_equal(plain["force"][0], alone["force"][0])
