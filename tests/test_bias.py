"""Biased exploration (dpsnake.md.bias): CV gradients, a known free-energy profile, resume, batches.

Reference systems: ``Pair``, a toy physics model of pairs of atoms (one pair per walker) whose distance
sees a double well U(r) = hb ((r - rc)^2 / delta^2 - 1)^2 (hb = 0 is an ideal gas); its free energy in
the distance is F(r) = U(r) - 2 kT ln r (the r^2 of the spherical shell).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk

from dpsnake.engine.xp import segment_sum
from dpsnake.errors import UserError
from dpsnake.md import integrators as I
from dpsnake.md.bias import BiasedProvider
from dpsnake.md.explorer import Explorer
from dpsnake.md.state import start_state
from dpsnake.md.walkers import parse_walkers, read_structures

HB, RC, DELTA = 0.1, 2.0, 0.5  # eV, A, A: minima at 1.5 and 2.5 A, barrier 0.1 eV (~4 kT at 300 K)


class Pair:
    """Toy provider: U = hb ((r - rc)^2 / delta^2 - 1)^2 of the distance between a walker's atoms 0
    and 1 (no image), all other atoms free; M identical models (the provider interface)."""

    def __init__(self, hb=HB, models=1):
        self.hb, self.models = hb, models

    def __call__(self, st, all_models):
        xp = st.xp
        start = xp.cumsum(st.natoms) - st.natoms
        i, j = start, start + 1
        d = st.pos[j] - st.pos[i]
        r = xp.sqrt((d * d).sum(axis=1))
        q = (r - RC) ** 2 / DELTA**2 - 1.0
        e = self.hb * q * q
        de = self.hb * 2 * q * 2 * (r - RC) / DELTA**2
        fj = -(de / r)[:, None] * d
        idx = xp.concatenate([j, i])
        f = segment_sum(xp, idx, xp.concatenate([fj, -fj]), st.pos.shape[0])
        w = (d[:, :, None] * fj[:, None, :]).reshape(-1, 9)
        M = self.models if all_models else 1
        return {"energy": xp.stack([e] * M), "force": xp.stack([f] * M), "virial": xp.stack([w] * M)}


def _walker(name, structure, **kw):
    d = dict(name=name, structure=str(structure), ensemble="nvt-langevin", temperature=300.0, nsteps=200)
    d.update(dt=0.001, trj_freq=10, seed=1, tau_t=0.05)
    d.update(kw)
    return d


def _three_cvs(distance_structure, structure, volume_cv: dict, volume_at: float) -> list[dict]:
    """Umbrella walkers on the three CVs: distance of atoms 0-5, Cu-Ni coordination, volume (NPT)."""
    umbrella = {"kind": "umbrella"}
    return [
        _walker(
            "d",
            distance_structure,
            bias={**umbrella, "cv": {"type": "distance", "atoms": [0, 5]}, "kappa": 3.0, "at": 1.0},
        ),
        _walker(
            "c",
            structure,
            bias={
                **umbrella,
                "cv": {"type": "coordination", "a": ["Cu"], "b": ["Ni"], "r0": 2.6},
                "kappa": 0.5,
                "at": 2.0,
            },
        ),
        _walker(
            "v",
            structure,
            bias={**umbrella, "cv": volume_cv, "kappa": 0.2, "at": volume_at},
            ensemble="npt",
            pressure=0.0,
            thermostat="bussi",
        ),
    ]


def _pair_file(path, r=1.5, symbols="H2"):
    Atoms(symbols, positions=[[0, 0, 0], [r, 0, 0]]).write(path, format="extxyz")
    return path


def _state(walkers, type_map, xp=np):
    ws = parse_walkers(walkers)
    return start_state(ws, read_structures(ws, type_map), xp)


def test_cv_gradients_match_finite_differences(tmp_path):
    """Forces and virial of umbrella biases on a distance across the periodic boundary, a
    coordination number (Cu-Ni, triclinic cell) and the volume per atom equal -dE/dx and
    -dE/d(strain) by central differences of the bias energy."""
    at = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2))
    at.set_cell(at.cell.array + [[0, 0, 0], [0.3, 0, 0], [0.2, 0.4, 0]], scale_atoms=True)
    at.rattle(0.15, seed=3)
    at.symbols[[1, 4, 6]] = "Ni"
    at.write(tmp_path / "cuni.extxyz")
    far = at.copy()
    far.positions[5] = far.positions[0] + far.cell[0] * 0.9  # the minimum image goes across
    far.write(tmp_path / "far.extxyz")
    ws = _three_cvs(tmp_path / "far.extxyz", tmp_path / "cuni.extxyz", {"type": "volume", "per_atom": True}, 10.0)
    st = _state(ws, ["Cu", "Ni"])
    prov = BiasedProvider(Pair(hb=0.0))

    def energy(pos, cells):
        st.pos, st.cells = pos, cells
        return prov(st, False)["energy"][0].copy()

    pos0, cell0 = st.pos.copy(), st.cells.copy()
    out = prov(st, False)
    s = st.b_out[:, 0].copy()
    assert s[2] == pytest.approx(abs(np.linalg.det(cell0[2])) / 8)
    assert 0.5 < s[0] < 3.5 and s[1] > 1.0  # the image distance (not 0.9 of a lattice vector); pairs counted
    h = 1e-5
    rng = np.random.default_rng(0)
    for n in rng.choice(len(pos0), 12, replace=False):
        for a in range(3):
            p, m = pos0.copy(), pos0.copy()
            p[n, a] += h
            m[n, a] -= h
            fd = -(energy(p, cell0) - energy(m, cell0))[st.system[n]] / (2 * h)
            assert out["force"][0][n, a] == pytest.approx(fd, rel=1e-6, abs=1e-8)
    for a in range(3):
        for b in range(3):
            eps = np.zeros((3, 3))
            eps[a, b] = h
            ep = energy(pos0 @ (np.eye(3) + eps), cell0 @ (np.eye(3) + eps))
            em = energy(pos0 @ (np.eye(3) - eps), cell0 @ (np.eye(3) - eps))
            fd = -(ep - em) / (2 * h)
            np.testing.assert_allclose(out["virial"][0][:, 3 * a + b], fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "bias, message",
    [
        ({"cv": {"type": "angle"}, "kind": "umbrella"}, "bias.cv.type: must be one of"),
        ({"cv": {"type": "distance", "atoms": [0]}, "kind": "umbrella", "kappa": 1, "at": 1}, "bias.cv.atoms:"),
        (
            {"cv": {"type": "distance", "atoms": [0, 1]}, "kind": "umbrella", "kappa": -1, "at": 1},
            "bias.kappa: must be positive",
        ),
        ({"cv": {"type": "distance", "atoms": [0, 1]}, "kind": "steered", "kappa": 1, "at": 1}, "bias.from: required"),
        (
            {"cv": {"type": "volume"}, "kind": "metadynamics", "height": 0.1, "sigma": 1, "pace": 5, "biasfactor": 1},
            "bias.biasfactor:",
        ),
        ({"cv": {"type": "volume"}, "kind": "metadynamics", "height": 0.1, "sigma": 1, "pace": 500}, "bias.pace:"),
        (
            {"cv": {"type": "coordination", "a": ["Cu"], "b": "Ni", "r0": 2}, "kind": "umbrella", "kappa": 1, "at": 1},
            "bias.cv.b:",
        ),
        (
            {"cv": {"type": "volume", "atoms": [0, 1]}, "kind": "umbrella", "kappa": 1, "at": 1},
            "bias.cv.atoms: not a key",
        ),
        ({"cv": {"type": "volume"}, "kind": "umbrella", "kappa": 1, "at": 1, "pace": 3}, "bias.pace: not a key"),
    ],
)
def test_bad_bias_config_is_one_line_naming_the_key(tmp_path, bias, message):
    w = _walker("a", _pair_file(tmp_path / "p.extxyz"), bias=bias)
    with pytest.raises(UserError) as err:
        parse_walkers([w])
    text = str(err.value)
    assert "\n" not in text and text.startswith("walkers.json: walker 'a': ") and message in text


def test_bias_atoms_out_of_range_names_the_walker(tmp_path):
    w = _walker(
        "a",
        _pair_file(tmp_path / "p.extxyz"),
        bias={"cv": {"type": "distance", "atoms": [0, 2]}, "kind": "umbrella", "kappa": 1, "at": 1},
    )
    with pytest.raises(UserError, match=r"^walker 'a': bias.cv.atoms: \[0, 2\] is out of range for 2 atoms$"):
        _state([w], ["H"])


def test_metadynamics_recovers_double_well_free_energy(tmp_path):
    """Well-tempered metadynamics on the distance of the double-well pair: 16 walkers in one batch,
    F(r) = -(gamma / (gamma - 1)) V(r) averaged over the walkers, matches U(r) - 2 kT ln r on
    1.45..2.55 A (both wells and the barrier) within 0.35 kT RMS and 0.8 kT at any point."""
    nsteps, gamma = 8000, 8.0
    bias = {"cv": {"type": "distance", "atoms": [0, 1]}, "kind": "metadynamics"}
    bias.update(height=0.01, sigma=0.06, pace=20, biasfactor=gamma)
    ws = [_walker(f"w{k}", _pair_file(tmp_path / "p.extxyz"), nsteps=nsteps, seed=k + 1, bias=bias) for k in range(16)]
    st = _state(ws, ["H"])
    prov = BiasedProvider(Pair())
    I.set_forces(st, prov(st, False))
    flags = st.flags()
    t0 = time.perf_counter()
    for n in range(nsteps):
        prov.step = n + 1
        I.md_step(st, prov, n, flags)
    grid = np.linspace(1.45, 2.55, 45)
    c, h = st.mtd[:, :, 0], st.mtd[:, :, 1]
    v = (h[:, None, :] * np.exp(-((grid[None, :, None] - c[:, None, :]) ** 2) / (2 * 0.06**2))).sum(axis=2)
    f_md = -gamma / (gamma - 1) * v.mean(axis=0)
    kT = units.kB * 300.0
    f_ref = HB * ((grid - RC) ** 2 / DELTA**2 - 1) ** 2 - 2 * kT * np.log(grid)
    err = (f_md - f_md.mean()) - (f_ref - f_ref.mean())
    rms, worst = np.sqrt((err**2).mean()) / kT, np.abs(err).max() / kT
    print(f"metadynamics: {time.perf_counter() - t0:.1f} s, rms {rms:.3f} kT, max {worst:.3f} kT")
    assert rms < 0.35 and worst < 0.8


def _mtd(**kw):
    b = {"cv": {"type": "distance", "atoms": [0, 1]}, "kind": "metadynamics", "height": 0.01, "sigma": 0.06, "pace": 7}
    b.update(biasfactor=6.0, **kw)
    return b


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    """A metadynamics and a steered walker stopped after 37 steps (checkpoint: the Gaussians so far)
    and resumed write the same frames, deviation lines and bias.out as an uninterrupted run."""
    s = _pair_file(tmp_path / "p.extxyz")
    steer = {"cv": {"type": "distance", "atoms": [0, 1]}, "kind": "steered", "kappa": 2.0, "from": 1.5, "to": 2.5}
    ws = parse_walkers([_walker("m", s, nsteps=120, bias=_mtd()), _walker("s", s, nsteps=120, seed=2, bias=steer)])

    def explorer(out, **kw):
        return Explorer(ws, Pair(models=2), ["H"], out, progress=False, checkpoint_every=1e9, **kw)

    explorer(tmp_path / "full").run()
    assert explorer(tmp_path / "cut", stop_after=37).run() == {}
    assert (tmp_path / "cut" / "checkpoint.npz").exists()
    explorer(tmp_path / "cut").run()
    for name in ("m", "s"):
        full, cut = _files(tmp_path / "full" / name), _files(tmp_path / "cut" / name)
        assert sorted(full) == ["bias.out", "model_devi.out", "traj.extxyz"]
        assert full == cut
    rows = np.loadtxt(tmp_path / "full" / "m" / "bias.out")
    assert rows.shape == (13, 3) and rows[0, 0] == 0 and rows[-1, 0] == 120
    assert rows[0, 2] == 0.0 and rows[-1, 2] > 0.0  # no Gaussian at step 0; some by the end
    steered = np.loadtxt(tmp_path / "full" / "s" / "bias.out")
    centre = 1.5 + steered[:, 0] / 120
    np.testing.assert_allclose(steered[:, 2], 0.5 * 2.0 * (steered[:, 1] - centre) ** 2, rtol=1e-8, atol=1e-12)


def test_unbiased_walkers_in_a_biased_batch_equal_a_run_without_bias(tmp_path):
    s = _pair_file(tmp_path / "p.extxyz")
    plain = _walker("plain", s, nsteps=60, seed=3)
    ws = [_walker("b", s, nsteps=60, bias=_mtd()), plain]
    Explorer(parse_walkers(ws), Pair(models=2), ["H"], tmp_path / "mixed", progress=False).run()
    Explorer(parse_walkers([plain]), Pair(models=2), ["H"], tmp_path / "alone", progress=False).run()
    assert _files(tmp_path / "mixed" / "plain") == _files(tmp_path / "alone" / "plain")
    assert not (tmp_path / "mixed" / "plain" / "bias.out").exists()
    rows = np.loadtxt(tmp_path / "mixed" / "b" / "bias.out")  # the bias acted on the other walker
    assert rows.shape == (7, 3) and rows[-1, 2] > 0.0


def test_volume_umbrella_with_a_real_deepmd_model(tmp_path, cu_model):
    """NPT Cu (32 atoms) with the engine and a trained DeePMD model: an umbrella on the volume per
    atom below the model's equilibrium compresses the cell against the unbiased walker of the same
    batch; bias.out has the frames' volume per atom and kappa/2 (s - at)^2."""
    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.engine.model import load_model
    from dpsnake.md.providers import EnsembleProvider
    from dpsnake.md.trajectory import read_frames

    at = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    at.rattle(0.03, seed=1)
    at.write(tmp_path / "cu.extxyz")
    common = dict(ensemble="npt", pressure=1.0, nsteps=300, dt=0.002, trj_freq=50, tau_p=0.1, thermostat="bussi")
    bias = {"cv": {"type": "volume", "per_atom": True}, "kind": "umbrella", "kappa": 0.5, "at": 13.0}
    ws = [
        _walker("plain", tmp_path / "cu.extxyz", **common),
        _walker("pulled", tmp_path / "cu.extxyz", bias=bias, **common),
    ]
    prov = EnsembleProvider(Ensemble([load_model(str(cu_model["dp"]))]))
    summary = Explorer(parse_walkers(ws), prov, ["Cu"], tmp_path / "out", progress=False).run()
    assert all(r["status"] == "finished" for r in summary["walkers"].values())
    vols = {}
    for name in ("plain", "pulled"):
        frames = list(read_frames(tmp_path / "out" / name / "traj.extxyz"))
        vols[name] = np.array([f.get_volume() / len(f) for f in frames])
    rows = np.loadtxt(tmp_path / "out" / "pulled" / "bias.out")
    np.testing.assert_allclose(rows[:, 1], vols["pulled"], rtol=1e-6)
    np.testing.assert_allclose(rows[:, 2], 0.25 * (rows[:, 1] - 13.0) ** 2, rtol=1e-7, atol=1e-9)
    # the model's cell at 1 bar is ~16 A^3/atom; the umbrella holds it near 13
    assert abs(vols["pulled"][-3:].mean() - 13.0) < 1.0 and vols["plain"][-3:].mean() > vols["pulled"][-3:].mean() + 1.5


