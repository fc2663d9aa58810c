"""The built-in engine's se_atten / se_atten_v2 (DPA-1) path (dpsnake.engine.attn) against DeePMD-kit.

Models trained for a few steps by DeePMD-kit's PyTorch backend (tests/dpmodels.py); references are
``deepmd.infer.DeepPot(frozen .pth).eval`` of each frame alone, ours one batched call of every
frame (a 32-atom CuNi cell, a 4-atom cell with many images, a triclinic cell, a cluster without PBC,
and a compressed cell whose atoms have more neighbours within rcut than sel).
"""

from __future__ import annotations

import numpy as np
import pytest
from dpmodels import train_pt_model
from engine_helpers import cluster, fcc, frame, ref_eval, rel_err, triclinic

from dpsnake.engine.attn.ensemble import AttnEnsemble


def _d(**kw):
    return {"model": {"descriptor": kw}}


# name: (descriptor of dpmodels.PT_DESCRIPTORS, overrides, emt_dataset kind)
VARIANTS = {
    "v2_l0": ("se_atten_v2", _d(attn_layer=0), "CuNi"),
    "v2_l2": ("se_atten_v2", _d(attn_layer=2), "CuNi"),
    "concat_l0": ("se_atten_v2", _d(type="se_atten", attn_layer=0), "CuNi"),
    "concat_l2": ("se_atten_v2", _d(type="se_atten", attn_layer=2, temperature=0.7), "CuNi"),
    # strip without the smooth type embedding, one-sided, attention without normalisation
    "strip_l2": (
        "se_atten_v2",
        _d(
            type="se_atten",
            tebd_input_mode="strip",
            smooth_type_embedding=False,
            type_one_side=True,
            attn_layer=2,
            normalize=False,
            scaling_factor=0.5,
        ),
        "CuNi",
    ),
    "excl": (
        "se_atten_v2",
        _d(attn_layer=2, set_davg_zero=True, exclude_types=[[0, 1]], env_protection=0.1),
        "CuNi",
    ),
    "cu1": ("se_atten_v2", _d(attn_layer=2), "Cu"),
    "al3": ("se_atten_v2", _d(type="se_atten", attn_layer=2, concat_output_tebd=False), "CuNiAl"),
}
F32 = (
    "se_atten_v2",
    {"model": {"descriptor": {"attn_layer": 2, "precision": "float32"}, "fitting_net": {"precision": "float32"}}},
    "CuNi",
)


def attn_model(model_cache, name):
    desc, over, data = F32 if name == "f32" else VARIANTS[name]
    return train_pt_model(model_cache, desc, 1, 10, over, data=data)


def _typed(at, type_map, seed):
    """Random types of ``type_map`` on the atoms of ``at``."""
    rng = np.random.default_rng(seed)
    at.set_chemical_symbols(list(np.array(type_map)[rng.integers(0, len(type_map), len(at))]))
    return at


def systems(type_map):
    """The batch: 32-atom cell, 4-atom cell (< 2 rcut, many images), triclinic, cluster, over-full."""
    dense = fcc(a=3.0, rep=(2, 2, 2), rattle=0.05, seed=5)  # ~54 neighbours within 4.5 A, sel 48
    ats = [fcc(rep=(2, 2, 2), seed=1), fcc(rep=(1, 1, 1), rattle=0.05, seed=3), triclinic(), cluster(), dense]
    return [_typed(at, type_map, k) for k, at in enumerate(ats)]


def flat(ats, type_map):
    coords, atype, system, cells, pbc = [], [], [], [], []
    for s, at in enumerate(ats):
        c, _, t = frame(at, type_map)
        coords.append(c[0])
        atype.append(t)
        system.append(np.full(len(t), s))
        cells.append(at.cell.array if at.pbc.all() else np.zeros((3, 3)))
        pbc.append(bool(at.pbc.all()))
    return np.concatenate(coords), np.concatenate(atype), np.concatenate(system), np.array(cells), np.array(pbc)


