"""Model deviation against DeePMD-kit's ``calc_model_devi`` / ``dp model-devi``, the
``model_devi.out`` format, the ``dpsnake model-devi`` command and the ASE calculator."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
from engine_helpers import edit_dp, fcc, frame, ref_pot, rel_err, set_activation, triclinic

HEADER = (
    "#       step         max_devi_v         min_devi_v         avg_devi_v         max_devi_f"
    "         min_devi_f         avg_devi_f"
)


@pytest.fixture(scope="module")
def pair(cu_model, model_cache):
    """Two Cu models with the same type_map: the trained one and a softplus copy, each as .dp and
    as a TensorFlow .pb (``dp convert-backend``) so that DeePMD-kit computes forces for both."""
    d = model_cache / f"engine_softplus_{cu_model['dir'].name}"
    d.mkdir(exist_ok=True)
    dp1 = d / "softplus.dp"
    pb1 = d / "softplus.pb"
    if not pb1.exists():
        edit_dp(cu_model["dp"], dp1, lambda m: set_activation(m, "softplus"))
        subprocess.run(
            [sys.executable, "-m", "deepmd", "convert-backend", str(dp1), str(pb1) + ".tmp.pb"],
            check=True,
            capture_output=True,
        )
        (d / "softplus.pb.tmp.pb").rename(pb1)
    return {"dp": [str(cu_model["dp"]), str(dp1)], "pb": [str(cu_model["pb"]), str(pb1)]}


def _frames(nf=4):
    ats = [fcc(rep=(2, 2, 2), seed=20 + k, rattle=0.15) for k in range(nf)]
    coords = np.array([a.positions for a in ats])
    cells = np.array([a.cell.array.reshape(9) for a in ats])
    return coords, cells, np.zeros(len(ats[0]), dtype=int)


@pytest.mark.parametrize("relative", [None, (0.1, 0.5)])
def test_calc_model_devi_matches_deepmd(pair, relative):
    from deepmd.infer.model_devi import calc_model_devi as ref_devi

    from dpsnake import calc_model_devi

    coords, cells, types = _frames()
    kw = {} if relative is None else {"relative": relative[0], "relative_v": relative[1]}
    models = [ref_pot(p) for p in pair["pb"]]
    # DeePMD-kit 3.2's relative_v only broadcasts for one frame at a time, so go frame by frame
    ref = np.concatenate(
        [ref_devi(coords[k : k + 1].reshape(1, -1), cells[k : k + 1], types, models, **kw) for k in range(len(coords))]
    )
    ref[:, 0] = np.arange(len(coords))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ours = calc_model_devi(coords, cells, types, pair["dp"], frequency=1, **kw)
    assert ours.shape == ref.shape == (len(coords), 8)
    assert np.all(ref[:, 1:] > 0)
    assert rel_err(ours[:, 1:], ref[:, 1:]) < 1e-9
    np.testing.assert_allclose(ours[:, 1:], ref[:, 1:], rtol=1e-8)


def test_dp_model_devi_cli_matches(pair, model_cache, tmp_path):
    """``dpsnake model-devi`` equals ``dp model-devi`` (deepmd.infer.model_devi.make_model_devi) on a
    deepmd/npy system, to the 6 digits both print."""
    from deepmd.infer.model_devi import make_model_devi

    from dpsnake.cli import main
    from dpsnake.engine.model_devi import read_model_devi

    system = model_cache / "data_Cu"
    make_model_devi(models=pair["pb"], system=str(system), output=str(tmp_path / "ref.out"), frequency=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert (
            main(["model-devi", "-m", *pair["dp"], "-s", str(system), "-o", str(tmp_path / "ours.out"), "-f", "10"])
            == 0
        )
    ref = np.loadtxt(tmp_path / "ref.out")
    ours = read_model_devi(tmp_path / "ours.out")
    assert (tmp_path / "ours.out").read_text().startswith(HEADER)
    np.testing.assert_array_equal(ours["step"], ref[:, 0].astype(int))
    for k, name in enumerate(
        ["max_devi_v", "min_devi_v", "avg_devi_v", "max_devi_f", "min_devi_f", "avg_devi_f", "devi_e"]
    ):
        np.testing.assert_allclose(ours[name], ref[:, k + 1], rtol=2e-6, err_msg=name)


def test_cli_bad_input_one_line(pair, tmp_path, capsys):
    from dpsnake.cli import main

    assert main(["model-devi", "-m", *pair["dp"], "-s", str(tmp_path / "nope"), "-o", str(tmp_path / "o.out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.out").exists()


def test_write_read_model_devi_format(tmp_path):
    from dpsnake.engine.model_devi import read_model_devi, write_model_devi

    cols = {
        n: np.array([0.1, 2.5e-3]) * (k + 1)
        for k, n in enumerate(["max_devi_v", "min_devi_v", "avg_devi_v", "max_devi_f", "min_devi_f", "avg_devi_f"])
    }
    p = tmp_path / "model_devi.out"
    write_model_devi(p, [0, 10], cols)
    lines = p.read_text().splitlines()
    assert lines[0] == HEADER
    assert lines[1] == f"{0:12d}" + "".join(f" {cols[n][0]:18.6e}" for n in cols)
    assert len(lines[1]) == 12 + 6 * 19
    write_model_devi(p, [20], {n: v[:1] for n, v in cols.items()}, append=True)
    back = read_model_devi(p)
    np.testing.assert_array_equal(back["step"], [0, 10, 20])
    np.testing.assert_allclose(back["max_devi_f"], [0.4, 0.01, 0.4], rtol=1e-6)


def test_deviation_per_system_batched(pair):
    """Per-system deviations of a batch equal those of the systems evaluated one by one."""
    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.engine.model_devi import deviation_columns

    ens = Ensemble(pair["dp"])
    ats = [fcc(rep=(2, 2, 2), seed=30), triclinic(seed=31), fcc(rep=(3, 2, 2), seed=32)]
    flat = [frame(a, ["Cu"]) for a in ats]
    nat = np.array([len(f[2]) for f in flat])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = ens.evaluate(
            np.concatenate([f[0][0] for f in flat]),
            np.concatenate([f[2] for f in flat]),
            np.repeat(np.arange(3), nat),
            np.array([f[1].reshape(3, 3) for f in flat]),
            np.ones(3, bool),
        )
        batch = deviation_columns(out, np.repeat(np.arange(3), nat), nat)
        for s, f in enumerate(flat):
            o = ens.evaluate(f[0][0], f[2], np.zeros(nat[s], int), f[1].reshape(1, 3, 3), np.ones(1, bool))
            one = deviation_columns(o, np.zeros(nat[s], int), nat[s : s + 1])
            for k, v in one.items():
                assert abs(batch[k][s] - v[0]) <= 1e-12 * max(abs(v[0]), 1e-30), k


def test_ase_calculator(cu_model):
    from ase.calculators.calculator import PropertyNotImplementedError

    from dpsnake import DP, DeepPot

    at = triclinic(seed=33)
    at.calc = DP(model=str(cu_model["dp"]))
    e = at.get_potential_energy()
    f = at.get_forces()
    s = at.get_stress()
    es = at.get_potential_energies()
    c, cl, t = frame(at, ["Cu"])
    re, rf, rv = DeepPot(str(cu_model["dp"])).eval(c, cl, t)
    assert abs(e - re[0, 0]) < 1e-12 and at.get_potential_energy(force_consistent=True) == e
    assert np.abs(f - rf[0]).max() < 1e-12 and abs(es.sum() - e) < 1e-10
    # stress against ASE's own numerical stress (finite strain of the cell)
    num = at.calc.calculate_numerical_stress(at, d=1e-5)
    assert np.abs(s - num).max() < 1e-7 * max(np.abs(num).max(), 1e-3)
    w = rv[0].reshape(3, 3)
    np.testing.assert_allclose(s[:3], -np.diag(w) / at.get_volume(), rtol=1e-12)
    from engine_helpers import cluster

    cl = cluster(nat=13)  # non-periodic: energies and forces, no stress
    cl.calc = DP(model=str(cu_model["dp"]))
    assert np.isfinite(cl.get_potential_energy())
    with pytest.raises(PropertyNotImplementedError):
        cl.get_stress()