def test_stage_and_group_bias_reach_walkers_json(tmp_path):
    """A stage's bias goes to every walker of its groups (a group's own wins), validated at check time
    with one line naming the config key; the walkers parse and carry it."""
    from select_helpers import cu_config

    from dpsnake.workflow.plan import make_walkers

    umb = {"cv": {"type": "distance", "atoms": [0, 1]}, "kind": "umbrella", "kappa": 1.0, "at": 2.5}
    mtd = {"cv": {"type": "volume", "per_atom": True}, "kind": "metadynamics", "height": 0.01, "sigma": 0.2, "pace": 10}
    groups = [
        {"temperatures": [300.0]},
        {"temperatures": [600.0], "ensemble": "npt", "bias": mtd},
        {"temperatures": [900.0]},
    ]
    stage = {"nsteps": 40, "trj_freq": 5, "ensemble": "nvt", "bias": umb, "groups": groups}
    cfg = cu_config(tmp_path, explore={"stages": [stage]})
    ws = make_walkers(cfg, 1, 0, tmp_path / "ex")
    assert [w["bias"]["kind"] for w in ws] == ["umbrella", "metadynamics", "umbrella"]
    parsed = parse_walkers(ws, base=tmp_path / "ex")
    assert parsed[1].bias["cv"] == {"type": "volume", "per_atom": True} and parsed[1].bias["biasfactor"] is None
    bad = {**stage, "groups": None, "bias": {**umb, "kappa": "stiff"}}
    del bad["groups"]
    with pytest.raises(UserError) as err:
        cu_config(tmp_path, explore={"stages": [{**bad, "temperatures": [300.0]}]})
    assert str(err.value) == "explore.stages[0].bias.kappa: must be a number, got 'stiff'"
    with pytest.raises(UserError) as err:
        cu_config(tmp_path, explore={"stages": [{**bad, "temperatures": [300.0], "bias": mtd}]})
    assert str(err.value) == "explore.stages[0].bias.cv.type: volume needs a barostat (npt*), the ensemble is nvt"