def compare(out, ats, type_map, pth, k=0):
    """Largest relative error of each output over the systems (ours: model k of ``out``)."""
    worst = dict.fromkeys(("e", "f", "v", "ae", "av"), 0.0)
    off = 0
    for s, at in enumerate(ats):
        c, cl, t = frame(at, type_map)
        n = len(t)
        e, f, v, ae, av = ref_eval(pth, c, cl, t)
        got = {
            "e": rel_err(out["energy"][k, s], e[0, 0]),
            "f": rel_err(out["force"][k, off : off + n], f[0]),
            "v": rel_err(out["virial"][k, s], v[0]),
            "ae": rel_err(out["atom_energy"][k, off : off + n], ae[0, :, 0]),
            "av": rel_err(out["atom_virial"][k, off : off + n], av[0]),
        }
        worst = {q: max(worst[q], got[q]) for q in worst}
        off += n
    return worst


@pytest.mark.parametrize("name", list(VARIANTS))
def test_batch_equals_deepmd(model_cache, name):
    """Every output of every system of one batched call equals DeePMD-kit's per-frame eval (FP64)."""
    m = attn_model(model_cache, name)
    ens = AttnEnsemble([str(m["dp"])])
    ats = systems(ens.type_map)
    with pytest.warns(RuntimeWarning, match="more neighbours"):
        out = ens.evaluate(*flat(ats, ens.type_map), atomic=True)
    assert ens.last_overflow > 0
    worst = compare(out, ats, ens.type_map, m["pth"])
    print(name, {k: f"{v:.1e}" for k, v in worst.items()})
    assert max(worst.values()) <= 1e-10, worst


@pytest.mark.parametrize("precision", ["double", "mixed"])
def test_fp32_model(model_cache, precision):
    """A float32-trained model, FP64 (upcast) and mixed precision: within 3e-5 of DeePMD-kit's FP32."""
    m = attn_model(model_cache, "f32")
    ens = AttnEnsemble([str(m["dp"])], precision=precision)
    assert ens.models[0].precision == "float32"
    ats = systems(ens.type_map)
    with pytest.warns(RuntimeWarning):
        out = ens.evaluate(*flat(ats, ens.type_map), atomic=True)
    worst = compare(out, ats, ens.type_map, m["pth"])
    print("f32", precision, {k: f"{v:.1e}" for k, v in worst.items()})
    assert max(worst.values()) <= 3e-5, worst


def test_tf32_changes_nothing_on_numpy(model_cache):
    """settings.tf32 is a CuPy-only choice: NumPy's mixed precision gives the same bits with it
    (tests/test_engine_attn_gpu.py checks that it runs TF32 on a GPU)."""
    dp = str(attn_model(model_cache, "v2_l2")["dp"])
    args = flat(systems(["Cu", "Ni"])[:3], ["Cu", "Ni"])
    a = AttnEnsemble([dp], precision="mixed").evaluate(*args)
    b = AttnEnsemble([dp], precision="mixed", tf32=True).evaluate(*args)
    assert all(np.array_equal(a[k], b[k]) for k in ("energy", "force", "virial"))


