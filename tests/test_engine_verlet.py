"""Neighbour candidates kept between calls on NumPy (EngineSettings ``skin``, engine/verlet.py): the same
energies, forces and virials as a full search every call, along MD-like sequences with moving atoms and
cells, for bulk, a small cell with many images, a triclinic cell, a slab, a wire and a cluster in one
batch; rebuilt exactly when the rule asks; the explorer turns it on for CPUs. Real tiny DeePMD-kit
models (tests/dpmodels.py), se_e2_a and se_atten_v2."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from engine_helpers import cluster, fcc, rel_err, triclinic
from test_engine_attn import attn_model
from test_mixed_pbc import slab, wire

from dpsnake.engine.dispatch import make_ensemble
from dpsnake.engine.settings import EngineSettings

KEYS = ("energy", "force", "virial", "atom_energy", "atom_virial")


def batch(type_map):
    """Flat arrays of a mixed batch: 32-atom fcc, a 4-atom cell (< 2 rcut), triclinic, slab, wire, cluster."""
    ats = [fcc(rep=(2, 2, 2), seed=1), fcc(rep=(1, 1, 1), rattle=0.05, seed=3), triclinic(), slab(), wire(), cluster()]
    rng = np.random.default_rng(0)
    coords = np.concatenate([a.positions for a in ats])
    atype = rng.integers(0, len(type_map), size=len(coords))
    system = np.concatenate([np.full(len(a), s) for s, a in enumerate(ats)])
    cells = np.stack([a.cell.array for a in ats])
    pbc = np.stack([np.broadcast_to(a.pbc, 3) for a in ats])
    return coords, atype, system, cells, pbc


def run(models, args, steps: int, move: float, strain: float, skin: float, seed: int = 1):
    """``steps`` calls of a fresh-search ensemble and a kept one on the same random walk (atoms by
    ``move`` A per component and step, periodic cells scaled by ``strain`` per step, NPT-like);
    returns the worst relative difference per key and the kept list's counters."""
    rng = np.random.default_rng(seed)
    coords, atype, system, cells, pbc = (a.copy() for a in args)
    fresh = make_ensemble(models, xp=np)
    kept = make_ensemble(models, xp=np, settings=EngineSettings(skin=skin))
    worst = dict.fromkeys(KEYS, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(steps):
            coords = coords + rng.normal(scale=move, size=coords.shape)
            scale = 1.0 + rng.normal(scale=strain, size=(len(cells), 1, 1))
            cells = cells * np.where(pbc.any(axis=1)[:, None, None], scale, 1.0)
            a = fresh.evaluate(coords, atype, system, cells, pbc, atomic=True)
            b = kept.evaluate(coords, atype, system, cells, pbc, atomic=True)
            for k in KEYS:
                worst[k] = max(worst[k], rel_err(b[k], a[k]))
    return worst, kept._kept


@pytest.mark.parametrize("kind", ["se_e2_a", "se_atten_v2"])
def test_kept_candidates_equal_a_full_search(model_cache, cu_model, kind):
    if kind == "se_e2_a":
        models, type_map = [str(cu_model["dp"])], ["Cu"]
    else:
        models, type_map = [str(attn_model(model_cache, "v2_l2")["dp"])], ["Cu", "Ni"]
    worst, kept = run(models, batch(type_map), steps=40, move=0.03, strain=2e-4, skin=1.0)
    print(kind, {k: f"{v:.1e}" for k, v in worst.items()}, "builds", kept.builds, "calls", kept.calls)
    assert max(worst.values()) <= 1e-12, worst
    assert kept.calls == 40 and 2 <= kept.builds <= 20  # reused, and rebuilt as atoms went


def test_an_atom_from_beyond_the_list_is_found(cu_model):
    """Two atoms in vacuum approach from 7 A (beyond rcut 4.5 + skin 0.5) in 0.15 A steps: every call
    equals a full search (the rule rebuilds before the pair can come within rcut unseen)."""
    models = [str(cu_model["dp"])]
    fresh = make_ensemble(models, xp=np)
    kept = make_ensemble(models, xp=np, settings=EngineSettings(skin=0.5))
    atype, system, cells, pbc = np.zeros(2, int), np.zeros(2, int), np.zeros((1, 3, 3)), np.zeros(1, bool)
    seen = 0
    for k in range(30):
        x = np.array([[0.0, 0.0, 0.0], [7.0 - 0.15 * k, 0.1, 0.0]])
        a = fresh.evaluate(x, atype, system, cells, pbc)
        b = kept.evaluate(x, atype, system, cells, pbc)
        assert np.allclose(b["force"], a["force"], rtol=0, atol=1e-12) and np.allclose(b["energy"], a["energy"])
        seen += bool(np.abs(a["force"]).max() > 0)
    assert seen >= 10 and kept._kept.builds >= 4


def test_rebuild_rule(cu_model):
    """No motion: one build for many calls. Cell and positions strained together (an NPT barostat's
    scaling): kept below the strain bound, rebuilt above it. One atom moved by just under / over half
    the skin: kept / rebuilt. The same types in a new array: kept; another periodicity: rebuilt."""
    at = fcc(rep=(2, 2, 2), seed=1)
    x0, cell0 = at.positions, at.cell.array[None]
    atype, system, pbc = np.zeros(32, int), np.zeros(32, int), np.ones((1, 3), bool)
    ens = make_ensemble([str(cu_model["dp"])], xp=np, settings=EngineSettings(skin=1.0))
    for _ in range(3):
        ens.evaluate(x0, atype, system, cell0, pbc)
    kept = ens._kept
    assert (kept.builds, kept.calls) == (1, 3)
    # a cubic cell strained by e, atoms with it: the rule's strain term is 3 rcut e / (1 + e)
    rc = ens.models[0].rcut
    for frac, builds in ((0.9, 1), (1.1, 2)):
        e = frac / (3.0 * rc - frac)
        ens.evaluate(x0 * (1 + e), atype, system, cell0 * (1 + e), pbc)
        assert kept.builds == builds, frac
    x, cell = x0 * (1 + e), cell0 * (1 + e)
    x[5, 0] += 0.49  # 2 x 0.49 < 1.0: kept
    ens.evaluate(x, atype, system, cell, pbc)
    assert kept.builds == 2
    x[5, 0] += 0.02  # 2 x 0.51 >= 1.0: rebuilt
    ens.evaluate(x, atype, system, cell, pbc)
    assert kept.builds == 3
    ens.evaluate(x, np.zeros(32, int), system.copy(), cell, pbc)
    assert kept.builds == 3
    ens.evaluate(x, atype, system, cell, np.array([[True, True, False]]))  # other periodicity
    assert kept.builds == 4
    with pytest.raises(ValueError, match="skin"):
        EngineSettings(skin=-1.0)


def test_explorer_keeps_candidates_on_cpus(cu_model):
    from dpsnake.md.explore import MD_SKIN, make_provider

    provider, _ = make_provider([str(cu_model["dp"])], "double", np)
    assert provider.settings.skin == MD_SKIN > 0
