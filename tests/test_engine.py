"""The engine against DeePMD-kit itself: tiny models trained by DeePMD-kit (TensorFlow backend),
evaluated by ``deepmd.infer.DeepPot`` on the frozen ``.pb`` (and on ``.dp`` files through DeePMD-kit's
NumPy backend for features the TensorFlow backend lacks), compared to the engine on the ``.dp``."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from engine_helpers import cluster, edit_dp, fcc, frame, ref_eval, rel_err, set_activation, triclinic

FP64_TOL = 1e-10
FP32_TOL = 3e-5

CUNI_TOS32 = {
    "model": {
        "descriptor": {"type_one_side": True, "precision": "float32", "exclude_types": [[1, 1]]},
        "fitting_net": {"precision": "float32"},
    }
}


@pytest.fixture(scope="module")
def cuni(dp_model):
    return dp_model(data="CuNi")


@pytest.fixture(scope="module")
def cuni_tos32(dp_model):
    return dp_model(CUNI_TOS32, data="CuNi")


def _ours(path, coords, cells, types, precision="double", **kw):
    from dpsnake import DeepPot

    return DeepPot(path if not isinstance(path, (str, os.PathLike)) else str(path), precision=precision, **kw).eval(
        coords, cells, types, atomic=True
    )


def _compare(ours, ref, tol, what=""):
    for name, a, b in zip(("energy", "force", "virial", "atom_energy", "atom_virial"), ours, ref):
        err = rel_err(a, b)
        assert err <= tol, f"{what} {name}: relative error {err:.2e} > {tol:.0e}"


def _compare_energies(ours, ref, tol, what=""):
    """DeePMD-kit's NumPy backend has no autodiff (forces come back NaN): energies only."""
    for name, k in (("energy", 0), ("atom_energy", 3)):
        err = rel_err(ours[k], ref[k])
        assert err <= tol, f"{what} {name}: relative error {err:.2e} > {tol:.0e}"


def _fd_forces(model, c, cl, t, atoms=(0, 1, 2), h=1e-5):
    """Engine forces vs central differences of the engine energy on a few atoms (relative error)."""
    from dpsnake import DeepPot

    dp = DeepPot(model)
    f = dp.eval(c, cl, t)[1][0]
    fd = np.zeros((len(atoms), 3))
    for n, i in enumerate(atoms):
        for k in range(3):
            cp, cm = c.copy(), c.copy()
            cp[0, i, k] += h
            cm[0, i, k] -= h
            fd[n, k] = -(dp.eval(cp, cl, t)[0][0, 0] - dp.eval(cm, cl, t)[0][0, 0]) / (2 * h)
    return rel_err(f[list(atoms)], fd)


def test_load_model(cu_model, cuni, cuni_tos32):
    from dpsnake.engine.model import load_model

    m = load_model(cu_model["dp"])
    assert (m.type_map, m.rcut, m.sel, m.ntypes, m.precision) == (["Cu"], 4.5, [40], 1, "float64")
    assert not m.type_one_side and m.fittings[0].layers[1].idt is not None
    m2 = load_model(cuni_tos32["dp"])
    assert m2.type_one_side and m2.precision == "float32" and m2.sel == [24, 24]
    assert len(m2.embeddings) == 2 and m2.desc_exclude[1, 1] and not m2.desc_exclude[0, 1]
    assert len(load_model(cuni["dp"]).embeddings) == 4


def test_unsupported_fail_at_load(cu_model, tmp_path):
    from dpsnake.engine.model import load_model
    from dpsnake.errors import UserError

    cases = {
        "se_e2_r": lambda m: m["descriptor"].update(type="se_e2_r"),
        "numb_fparam": lambda m: m["fitting"].update(numb_fparam=2),
        "'dipole'": lambda m: m["fitting"].update(type="dipole"),
        "use_exp_switch": lambda m: m["descriptor"]["env_mat"].update(use_exp_switch=True),
    }
    for k, (word, fn) in enumerate(cases.items()):
        p = edit_dp(cu_model["dp"], tmp_path / f"bad{k}.dp", fn)
        with pytest.raises(UserError, match=word) as err:
            load_model(p)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "missing.dp")
    with pytest.raises(UserError, match="convert-backend"):
        load_model(cu_model["pb"])