def test_cupy_equals_numpy(tmp_path):
    """On a GPU (CuPy, CUDA graphs on): the bias forces, virials and energies of the distance,
    coordination and volume umbrellas equal NumPy's, and an explorer batch of metadynamics, steered
    and unbiased walkers writes the same bias.out and frames (to 1e-8)."""
    from engine_helpers import cupy_or_skip

    from dpsnake.engine.xp import to_numpy
    from dpsnake.md.trajectory import read_frames

    cp = cupy_or_skip()
    at = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2))
    at.rattle(0.15, seed=3)
    at.symbols[[1, 4, 6]] = "Ni"
    at.write(tmp_path / "cuni.extxyz")
    ws = _three_cvs(tmp_path / "cuni.extxyz", tmp_path / "cuni.extxyz", {"type": "volume"}, 80.0)
    outs = [BiasedProvider(Pair(hb=0.0))(_state(ws, ["Cu", "Ni"], xp), False) for xp in (np, cp)]
    for k in ("energy", "force", "virial"):
        np.testing.assert_allclose(to_numpy(outs[1][k]), outs[0][k], rtol=1e-12, atol=1e-12)
    s = _pair_file(tmp_path / "p.extxyz")
    steer = {"cv": {"type": "distance", "atoms": [0, 1]}, "kind": "steered", "kappa": 2.0, "from": 1.5, "to": 2.5}
    pw = [
        _walker("m", s, nsteps=100, bias=_mtd()),
        _walker("s", s, nsteps=100, seed=2, bias=steer),
        _walker("p", s, nsteps=100, seed=3),
    ]
    for name, xp in (("np", np), ("cp", cp)):
        Explorer(parse_walkers(pw), Pair(models=2), ["H"], tmp_path / name, xp=xp, progress=False).run()
    for w in ("m", "s"):
        a, b = (np.loadtxt(tmp_path / x / w / "bias.out") for x in ("np", "cp"))
        np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-10)
    for w in ("m", "s", "p"):
        fa, fb = (read_frames(tmp_path / x / w / "traj.extxyz") for x in ("np", "cp"))
        for x, y in zip(fa, fb):
            np.testing.assert_allclose(y.positions, x.positions, atol=1e-8)