@pytest.mark.parametrize("name", ["v2_l2", "concat_l2", "strip_l2", "excl"])
def test_forces_and_virial_are_derivatives(model_cache, name):
    """Forces = -dE/dx and virial = -dE/d(strain) by central differences (FP64, h = 1e-5 A)."""
    m = attn_model(model_cache, name)
    ens = AttnEnsemble([str(m["dp"])])
    at = _typed(fcc(rep=(1, 1, 1), rattle=0.1, seed=7), ens.type_map, 7)
    coords, atype, system, cells, pbc = flat([at], ens.type_map)
    out = ens.evaluate(coords, atype, system, cells, pbc)
    h = 1e-5
    fd = np.zeros_like(coords)
    for i in range(len(coords)):
        for a in range(3):
            cp, cm = coords.copy(), coords.copy()
            cp[i, a] += h
            cm[i, a] -= h
            ep = ens.evaluate(cp, atype, system, cells, pbc)["energy"][0, 0]
            em = ens.evaluate(cm, atype, system, cells, pbc)["energy"][0, 0]
            fd[i, a] = -(ep - em) / (2 * h)
    assert rel_err(out["force"][0], fd) < 1e-7
    # virial W = -dE/d(eps) (x -> x (1 + eps), cell too), 3x3 as DeePMD-kit's row-major 9
    W = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            es = []
            for sgn in (1, -1):
                eps = np.eye(3)
                eps[a, b] += sgn * h
                es.append(ens.evaluate(coords @ eps, atype, system, cells @ eps, pbc)["energy"][0, 0])
            W[a, b] = -(es[0] - es[1]) / (2 * h)
    assert rel_err(out["virial"][0, 0].reshape(3, 3), W) < 1e-7


def test_ensemble_shares_neighbours_and_chunks(model_cache):
    """Two models in one call (and model_indices) equal each alone; chunks of 3 centres equal one chunk."""
    a, b = (str(attn_model(model_cache, n)["dp"]) for n in ("v2_l2", "excl"))
    ens = AttnEnsemble([a, b])
    ats = systems(ens.type_map)[:4]
    args = flat(ats, ens.type_map)
    both = ens.evaluate(*args, atomic=True)
    for k, p in enumerate((a, b)):
        alone = AttnEnsemble([p], chunk_atoms=3).evaluate(*args, atomic=True)
        for q in ("energy", "force", "virial", "atom_energy", "atom_virial"):
            assert rel_err(both[q][k], alone[q][0]) < 1e-13, q
    one = ens.evaluate(*args, model_indices=[1])
    assert one["energy"].shape == (1, len(ats)) and rel_err(one["force"][0], both["force"][1]) < 1e-13


def test_calc_model_devi_matches_deepmd(model_cache):
    """dpsnake.calc_model_devi on two se_atten_v2 .dp files equals DeePMD-kit's calc_model_devi on the
    .pth files (the engine's model-deviation entry point dispatches to the attention path)."""
    import warnings

    from deepmd.infer import DeepPot as RefPot
    from deepmd.infer.model_devi import calc_model_devi as ref_devi

    from dpsnake import calc_model_devi

    ms = [attn_model(model_cache, n) for n in ("v2_l2", "excl")]
    ats = [_typed(fcc(rep=(2, 2, 2), seed=30 + k, rattle=0.15), ["Cu", "Ni"], 0) for k in range(3)]
    types = np.array([["Cu", "Ni"].index(s) for s in ats[0].get_chemical_symbols()])
    coords = np.array([a.positions.reshape(-1) for a in ats])
    cells = np.array([a.cell.array.reshape(9) for a in ats])
    ref = ref_devi(coords, cells, types, [RefPot(str(m["pth"])) for m in ms])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ours = calc_model_devi(coords, cells, types, [str(m["dp"]) for m in ms], frequency=1)
    ref[:, 0] = np.arange(len(ats))
    assert ours.shape == ref.shape == (3, 8) and np.all(ref[:, 4:7] > 0)
    np.testing.assert_allclose(ours[:, 1:], ref[:, 1:], rtol=1e-9, atol=1e-12)


def test_same_geometry_is_required(model_cache):
    """Models with other sel / type_map cannot share a neighbour list: one line."""
    from dpsnake.errors import UserError

    a, c = (str(attn_model(model_cache, n)["dp"]) for n in ("v2_l2", "cu1"))
    with pytest.raises(UserError, match="cannot share neighbour lists"):
        AttnEnsemble([a, c])
    # compress= on these models: tests/test_engine_attn_tabulate.py (strip tabulated, concat refused)


