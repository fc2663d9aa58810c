"""Exploration MD driven by the engine with real DeePMD-kit Cu models (NumPy)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from ase import units
from ase.build import bulk

from dpsnake.md import integrators as I
from dpsnake.md.explorer import Explorer
from dpsnake.md.providers import EnsembleProvider
from dpsnake.md.state import start_state
from dpsnake.md.trajectory import read_frames
from dpsnake.md.walkers import masses_for, parse_walkers, read_structure, read_structures

# a = 3.7 A keeps the third fcc shell (4.53 A) outside rcut = 4.5 A, so sel = 40 never overflows
A0 = 3.7


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def ensemble(paths, xp=None):
    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.engine.model import load_model

    return Ensemble([load_model(p) for p in paths], xp=xp)


def cu(path, rep=(2, 2, 2), rattle=0.05, seed=0, a=A0):
    at = bulk("Cu", "fcc", a=a, cubic=True).repeat(rep)
    if rattle:
        at.rattle(rattle, seed=seed)
    at.write(path, format="extxyz")
    return str(path)


def walker(name, structure, **kw):
    d = dict(
        name=name, structure=structure, ensemble="nve", temperature=300.0, nsteps=20, dt=0.002, trj_freq=10, seed=1
    )
    d.update(kw)
    return d


def batch(walkers, model_paths, xp=np):
    """(state, provider, flags) for parsed walkers, started as the runner starts them (arrays in xp)."""
    ws = parse_walkers(walkers)
    prov = EnsembleProvider(ensemble(model_paths, xp))
    st = start_state(ws, read_structures(ws, ["Cu"]), xp)
    I.set_forces(st, prov(st, False))
    return st, prov, st.flags()


def test_first_steps_equal_ase_velocity_verlet(tmp_path, cu_model):
    from ase.md.verlet import VelocityVerlet

    from dpsnake.engine.calculator import DP

    s = cu(tmp_path / "cu.extxyz", rattle=0.1, seed=3)
    st, prov, flags = batch([walker("a", s, temperature=600.0, dt=0.001, seed=5)], [cu_model["dp"]])
    atoms = read_structure(parse_walkers([walker("a", s)])[0], ["Cu"])[0]
    atoms.set_velocities(st.vel.copy())
    atoms.calc = DP(cu_model["dp"])
    dyn = VelocityVerlet(atoms, timestep=0.001 * 1000 * units.fs)
    for k in range(10):
        I.md_step(st, prov, k, flags)
        dyn.run(1)
        assert np.abs(st.pos - atoms.positions).max() < 1e-10
        assert np.abs(st.vel - atoms.get_velocities()).max() < 1e-10
    assert np.abs(st.pos - read_structure(parse_walkers([walker("a", s)])[0], ["Cu"])[0].positions).max() > 1e-3


def test_nve_energy_drift_5ps(tmp_path, cu_model):
    """32 Cu atoms, 300 K, dt 2 fs, 2500 steps (5 ps): total energy stays within 2e-5 eV/atom of its
    start and its linear drift is below 2e-6 eV/atom/ps (measured: 9e-7 and 1e-8)."""
    s = cu(tmp_path / "cu.extxyz")
    st, prov, flags = batch([walker("a", s, dt=0.002, seed=2)], [cu_model["dp"]])
    n = 32
    etot = [float(st.energy[0] + I.kinetic_energy(st)[0])]
    for k in range(2500):
        I.md_step(st, prov, k, flags)
        etot.append(float(st.energy[0] + I.kinetic_energy(st)[0]))
    e = (np.array(etot) - etot[0]) / n
    slope = np.polyfit(np.arange(len(e)) * 0.002, e, 1)[0]
    temp = float(I.temperature(st)[0])
    print(f"NVE 5 ps: max |dE| {np.abs(e).max():.2e} eV/atom, drift {slope:.2e} eV/atom/ps, T_end {temp:.0f} K")
    assert np.abs(e).max() < 2e-5
    assert abs(slope) < 2e-6
    assert 30 < temp < 600  # it moved


def test_walker_in_batch_equals_walker_alone(tmp_path, models):
    big = cu(tmp_path / "big.extxyz", seed=1)
    small = cu(tmp_path / "small.extxyz", rep=(1, 1, 1), seed=2)
    mid = cu(tmp_path / "mid.extxyz", rep=(2, 1, 1), seed=3)
    ws = [
        walker("lang", big, ensemble="nvt-langevin", seed=7, nsteps=60),
        walker("npt", small, ensemble="npt-tri", pressure=1000.0, seed=8, nsteps=60, trj_freq=15),
        walker("nhc", mid, ensemble="nvt", seed=9, nsteps=40, trj_freq=20),
    ]
    Explorer(parse_walkers(ws), EnsembleProvider(ensemble(models)), ["Cu"], tmp_path / "batch", progress=False).run()
    for w in ws[:2]:
        Explorer(
            parse_walkers([w]), EnsembleProvider(ensemble(models)), ["Cu"], tmp_path / w["name"], progress=False
        ).run()
        fb = read_frames(tmp_path / "batch" / w["name"] / "traj.extxyz")
        fa = read_frames(tmp_path / w["name"] / w["name"] / "traj.extxyz")
        assert [f.info["step"] for f in fb] == [f.info["step"] for f in fa] == list(range(0, 61, w.get("trj_freq", 10)))
        for x, y in zip(fb, fa):
            assert np.abs(x.positions - y.positions).max() < 1e-8
            assert np.abs(x.cell.array - y.cell.array).max() < 1e-8
        assert np.abs(fb[-1].positions - fb[0].positions).max() > 1e-3
        db = np.loadtxt(tmp_path / "batch" / w["name"] / "model_devi.out")
        da = np.loadtxt(tmp_path / w["name"] / w["name"] / "model_devi.out")
        assert np.allclose(db, da, rtol=1e-5, atol=1e-12)


def test_early_stop_reasons_and_others_continue(tmp_path, models):
    ok = cu(tmp_path / "ok.extxyz", rep=(2, 1, 1), seed=1)
    close = bulk("Cu", "fcc", a=A0, cubic=True).repeat((2, 1, 1))
    close.positions[1] = close.positions[0] + [0.9, 0, 0]
    close.write(tmp_path / "close.extxyz")
    same = close.copy()
    same.positions[1] = same.positions[0]
    same.write(tmp_path / "same.extxyz")
    # the NaN walker sits after "ok": its NaN must not leak onto other walkers' atoms
    ws = [
        walker("ok", ok, ensemble="nvt", nsteps=30, trj_freq=5),
        walker("nan", str(tmp_path / "same.extxyz"), nsteps=30, trj_freq=5),
        walker("cap", ok, ensemble="nvt", nsteps=30, trj_freq=5, max_devi_f_cap=1e-9, max_devi_f_patience=2),
        walker("close", str(tmp_path / "close.extxyz"), nsteps=30, trj_freq=5, min_dist=1.5),
        walker("odd", ok, ensemble="nvt-langevin", nsteps=13, trj_freq=5, min_dist=1.5),
    ]
    out = tmp_path / "run"
    summary = Explorer(parse_walkers(ws), EnsembleProvider(ensemble(models)), ["Cu"], out, progress=False).run()
    r = summary["walkers"]
    assert r["ok"] == {"status": "finished", "reason": None, "steps": 30}
    assert r["cap"]["status"] == "failed" and "max_devi_f above cap" in r["cap"]["reason"] and r["cap"]["steps"] == 5
    assert (
        r["close"]["status"] == "failed" and "closer than min_dist" in r["close"]["reason"] and r["close"]["steps"] == 0
    )
    assert r["nan"]["status"] == "failed" and "non-finite" in r["nan"]["reason"] and r["nan"]["steps"] == 0
    assert json.loads((out / "summary.json").read_text()) == summary
    assert [f.info["step"] for f in read_frames(out / "ok" / "traj.extxyz")] == [0, 5, 10, 15, 20, 25, 30]
    assert [f.info["step"] for f in read_frames(out / "cap" / "traj.extxyz")] == [0, 5]
    assert r["odd"] == {"status": "finished", "reason": None, "steps": 13}
    assert [f.info["step"] for f in read_frames(out / "odd" / "traj.extxyz")] == [0, 5, 10]
    assert len(read_frames(out / "close" / "traj.extxyz")) == 1
    assert (out / "nan" / "traj.extxyz").read_text() == ""
    assert not list(out.rglob("*.part")) and not (out / "checkpoint.npz").exists()


def test_model_devi_equals_engine_on_written_frames_and_dpdata_reads(tmp_path, models):
    import dpdata

    from dpsnake.engine.model_devi import deviation_columns, read_model_devi

    ws = [
        walker("a", cu(tmp_path / "a.extxyz", seed=4), ensemble="npt", pressure=5000.0, nsteps=40, trj_freq=10),
        walker(
            "b",
            cu(tmp_path / "b.extxyz", rep=(2, 1, 1), seed=5),
            ensemble="nvt-langevin",
            temperature=900.0,
            nsteps=40,
            trj_freq=8,
        ),
    ]
    out = tmp_path / "run"
    Explorer(parse_walkers(ws), EnsembleProvider(ensemble(models)), ["Cu"], out, progress=False).run()
    ens = ensemble(models)
    for w in ws:
        frames = read_frames(out / w["name"] / "traj.extxyz")
        devi = read_model_devi(out / w["name"] / "model_devi.out")
        assert devi["step"].tolist() == [f.info["step"] for f in frames] == list(range(0, 41, w["trj_freq"]))
        for k, f in enumerate(frames):
            n = len(f)
            o = ens.evaluate(f.positions, np.zeros(n, int), np.zeros(n, int), f.cell.array[None], np.array([True]))
            cols = deviation_columns(o, np.zeros(n, int), np.array([n]))
            for c in ("max_devi_v", "min_devi_v", "avg_devi_v", "max_devi_f", "min_devi_f", "avg_devi_f"):
                assert devi[c][k] == pytest.approx(cols[c][0], rel=2e-6, abs=1e-12), (w["name"], k, c)
        assert devi["max_devi_f"].max() > 1e-4
        ms = dpdata.MultiSystems.from_file(str(out / w["name"] / "traj.extxyz"), fmt="ase/structure", labeled=False)
        s = ms[0]
        assert s.get_nframes() == len(frames) and s["atom_names"] == ["Cu"]
        assert np.allclose(s["coords"][-1], frames[-1].positions) and np.allclose(s["cells"][-1], frames[-1].cell.array)
    assert not np.allclose(
        read_frames(out / "a" / "traj.extxyz")[-1].cell.array, read_frames(out / "a" / "traj.extxyz")[0].cell.array
    )


def _cli(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "dpsnake.cli", "explore", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_frames_formatted_in_helper_process_are_identical(tmp_path, models):
    ws = [
        walker("a", cu(tmp_path / "a.extxyz", seed=4), ensemble="npt", pressure=1.0, nsteps=30, trj_freq=5),
        walker("b", cu(tmp_path / "b.extxyz", rep=(2, 1, 1), seed=5), ensemble="nvt-langevin", nsteps=20, trj_freq=4),
    ]
    for mode in (False, True):
        Explorer(
            parse_walkers(ws),
            EnsembleProvider(ensemble(models)),
            ["Cu"],
            tmp_path / str(mode),
            progress=False,
            async_frames=mode,
        ).run()
    for w in ws:
        for f in ("traj.extxyz", "model_devi.out"):
            assert (tmp_path / "True" / w["name"] / f).read_bytes() == (tmp_path / "False" / w["name"] / f).read_bytes()
    assert len(read_frames(tmp_path / "True" / "a" / "traj.extxyz")) == 7


def test_checkpoint_kill_and_resume_equals_uninterrupted(tmp_path, models):
    ws = [
        walker("lang", cu(tmp_path / "a.extxyz", seed=6), ensemble="nvt-langevin", nsteps=200, trj_freq=10),
        walker(
            "npt",
            cu(tmp_path / "b.extxyz", rep=(1, 1, 1), seed=7),
            ensemble="npt-aniso",
            pressure=100.0,
            nsteps=160,
            trj_freq=20,
            seed=3,
        ),
        walker("nhc", cu(tmp_path / "c.extxyz", rep=(2, 1, 1), seed=8), ensemble="nvt", nsteps=90, trj_freq=30),
    ]
    wf = tmp_path / "walkers.json"
    wf.write_text(json.dumps(ws))
    args = ["--models", *models, "--walkers", str(wf), "--device", "cpu", "--checkpoint-steps", "40"]
    # uninterrupted reference, in-process
    from dpsnake.cli import main

    assert main(["explore", *args, "--outdir", str(tmp_path / "ref"), "--no-progress"]) == 0
    # killed run, frames formatted in the helper process (as on GPUs)
    run = tmp_path / "run"
    p = _cli([*args, "--outdir", str(run), "--async-frames", "on"])
    ck = run / "checkpoint.npz"
    t0 = time.time()
    step = 0
    while time.time() - t0 < 240:
        if ck.exists():
            try:
                with np.load(ck) as z:
                    step = json.loads(str(z["meta"]))["step"]
            except Exception:
                step = 0
            if step >= 120:
                break
        assert p.poll() is None, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert not (run / "summary.json").exists() and step >= 120
    with np.load(ck) as z:
        step = json.loads(str(z["meta"]))["step"]  # a later checkpoint may have landed before the kill
    assert (run / "lang" / "traj.extxyz.part").exists()
    # the rerun resumes (progress bar starts at the checkpoint's step) and ends equal to the reference
    p = _cli([*args, "--outdir", str(run)])
    _, err = p.communicate(timeout=240)
    assert p.returncode == 0, err
    shown = [int(x) for x in re.findall(r"(\d+)/200", err)]
    assert shown and min(shown) == step and max(shown) == 200
    assert "3/3 walkers finished" in err
    ref = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert json.loads((run / "summary.json").read_text()) == ref
    assert all(r["status"] == "finished" for r in ref["walkers"].values())
    for w in ws:
        fr, fk = read_frames(tmp_path / "ref" / w["name"] / "traj.extxyz"), read_frames(run / w["name"] / "traj.extxyz")
        assert [f.info["step"] for f in fk] == list(range(0, w["nsteps"] + 1, w["trj_freq"]))
        assert len(fr) == len(fk)
        for x, y in zip(fr, fk):
            assert np.abs(x.positions - y.positions).max() < 1e-9
            assert np.abs(x.cell.array - y.cell.array).max() < 1e-9
        assert (tmp_path / "ref" / w["name"] / "model_devi.out").read_text() == (
            run / w["name"] / "model_devi.out"
        ).read_text()
    assert not list(run.rglob("*.part")) and not (run / "checkpoint.npz").exists()
    # a rerun after completion does nothing and keeps the outputs
    assert main(["explore", *args, "--outdir", str(run), "--no-progress"]) == 0
    assert json.loads((run / "summary.json").read_text()) == ref
    # SIGTERM (SLURM's warning): checkpoint at the current step, exit 143; the rerun finishes equal
    term = tmp_path / "term"
    p = _cli([*args, "--outdir", str(term)])
    while not (term / "checkpoint.npz").exists():
        assert p.poll() is None, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=120)
    assert p.returncode == 143 and not (term / "summary.json").exists()
    assert main(["explore", *args, "--outdir", str(term), "--no-progress"]) == 0
    for w in ws:
        assert (tmp_path / "ref" / w["name"] / "model_devi.out").read_text() == (
            term / w["name"] / "model_devi.out"
        ).read_text()


def test_cli_bad_input_is_one_line(tmp_path, models, capsys):
    from dpsnake.cli import main

    wf = tmp_path / "walkers.json"
    wf.write_text(json.dumps([walker("a", "nope.xyz")]))
    assert (
        main(["explore", "--models", *models, "--walkers", str(wf), "--outdir", str(tmp_path / "o"), "--device", "cpu"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "walker 'a'" in err and "nope.xyz" in err
    wf.write_text(json.dumps([walker("a", cu(tmp_path / "a.extxyz"))]))
    assert (
        main(
            [
                "explore",
                "--models",
                "missing.dp",
                "--walkers",
                str(wf),
                "--outdir",
                str(tmp_path / "o"),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "missing.dp" in capsys.readouterr().err


def test_mixed_compositions_lammps_data_input(tmp_path, dp_model):
    """CuNi and pure Cu walkers (different sizes, a LAMMPS data file) in one batch with a CuNi model."""
    import ase.io

    m = str(dp_model(data="CuNi")["dp"])
    a = bulk("Cu", "fcc", a=A0, cubic=True).repeat((2, 2, 1))
    a.symbols[[1, 4, 6, 11, 13]] = "Ni"
    a.rattle(0.05, seed=9)
    ase.io.write(tmp_path / "cuni.data", a, format="lammps-data", specorder=["Cu", "Ni"], masses=True)
    ws = [
        walker("cuni", str(tmp_path / "cuni.data"), ensemble="nvt", thermostat="bussi", nsteps=30),
        walker("cu", cu(tmp_path / "cu.extxyz", rep=(1, 1, 1)), ensemble="npt", pressure=1.0, nsteps=30),
    ]
    Explorer(parse_walkers(ws), EnsembleProvider(ensemble([m])), ["Cu", "Ni"], tmp_path / "b", progress=False).run()
    Explorer(parse_walkers(ws[:1]), EnsembleProvider(ensemble([m])), ["Cu", "Ni"], tmp_path / "a", progress=False).run()
    fb, fa = read_frames(tmp_path / "b" / "cuni" / "traj.extxyz"), read_frames(tmp_path / "a" / "cuni" / "traj.extxyz")
    assert fb[0].get_chemical_symbols() == a.get_chemical_symbols()
    assert np.abs(fb[0].positions - a.positions).max() < 1e-8
    assert np.abs(fb[-1].positions - fa[-1].positions).max() < 1e-8
    assert np.abs(fb[-1].positions - fb[0].positions).max() > 1e-3
    # masses come from the type map
    atoms, at = read_structure(parse_walkers(ws[:1])[0], ["Cu", "Ni"])
    mass = masses_for(at, ["Cu", "Ni"])
    assert np.allclose(mass[at == 1], 58.6934, atol=1e-3) and np.allclose(mass[at == 0], 63.546, atol=1e-3)


def test_nhc_conserved_quantity_and_ase_provider(tmp_path, cu_model):
    """E_pot + E_kin + E_chain is conserved by the Nose-Hoover chain (8 atoms, 1000 steps of 2 fs),
    while the kinetic energy fluctuates 100x more; the ASE-calculator provider (engine's DP
    calculator, walker by walker) gives the same steps as the batched engine."""
    from dpsnake.engine.calculator import DP
    from dpsnake.md.providers import ASEProvider

    s = cu(tmp_path / "c.extxyz", rep=(2, 1, 1), seed=4)
    spec = [
        walker("a", s, ensemble="nvt", temperature=400.0, tau_t=0.05, seed=3),
        walker("b", cu(tmp_path / "d.extxyz", rep=(1, 1, 1), seed=5), ensemble="npt", pressure=1e4, seed=4),
    ]
    st, prov, flags = batch(spec, [cu_model["dp"]])
    h, kin = [], []
    for k in range(1000):
        I.md_step(st, prov, k, flags)
        h.append(float((st.energy + I.kinetic_energy(st) + I.nhc_energy(st))[0]))
        kin.append(float(I.kinetic_energy(st)[0]))
    assert np.ptp(h) < 0.01 * np.ptp(kin) and np.ptp(kin) > 0.05
    st1, prov1, _ = batch(spec, [cu_model["dp"]])
    st2, _, _ = batch(spec, [cu_model["dp"]])
    prov2 = ASEProvider([DP(cu_model["dp"])], ["Cu"])
    for k in range(20):
        I.md_step(st1, prov1, k, flags)
        I.md_step(st2, prov2, k, flags)
    assert np.abs(st1.pos - st2.pos).max() < 1e-10 and np.abs(st1.cells - st2.cells).max() < 1e-10
    assert np.abs(st1.virial - st2.virial).max() < 1e-9


def test_unusable_checkpoint_starts_over(tmp_path, cu_model, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.npz").write_bytes(b"not a checkpoint")
    # a = 3.55 A puts the third shell inside rcut: more neighbours than sel, noted once at the end
    ws = parse_walkers([walker("a", cu(tmp_path / "a.extxyz", rep=(1, 1, 1), a=3.55), nsteps=10)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        s = Explorer(ws, EnsembleProvider(ensemble([cu_model["dp"]])), ["Cu"], out, progress=False).run()
    assert s["walkers"]["a"]["status"] == "finished"
    err = capsys.readouterr().err
    assert "starting over" in err and "more neighbours than the models' sel" in err
    assert [f.info["step"] for f in read_frames(out / "a" / "traj.extxyz")] == [0, 10]


@pytest.mark.parametrize("part", ["weights", "bias"])
def test_nan_in_a_deviation_model_fails_that_walker_only(tmp_path, dp_model, part):
    """A model that is not the driving one turns NaN on Ni atoms (its Ni fitting net's weights, or
    its Ni energy bias: NaN energies with finite forces, made NaN in memory, as a file with such
    values no longer loads): the CuNi walker fails with the reason, its model_devi.out has no NaN
    row; the pure Cu walker in the same batch finishes."""
    import copy

    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.engine.model import load_model

    p = str(dp_model(data="CuNi")["dp"])
    good, bad = load_model(p), copy.deepcopy(load_model(p))
    if part == "weights":
        bad.fittings[1].layers[0].w[:] = np.nan
    else:
        bad.bias[1] = np.nan
    a = bulk("Cu", "fcc", a=A0, cubic=True).repeat((2, 1, 1))
    a.symbols[[1, 4]] = "Ni"
    a.rattle(0.05, seed=3)
    a.write(tmp_path / "cuni.extxyz")
    ws = [
        walker("cuni", str(tmp_path / "cuni.extxyz"), ensemble="nvt", nsteps=20, trj_freq=5),
        walker("cu", cu(tmp_path / "cu.extxyz", rep=(2, 1, 1)), ensemble="nvt", nsteps=20, trj_freq=5),
    ]
    out = tmp_path / "run"
    r = Explorer(parse_walkers(ws), EnsembleProvider(Ensemble([good, bad])), ["Cu", "Ni"], out, progress=False).run()[
        "walkers"
    ]
    assert r["cuni"] == {"status": "failed", "reason": "non-finite numbers (NaN/inf) at step 0", "steps": 0}
    assert r["cu"] == {"status": "finished", "reason": None, "steps": 20}
    rows = {
        n: [ln for ln in (out / n / "model_devi.out").read_text().splitlines() if not ln.startswith("#")]
        for n in ("cuni", "cu")
    }
    assert rows["cuni"] == [] and len(rows["cu"]) == 5
    assert np.isfinite(np.loadtxt(rows["cu"])).all()
    assert (out / "cuni" / "traj.extxyz").read_text() == ""