@pytest.mark.parametrize("geom", ["bulk_small_cell", "bulk_3x3x3", "triclinic", "no_pbc"])
def test_single_type_vs_deepmd(cu_model, geom):
    at = {
        "bulk_small_cell": lambda: fcc(rep=(2, 2, 2)),
        "bulk_3x3x3": lambda: fcc(rep=(3, 3, 3), seed=3),
        "triclinic": triclinic,
        "no_pbc": cluster,
    }[geom]()
    c, cl, t = frame(at, ["Cu"])
    ref = ref_eval(cu_model["pb"], c, cl, t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # fcc at a=3.6 has 42 > sel=40 neighbours
        ours = _ours(cu_model["dp"], c, cl, t)
    _compare(ours, ref, FP64_TOL, geom)


def test_overfull_neighbour_list_warns(cu_model):
    from dpsnake.engine.ensemble import Ensemble

    at = fcc(a=3.3, rep=(2, 2, 2), rattle=0.02)  # 42 neighbours within 4.5 A, sel = 40
    c, cl, t = frame(at, ["Cu"])
    ens = Ensemble([cu_model["dp"]])
    with pytest.warns(RuntimeWarning, match="more neighbours"):
        out = ens.evaluate(c[0], t, np.zeros(len(t), int), cl.reshape(1, 3, 3), np.array([True]))
    assert ens.last_overflow == len(t)
    ref = ref_eval(cu_model["pb"], c, cl, t)
    assert rel_err(out["energy"][0], ref[0][:, 0]) <= FP64_TOL
    assert rel_err(out["force"][0], ref[1][0]) <= FP64_TOL


def test_batched_two_types_vs_deepmd(cuni):
    """Several systems of different sizes, compositions, cells and periodicity in one call."""
    from dpsnake.engine.ensemble import Ensemble

    tm = ["Cu", "Ni"]
    systems = [
        fcc(rep=(2, 2, 2), ni_frac=0.5, seed=4),
        triclinic(seed=5, ni_frac=0.4),
        cluster(nat=13, seed=6, ni_frac=0.3),
        fcc(rep=(3, 2, 2), ni_frac=0.2, seed=7),
        fcc(rep=(1, 1, 1), ni_frac=0.5, seed=8),
    ]
    coords, atype, system, cells, pbc, refs = [], [], [], [], [], []
    for s, at in enumerate(systems):
        c, cl, t = frame(at, tm)
        refs.append(ref_eval(cuni["pb"], c, cl, t))
        coords.append(c[0])
        atype.append(t)
        system.append(np.full(len(t), s))
        cells.append(np.zeros((3, 3)) if cl is None else cl.reshape(3, 3))
        pbc.append(cl is not None)
    ens = Ensemble([cuni["dp"]], chunk_atoms=17)  # small chunks: several per type
    out = ens.evaluate(
        np.concatenate(coords),
        np.concatenate(atype),
        np.concatenate(system),
        np.array(cells),
        np.array(pbc),
        atomic=True,
    )
    b = np.concatenate([[0], np.cumsum([len(a) for a in atype])])
    for s, ref in enumerate(refs):
        sl = slice(b[s], b[s + 1])
        ours = (
            out["energy"][0, s],
            out["force"][0, sl],
            out["virial"][0, s],
            out["atom_energy"][0, sl],
            out["atom_virial"][0, sl],
        )
        _compare(ours, [r[0] for r in ref], FP64_TOL, f"system {s}")


@pytest.mark.parametrize("precision", ["double", "mixed"])
def test_fp32_type_one_side_exclusion_vs_deepmd(cuni_tos32, precision):
    """FP32 model, type_one_side, descriptor exclude_types [[1, 1]]: within 3e-5 of DeePMD-kit."""
    tm = ["Cu", "Ni"]
    for at in (fcc(rep=(2, 2, 2), ni_frac=0.5, seed=9), triclinic(seed=10, ni_frac=0.5)):
        c, cl, t = frame(at, tm)
        ref = ref_eval(cuni_tos32["pb"], c, cl, t)
        _compare(_ours(cuni_tos32["dp"], c, cl, t, precision), ref, FP32_TOL, precision)


@pytest.mark.parametrize("variant", ["pair_exclude", "atom_exclude", "desc_exclude_two_side", "env_protection"])
def test_exclusions_vs_deepmd_numpy_backend(cuni, tmp_path, variant):
    """Model-level pair/atom exclusions (which the TF backend lacks) against DeePMD-kit's own NumPy
    backend evaluating the same edited .dp file."""
    edits = {
        "pair_exclude": lambda m: m.update(pair_exclude_types=[[0, 1]]),
        "atom_exclude": lambda m: m.update(atom_exclude_types=[1]),
        "desc_exclude_two_side": lambda m: m["descriptor"].update(exclude_types=[[0, 1]]),
        "env_protection": lambda m: (
            m["descriptor"].update(env_protection=0.3),
            m["descriptor"]["env_mat"].update(protection=0.3),
        ),
    }
    from dpsnake.engine.model import load_model

    p = edit_dp(cuni["dp"], tmp_path / f"{variant}.dp", edits[variant])
    c, cl, t = frame(fcc(rep=(2, 2, 2), ni_frac=0.5, seed=11), ["Cu", "Ni"])
    ref = ref_eval(p, c, cl, t)
    base = ref_eval(cuni["dp"], c, cl, t)
    assert rel_err(ref[0], base[0]) > 1e-6, "the edit must change the energy"
    # the NumPy backend keeps padding of excluded blocks at -davg/dstd ("v3" semantics)
    m = load_model(p, exclusion="v3")
    _compare_energies(_ours(m, c, cl, t), ref, FP64_TOL, variant)
    assert _fd_forces(m, c, cl, t) < 1e-7


def test_pair_exclusion_differs_from_descriptor_exclusion(cuni, tmp_path):
    """Pair exclusion makes padding (Rn = -davg/dstd), descriptor exclusion zeros Rn: not the same."""
    from dpsnake import DeepPot

    pe = edit_dp(cuni["dp"], tmp_path / "pe.dp", lambda m: m.update(pair_exclude_types=[[0, 1]]))
    de = edit_dp(cuni["dp"], tmp_path / "de.dp", lambda m: m["descriptor"].update(exclude_types=[[0, 1]]))
    c, cl, t = frame(fcc(rep=(2, 2, 2), ni_frac=0.5, seed=12), ["Cu", "Ni"])
    e1 = DeepPot(pe).eval(c, cl, t)[0]
    e2 = DeepPot(de).eval(c, cl, t)[0]
    assert abs(float(e1[0, 0] - e2[0, 0])) > 1e-6


@pytest.mark.parametrize(
    "act", ["relu", "relu6", "softplus", "sigmoid", "gelu", "gelu_tf", "silu", "silut:2.0", "linear"]
)
def test_activations_vs_deepmd_numpy_backend(cu_model, tmp_path, act):
    p = edit_dp(cu_model["dp"], tmp_path / "act.dp", lambda m: set_activation(m, act))
    c, cl, t = frame(triclinic(seed=13), ["Cu"])
    ref = ref_eval(p, c, cl, t)
    _compare_energies(_ours(p, c, cl, t), ref, FP64_TOL, act)
    assert _fd_forces(p, c, cl, t) < 1e-6


def test_overfull_two_types_v3_selection(cuni):
    """sum(sel) = 48 < 54 neighbours: DeePMD-kit 3 keeps the nearest 48 of any type, then splits."""
    c, cl, t = frame(fcc(a=3.0, rep=(2, 2, 2), ni_frac=0.5, seed=14, rattle=0.05), ["Cu", "Ni"])
    ref = ref_eval(cuni["dp"], c, cl, t)
    with pytest.warns(RuntimeWarning, match="more neighbours"):
        ours = _ours(cuni["dp"], c, cl, t)
    _compare_energies(ours, ref, FP64_TOL, "over-full")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert _fd_forces(str(cuni["dp"]), c, cl, t, h=1e-6) < 1e-6


def test_finite_differences(cuni):
    """Forces and virial against central differences of the engine's own energy."""
    from dpsnake import DeepPot

    dp = DeepPot(str(cuni["dp"]))
    at = triclinic(seed=15, ni_frac=0.5)
    c, cl, t = frame(at, ["Cu", "Ni"])
    e0, f, v = dp.eval(c, cl, t)
    h = 1e-5
    fd = np.zeros_like(f[0])
    for i in range(len(t)):
        for k in range(3):
            cp, cm = c.copy(), c.copy()
            cp[0, i, k] += h
            cm[0, i, k] -= h
            fd[i, k] = -(dp.eval(cp, cl, t)[0][0, 0] - dp.eval(cm, cl, t)[0][0, 0]) / (2 * h)
    assert rel_err(f[0], fd) < 1e-7
    # virial: W = -dE/d(strain), strain applied to cell rows and positions alike
    h0 = cl.reshape(3, 3)
    wfd = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            eps = np.zeros((3, 3))
            eps[a, b] = h
            ep = dp.eval(c @ (np.eye(3) + eps), (h0 @ (np.eye(3) + eps)).reshape(1, 9), t)[0][0, 0]
            em = dp.eval(c @ (np.eye(3) - eps), (h0 @ (np.eye(3) - eps)).reshape(1, 9), t)[0][0, 0]
            wfd[a, b] = -(ep - em) / (2 * h)
    assert rel_err(v[0].reshape(3, 3), wfd.T) < 1e-7


def test_chunking_and_namespace(cu_model):
    """Tiny chunks give the same numbers; NumPy in -> NumPy out; model_indices selects models."""
    from dpsnake.engine.ensemble import Ensemble

    at = fcc(rep=(3, 3, 3), seed=16)
    c, cl, t = frame(at, ["Cu"])
    args = (c[0], t, np.zeros(len(t), int), cl.reshape(1, 3, 3), np.array([True]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        big = Ensemble([cu_model["dp"], cu_model["dp"]]).evaluate(*args)
        small = Ensemble([cu_model["dp"]], chunk_atoms=5).evaluate(*args, model_indices=[0], atomic=True)
    assert isinstance(big["force"], np.ndarray) and big["force"].shape == (2, len(t), 3)
    assert small["energy"].shape == (1, 1) and small["atom_virial"].shape == (1, len(t), 9)
    assert rel_err(small["force"][0], big["force"][1]) < 1e-13
    assert rel_err(small["virial"][0], big["virial"][0]) < 1e-13


def test_guessed_widths_are_checked_and_redone(cuni, monkeypatch):
    """Chunks reuse the last call's compaction widths (what a GPU does, settings widths="guess" here):
    a call whose chunks fill more slots than that is redone with its own widths, and every call
    equals the exact widths' results."""
    from dpsnake.engine import ensemble as E

    tm = ["Cu", "Ni"]
    loose = fcc(rep=(2, 2, 2), ni_frac=0.3, seed=21, a=4.2)  # few neighbours within rcut
    dense = loose.copy()
    dense.set_cell(loose.cell.array * 3.6 / 4.2, scale_atoms=True)  # same atoms, many more
    given = []
    real = E._compact
    monkeypatch.setattr(
        E, "_compact", lambda ctx, xp, ch, sel, w: given.append(np.array(w)) or real(ctx, xp, ch, sel, w)
    )

    def call(ens, at, **kw):
        c, cl, t = frame(at, tm)
        return ens.evaluate(c[0], t, np.zeros(len(t), int), cl.reshape(1, 3, 3), np.array([True]), atomic=True, **kw)

    ens = E.Ensemble([cuni["dp"]], chunk_atoms=7, settings={"widths": "guess"})  # several chunks per type
    widths = None
    for at, misses in [(loose, 0), (loose, 0), (dense, 1), (dense, 1), (loose, 1)]:
        if at is loose and widths is None and ens._widths and misses:
            widths = {k: v.copy() for k, v in ens._widths.items()}  # the dense system's
        given.clear()
        before = ens.width_misses
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the dense system overflows sel
            got = call(ens, at)
            # each chunk compacted once, twice in a call that was redone
            assert len(given) == len(ens._widths) * (1 + ens.width_misses - before)
            ref = call(E.Ensemble([cuni["dp"]], chunk_atoms=7, settings={"widths": "guess"}), at, exact=True)
        assert ens.width_misses == misses, (at.cell.lengths(), misses)
        for key in ("energy", "force", "virial", "atom_energy", "atom_virial"):
            assert rel_err(got[key], ref[key]) < 1e-13, key
    # after the dense system the loose one runs in the dense widths (no miss) and narrows them
    assert all((ens._widths[k] <= widths[k]).all() for k in widths)
    assert any((ens._widths[k] < widths[k]).any() for k in widths)


def test_singular_periodic_cell_is_one_clear_error(cuni):
    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.errors import UserError

    c, cl, t = frame(fcc(rep=(1, 1, 1)), ["Cu", "Ni"])
    ens = Ensemble([cuni["dp"]])
    cells = np.stack([cl.reshape(3, 3), np.zeros((3, 3))])
    system = np.zeros(len(t), int)
    for n in (len(t), 0):  # with atoms, and an empty batch
        with pytest.raises(UserError, match="periodic system 1 has a singular cell"):
            ens.evaluate(c[0][:n], t[:n], system[:n], cells, np.array([True, True]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a 4-atom periodic cell overflows sel
        out = ens.evaluate(c[0], t, system, cells, np.array([True, False]))  # not periodic: no cell needed
    assert np.isfinite(out["force"]).all()


def test_padded_widths():
    from dpsnake.engine.ensemble import _padded

    assert _padded([78, 0], [152, 10], None).tolist() == [82, 2]  # 4%, at least 2
    assert _padded([150, 9], [152, 10], None).tolist() == [152, 10]  # never above sel
    assert _padded([80, 1], [152, 10], np.array([82, 2])).tolist() == [82, 2]  # still holds: kept
    assert _padded([83, 1], [152, 10], np.array([82, 2])).tolist() == [87, 3]  # too narrow
    assert _padded([60, 1], [152, 10], np.array([82, 2])).tolist() == [63, 3]  # far too wide


def test_compact_slots_equal_full_slots(cuni, monkeypatch):
    """Dropping the slots that are empty for a whole chunk (plus their constant tail) changes nothing."""
    from dpsnake.engine import ensemble as E

    tm = ["Cu", "Ni"]
    at = fcc(rep=(2, 2, 2), ni_frac=0.3, seed=21, a=4.0)  # sparse: far fewer neighbours than sel
    c, cl, t = frame(at, tm)
    args = (c[0], t, np.zeros(len(t), int), cl.reshape(1, 3, 3), np.array([True]))
    kept = []
    real = E._compact
    monkeypatch.setattr(
        E,
        "_compact",
        lambda ctx, xp, ch, sel, w: kept.append(real(ctx, xp, ch, sel, w)[1].kept) or real(ctx, xp, ch, sel, w),
    )
    out = E.Ensemble([cuni["dp"]]).evaluate(*args, atomic=True)
    assert kept and all((k < np.array([24, 24])).all() for k in kept), kept
    full = E.Ensemble([cuni["dp"]], settings={"compact": False}).evaluate(*args, atomic=True)
    for key in ("energy", "force", "virial", "atom_energy", "atom_virial"):
        assert rel_err(out[key], full[key]) < 1e-13, key