def test_model_pair_and_atom_exclusions(model_cache, tmp_path):
    """Model pair_exclude_types / atom_exclude_types (edited into the .dp): energies and atomic
    energies equal DeePMD-kit's NumPy backend on the same file (its forces are NaN here), forces
    equal central differences."""
    from engine_helpers import edit_dp

    def fn(m):
        m["pair_exclude_types"] = [[0, 1]]
        m["atom_exclude_types"] = [1]

    dst = edit_dp(attn_model(model_cache, "v2_l2")["dp"], tmp_path / "ex.dp", fn)
    ens = AttnEnsemble([dst])
    ats = systems(ens.type_map)[1:4]
    coords, atype, system, cells, pbc = flat(ats, ens.type_map)
    out = ens.evaluate(coords, atype, system, cells, pbc, atomic=True)
    off = 0
    for s, at in enumerate(ats):
        c, cl, t = frame(at, ens.type_map)
        e, _, _, ae, _ = ref_eval(dst, c, cl, t)
        assert rel_err(out["energy"][0, s], e[0, 0]) < 1e-10
        assert rel_err(out["atom_energy"][0, off : off + len(t)], ae[0, :, 0]) < 1e-10
        off += len(t)
    assert np.all(out["atom_energy"][0][atype == 1] == 0.0)
    h = 1e-5
    for i in range(0, len(coords), 7):
        cp, cm = coords.copy(), coords.copy()
        cp[i, 0] += h
        cm[i, 0] -= h
        de = (
            ens.evaluate(cp, atype, system, cells, pbc)["energy"][0]
            - ens.evaluate(cm, atype, system, cells, pbc)["energy"][0]
        )
        assert abs(out["force"][0, i, 0] + de.sum() / (2 * h)) < 1e-7 * max(1.0, np.abs(out["force"][0]).max())


def _spy_widths(monkeypatch, work: bool = False):
    """The slot counts the chunks of an AttnEnsemble ran (a list filled by each call); ``work``: centres x
    slots instead."""
    from dpsnake.engine.attn import ensemble as ens_mod

    seen, orig = [], ens_mod.energy_and_grad

    def spy(rt, ti, d, *a, **k):
        seen.append(d.shape[0] * d.shape[1] if work else d.shape[1])
        return orig(rt, ti, d, *a, **k)

    monkeypatch.setattr(ens_mod, "energy_and_grad", spy)
    return seen


@pytest.mark.parametrize("name", ["v2_l0", "v2_l2", "concat_l2", "strip_l2", "excl", "al3"])
@pytest.mark.parametrize("davg", ["model", "shifted"])
def test_left_out_slots_equal_all_slots(model_cache, monkeypatch, name, davg):
    """Chunks that run only their first slots (the others empty; settings.compact, the default) equal
    every slot (compact False) to 1e-12; "shifted": davg made nonzero (the left-out slots' share of
    gr, descriptor._left_out_gr), smooth and not, concat and strip, exclusions, 3 types."""
    from dpsnake.engine.attn.model import load_attn_model
    from dpsnake.engine.settings import EngineSettings

    m = attn_model(model_cache, name)
    mods = [load_attn_model(str(m["dp"])) for _ in range(2)]
    if davg == "shifted":  # the same over slots, as DeePMD-kit's statistics
        shift = np.random.default_rng(3).normal(scale=0.3, size=(mods[0].ntypes, 1, 4))
        for am in mods:
            am.davg = am.davg + shift
    args = flat(systems(mods[0].type_map)[:4], mods[0].type_map)
    seen = _spy_widths(monkeypatch)
    full = AttnEnsemble([mods[0]], settings=EngineSettings(compact=False), chunk_atoms=3).evaluate(*args, atomic=True)
    assert set(seen) == {48}
    seen.clear()
    out = AttnEnsemble([mods[1]], chunk_atoms=3).evaluate(*args, atomic=True)
    assert min(seen) < 48 and 48 in seen  # the cluster's chunks run fewer slots, the 32-atom cell's all
    for k in ("energy", "force", "virial", "atom_energy", "atom_virial"):
        assert rel_err(out[k], full[k]) <= 1e-12, k