def test_steered_distance_with_the_deepmd_kit_provider(tmp_path, pt_model):
    """DeePMD-kit's provider (a PyTorch-backend CuNi model, se_atten_v2): a steered bias pulls two
    neighbouring atoms from 2.5 to 3.6 A over 300 steps; they follow (the last frames' distance is
    within 0.25 A of the centre), and bias.out's CV equals the frames' minimum-image distance."""
    from dpsnake.md.deepmd_provider import DeepmdProvider
    from dpsnake.md.trajectory import read_frames

    at = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    at.symbols[::2] = "Ni"
    at.rattle(0.03, seed=2)
    at.write(tmp_path / "cuni.extxyz")
    bias = {"cv": {"type": "distance", "atoms": [0, 1]}, "kind": "steered", "kappa": 10.0, "from": 2.5, "to": 3.6}
    w = _walker("pull", tmp_path / "cuni.extxyz", ensemble="nvt", nsteps=300, trj_freq=50, dt=0.002, bias=bias)
    m = pt_model("se_atten_v2")
    summary = Explorer(
        parse_walkers([w]), DeepmdProvider([m["pth"]]), ["Cu", "Ni"], tmp_path / "o", progress=False
    ).run()
    assert summary["walkers"]["pull"]["status"] == "finished"
    rows = np.loadtxt(tmp_path / "o" / "pull" / "bias.out")
    frames = read_frames(tmp_path / "o" / "pull" / "traj.extxyz")
    np.testing.assert_allclose(rows[:, 1], [f.get_distance(0, 1, mic=True) for f in frames], rtol=1e-8)
    centre = 2.5 + 1.1 * rows[:, 0] / 300
    assert rows[0, 1] < 2.7 and np.abs(rows[-2:, 1] - centre[-2:]).max() < 0.25