@pytest.mark.parametrize("name", ["v2_l2", "strip_l2"])
def test_left_out_slots_equal_deepmd(model_cache, monkeypatch, name):
    """Chunks of 3 centres, most running fewer slots than sel: still DeePMD-kit's eval to 1e-10."""
    m = attn_model(model_cache, name)
    ens = AttnEnsemble([str(m["dp"])], chunk_atoms=3)
    ats = systems(ens.type_map)[:4]
    seen = _spy_widths(monkeypatch)
    out = ens.evaluate(*flat(ats, ens.type_map), atomic=True)
    assert min(seen) < 48
    worst = compare(out, ats, ens.type_map, m["pth"])
    assert max(worst.values()) <= 1e-10, worst


def test_fill_order_runs_fewer_slots_and_equals(model_cache, monkeypatch):
    """settings.fill_order (the default): from the second call a type's centres run in the order of the slots
    they filled, so the chunks run fewer slots in all (centres x slots) than in the layout's order (fill_order
    False: every call as the first); every call equals all slots to 1e-12, with widths reused ("guess") and
    not."""
    from dpsnake.engine.settings import EngineSettings

    dp = str(attn_model(model_cache, "v2_l2")["dp"])
    ens0 = AttnEnsemble([dp], chunk_atoms=3)
    args = flat(systems(ens0.type_map)[:4], ens0.type_map)
    ref = AttnEnsemble([dp], settings=EngineSettings(compact=False)).evaluate(*args, atomic=True)
    seen = _spy_widths(monkeypatch, work=True)
    for widths in ("auto", "guess"):
        ens = AttnEnsemble([dp], settings=EngineSettings(fill_order=True, widths=widths), chunk_atoms=3)
        work = []
        for _ in range(3):
            seen.clear()
            out = ens.evaluate(*args, atomic=True)
            work.append(sum(seen))
            for k in ("energy", "force", "virial", "atom_energy", "atom_virial"):
                assert rel_err(out[k], ref[k]) <= 1e-12, (widths, k)
        assert work[1] < work[0] and work[2] == work[1], (widths, work)
        assert ens.width_misses == 0
    off = AttnEnsemble([dp], settings=EngineSettings(fill_order=False), chunk_atoms=3)
    work_off = []
    for _ in range(2):
        seen.clear()
        off.evaluate(*args)
        work_off.append(sum(seen))
    assert work_off == [work[0]] * 2


def test_left_out_slots_reused_and_redone(model_cache):
    """settings.widths "guess": a call reuses the last call's slot counts; a call whose atoms fill
    more slots than that is redone with its own (width_misses) and equals a fresh ensemble's."""
    from dpsnake.engine.settings import EngineSettings

    dp = str(attn_model(model_cache, "v2_l2")["dp"])
    ens = AttnEnsemble([dp], settings=EngineSettings(widths="guess"), chunk_atoms=4)
    coords, atype, system, cells, pbc = flat([_typed(cluster(), ens.type_map, 0)], ens.type_map)
    for _ in range(2):
        ens.evaluate(coords * 1.5, atype, system, cells, pbc)  # stretched: few neighbours each
    assert ens.width_misses == 0 and max(ens._widths.values()) <= 16
    out = ens.evaluate(coords, atype, system, cells, pbc)  # more neighbours than the slots reused
    assert ens.width_misses == 1
    ref = AttnEnsemble([dp], settings=EngineSettings(compact=False)).evaluate(coords, atype, system, cells, pbc)
    for k in ("energy", "force", "virial"):
        assert rel_err(out[k], ref[k]) <= 1e-12, k