def test_umbrella_windows_and_wham_recover_double_well_free_energy(tmp_path):
    """Umbrella sampling of the double-well pair: 12 windows from 1.3 to 2.7 A (kappa 2 eV/A^2), two
    walkers each, one batch, 5000 steps; histograms of the CV combined by WHAM give U(r) - 2 kT ln r on
    1.45..2.55 A within 0.35 kT RMS and 0.8 kT at any point."""
    nsteps, centres, kappa = 5000, np.linspace(1.3, 2.7, 12), 2.0
    ws = []
    for k, c in enumerate(centres):
        for r in range(2):
            b = {"cv": {"type": "distance", "atoms": [0, 1]}, "kind": "umbrella", "kappa": kappa, "at": float(c)}
            ws.append(
                _walker(
                    f"u{k}.{r}",
                    _pair_file(tmp_path / f"p{k}.extxyz", r=float(c)),
                    nsteps=nsteps,
                    seed=10 * k + r + 1,
                    bias=b,
                )
            )
    st = _state(ws, ["H"])
    prov = BiasedProvider(Pair())
    I.set_forces(st, prov(st, False))
    flags = st.flags()
    samples = []
    for n in range(nsteps):
        prov.step = n + 1
        I.md_step(st, prov, n, flags)
        if n >= 500 and n % 5 == 0:
            samples.append(st.b_out[:, 0].copy())
    x = np.array(samples).T.reshape(len(centres), -1)  # (windows, samples)
    kT = units.kB * 300.0
    edges = np.linspace(1.2, 2.8, 65)
    mid = 0.5 * (edges[1:] + edges[:-1])
    hist = np.array([np.histogram(xi, edges)[0] for xi in x], dtype=float)  # (K, B)
    bias = 0.5 * kappa * (mid[None, :] - centres[:, None]) ** 2 / kT  # (K, B) in kT
    f = np.zeros(len(centres))
    for _ in range(3000):  # WHAM self-consistency: p(b) = sum_k n_kb / sum_k N_k exp(f_k - u_kb)
        p = hist.sum(axis=0) / (hist.sum(axis=1)[:, None] * np.exp(f[:, None] - bias)).sum(axis=0)
        f_new = -np.log((p[None, :] * np.exp(-bias)).sum(axis=1))
        f_new -= f_new[0]
        if np.abs(f_new - f).max() < 1e-9:
            break
        f = f_new
    sel = (mid >= 1.45) & (mid <= 2.55)
    f_us = -kT * np.log(p[sel])
    f_ref = HB * ((mid[sel] - RC) ** 2 / DELTA**2 - 1) ** 2 - 2 * kT * np.log(mid[sel])
    err = (f_us - f_us.mean()) - (f_ref - f_ref.mean())
    rms, worst = np.sqrt((err**2).mean()) / kT, np.abs(err).max() / kT
    print(f"umbrella + WHAM: rms {rms:.3f} kT, max {worst:.3f} kT")
    assert rms < 0.35 and worst < 0.8
