"""Structure search (issue 20 item 4): random AIRSS-style start structures, and relax walkers (FIRE on
the batch, optionally with the cell) against ASE's FIRE / UnitCellFilter on the same DeePMD model."""

import json
import warnings

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.neighborlist import neighbor_list

from dpsnake.errors import UserError
from dpsnake.md.explorer import Explorer
from dpsnake.md.providers import EnsembleProvider
from dpsnake.md.trajectory import read_frames
from dpsnake.md.walkers import parse_walkers
from dpsnake.workflow.random_structures import random_structure, walker_seed

SPEC = {"composition": {"Cu": 4, "Ni": 4}, "volume_per_atom": [10.0, 14.0], "min_dist": 2.0, "seed": 3}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def provider(paths):
    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.engine.model import load_model

    return EnsembleProvider(Ensemble([load_model(p) for p in paths]))


def cu(path, rep=(2, 2, 2), rattle=0.1, seed=0, a=3.7, stretch=1.0):
    at = bulk("Cu", "fcc", a=a, cubic=True).repeat(rep)
    at.set_cell(at.cell.array * np.array([stretch, 1.0, 1.0 / stretch**0.5])[:, None], scale_atoms=True)
    at.rattle(rattle, seed=seed)
    at.write(path, format="extxyz")
    return str(path)


def relax_walker(name, structure, **kw):
    d = dict(name=name, structure=structure, ensemble="relax", nsteps=400, trj_freq=10, seed=1, fmax=0.01)
    d.update(kw)
    return d


def run(tmp_path, walkers, paths, **kw):
    ex = Explorer(parse_walkers(walkers), provider(paths), ["Cu"], tmp_path, progress=False, **kw)
    return ex.run()


# ----------------------------------------------------------------------------- random structures
def test_random_structure_composition_volume_min_dist_seeded():
    pair = {"Cu-Cu": 2.3, "Cu-Ni": 2.1, "Ni-Ni": 2.2}
    seen = set()
    for seed in range(6):
        spec = {**SPEC, "min_dist": pair}
        at = random_structure(spec, seed=seed)
        assert sorted(at.get_chemical_symbols()) == ["Cu"] * 4 + ["Ni"] * 4
        assert at.pbc.all()
        assert 10.0 * 8 - 1e-9 <= at.cell.volume <= 14.0 * 8 + 1e-9
        ang = at.cell.cellpar()[3:]
        assert ((ang >= 60 - 1e-9) & (ang <= 120 + 1e-9)).all()
        # every pair within 3 A, all periodic images (ASE's neighbour list, not the generator's check)
        i, j, d = neighbor_list("ijd", at, 3.0)
        s = np.array(at.get_chemical_symbols())
        need = np.array([pair["-".join(sorted((s[a], s[b])))] for a, b in zip(i, j)])
        assert (d >= need - 1e-9).all()
        again = random_structure(spec, seed=seed)
        assert np.array_equal(again.positions, at.positions) and np.array_equal(again.cell.array, at.cell.array)
        seen.add(round(float(at.cell.volume), 8))
    assert len(seen) == 6  # different seeds: different structures
    seeds = {walker_seed(SPEC, k) for k in range(1, 50)}
    assert len(seeds) == 49
    a, b = random_structure(SPEC, seed=walker_seed(SPEC, 1)), random_structure(SPEC, seed=walker_seed(SPEC, 2))
    assert not np.allclose(a.cell.array, b.cell.array)


@pytest.mark.parametrize(
    "spec, key",
    [
        ({**SPEC, "composition": {"Cu": 0}}, "composition.Cu"),
        ({**SPEC, "composition": {"Xx": 2}}, "composition.Xx"),
        ({**SPEC, "volume_per_atom": [14, 10]}, "volume_per_atom"),
        ({**SPEC, "min_dist": {"Cu-Cu": 2.0}}, "min_dist"),
        ({**SPEC, "min_dist": {"Cu-Fe": 2.0}}, "min_dist.Cu-Fe"),
        ({**SPEC, "min_dist": -1}, "min_dist"),
        ({**SPEC, "volume_per_atom": 2.0, "min_dist": 3.0}, "structure.random"),
        ({**SPEC, "colour": 1}, "colour"),
        ({**SPEC, "angles": [60, 190]}, "angles"),
    ],
)
def test_random_structure_bad_values_one_line(spec, key):
    with pytest.raises(UserError) as err:
        random_structure(spec)
    msg = str(err.value)
    assert (
        "\n" not in msg
        and f"structure.random.{key}".replace("structure.random.structure.random", "structure.random") in msg
    )


# ----------------------------------------------------------------------------- FIRE vs ASE
def _ase_relax(path, model, fmax, cell=False, pressure_bar=0.0):
    import ase.io
    from ase.filters import UnitCellFilter
    from ase.optimize import FIRE

    from dpsnake.engine.calculator import DP

    atoms = ase.io.read(path)
    atoms.calc = DP(model)
    target = UnitCellFilter(atoms, scalar_pressure=pressure_bar * units.bar) if cell else atoms
    opt = FIRE(target, logfile=None)
    opt.run(fmax=fmax, steps=1000)
    return atoms, opt.nsteps


def test_fire_positions_agree_with_ase(tmp_path, cu_model):
    """32 rattled Cu atoms: the relax walker stops below fmax = 0.01 eV/A after the same number of FIRE
    steps as ase.optimize.FIRE on dpsnake's ASE calculator, at the same positions (1e-6 A) and energy."""
    from dpsnake.engine.calculator import DP

    s = cu(tmp_path / "cu.extxyz", seed=4)
    summary = run(tmp_path / "run", [relax_walker("r", s)], [cu_model["dp"]])
    rec = summary["walkers"]["r"]
    ref, nsteps = _ase_relax(s, cu_model["dp"], 0.01)
    assert rec["status"] == "finished" and f"after {nsteps} FIRE steps" in rec["reason"], (rec, nsteps)
    frames = read_frames(tmp_path / "run" / "r" / "traj.extxyz")
    assert frames[-1].info["step"] == rec["steps"] == -(-nsteps // 10) * 10  # the next frame after it
    last = frames[-1]
    dpos = np.abs(last.positions - ref.positions).max()
    last.calc = DP(cu_model["dp"])
    de = abs(last.get_potential_energy() - ref.get_potential_energy())
    print(f"FIRE positions: {nsteps} steps, |dpos| {dpos:.2e} A, |dE| {de:.2e} eV")
    assert np.linalg.norm(last.get_forces(), axis=1).max() < 0.01
    assert dpos < 1e-6 and de < 1e-8
    assert np.abs(last.positions - frames[0].positions).max() > 0.02  # it moved
    devi = np.loadtxt(tmp_path / "run" / "r" / "model_devi.out")
    assert devi.shape == (len(frames), 7) and devi[-1, 0] == rec["steps"]


@pytest.mark.parametrize("pressure", [0.0, 20000.0])
def test_fire_cell_agrees_with_ase_unitcellfilter(tmp_path, cu_model, pressure):
    """A stretched, rattled Cu cell relaxed with its cell (at 0 and 2 GPa) = ASE's UnitCellFilter +
    FIRE: same steps, volume within 1e-6 A^3, energy within 1e-8 eV."""
    from dpsnake.engine.calculator import DP

    s = cu(tmp_path / "cu.extxyz", seed=5, stretch=1.04)
    w = relax_walker("c", s, relax_cell=True, pressure=pressure, fmax=0.01, nsteps=600)
    summary = run(tmp_path / "run", [w], [cu_model["dp"]])
    rec = summary["walkers"]["c"]
    ref, nsteps = _ase_relax(s, cu_model["dp"], 0.01, cell=True, pressure_bar=pressure)
    assert rec["status"] == "finished" and f"after {nsteps} FIRE steps" in rec["reason"], (rec, nsteps)
    last = read_frames(tmp_path / "run" / "c" / "traj.extxyz")[-1]
    last.calc = DP(cu_model["dp"])
    dv = abs(last.cell.volume - ref.cell.volume)
    de = abs(last.get_potential_energy() - ref.get_potential_energy())
    dpos = np.abs(last.positions - ref.positions).max()
    print(f"FIRE cell P={pressure:g} bar: {nsteps} steps, V {ref.cell.volume:.4f} |dV| {dv:.2e} A^3, |dE| {de:.2e} eV")
    assert dv < 1e-6 and de < 1e-8 and dpos < 1e-6
    v0 = read_frames(tmp_path / "run" / "c" / "traj.extxyz")[0].cell.volume
    assert abs(last.cell.volume - v0) > 0.1  # the cell relaxed
    stress = -last.get_stress(voigt=False) - pressure * units.bar * np.eye(3)  # enthalpy gradient / V
    assert np.abs(stress).max() * last.cell.volume / len(last) < 0.01


# ----------------------------------------------------------------------------- batches, resume, errors
def test_relax_and_md_in_one_batch_equal_alone(tmp_path, models):
    a = cu(tmp_path / "a.extxyz", seed=1)
    b = cu(tmp_path / "b.extxyz", rep=(2, 1, 1), seed=2)
    md = dict(name="md", structure=b, ensemble="nvt", temperature=600.0, nsteps=60, dt=0.002, trj_freq=10, seed=7)
    rw = relax_walker("r", a, nsteps=60)
    run(tmp_path / "batch", [rw, md], models)
    for w in (md, rw):
        run(tmp_path / w["name"], [w], models)
        fb = read_frames(tmp_path / "batch" / w["name"] / "traj.extxyz")
        fa = read_frames(tmp_path / w["name"] / w["name"] / "traj.extxyz")
        # the relax walker converges (and leaves the batch) after 29 FIRE steps, the MD walker runs on
        last = 60 if w is md else 30
        assert [f.info["step"] for f in fb] == [f.info["step"] for f in fa] == list(range(0, last + 1, 10))
        for x, y in zip(fb, fa):
            assert np.abs(x.positions - y.positions).max() < 1e-8
        assert np.abs(fb[-1].positions - fb[0].positions).max() > 1e-3
        db = np.loadtxt(tmp_path / "batch" / w["name"] / "model_devi.out")
        da = np.loadtxt(tmp_path / w["name"] / w["name"] / "model_devi.out")
        assert np.allclose(db, da, rtol=1e-6, atol=1e-12) and (db[:, 4] > 0).all()


def test_relax_resume_equals_uninterrupted(tmp_path, models):
    s = cu(tmp_path / "c.extxyz", seed=6, stretch=1.03)
    b = cu(tmp_path / "b.extxyz", rep=(2, 1, 1), seed=2)
    ws = [
        relax_walker("c", s, relax_cell=True, nsteps=80),
        relax_walker("p", b, nsteps=80),
        dict(
            name="md",
            structure=b,
            ensemble="npt",
            temperature=500.0,
            pressure=0.0,
            nsteps=80,
            dt=0.002,
            trj_freq=10,
            seed=3,
        ),
    ]
    run(tmp_path / "once", ws, models)
    assert run(tmp_path / "twice", ws, models, stop_after=23, checkpoint_steps=5) == {}
    with np.load(tmp_path / "twice" / "checkpoint.npz") as z:
        meta = json.loads(str(z["meta"]))
        assert meta["status"]["c"]["status"] == "running" and int(z["s_fire_k"][0]) == 23  # stopped mid-relaxation
    summary = run(tmp_path / "twice", ws, models)
    assert all(r["status"] == "finished" for r in summary["walkers"].values())
    for w in ws:
        for f in ("traj.extxyz", "model_devi.out"):
            x = (tmp_path / "once" / w["name"] / f).read_bytes()
            assert x == (tmp_path / "twice" / w["name"] / f).read_bytes(), (w["name"], f)


@pytest.mark.parametrize(
    "extra, key",
    [
        ({"fmax": -1.0}, "'fmax'"),
        ({"fmax": "small"}, "'fmax'"),
        ({"relax_cell": "yes"}, "'relax_cell'"),
        ({"maxstep": 0}, "'maxstep'"),
        ({"temperature": 300.0}, "'temperature'"),
        ({"thermostat": "nhc"}, "'thermostat'"),
        ({"pressure": 100.0}, "'pressure'"),
        ({"ensemble": "nvt", "temperature": 300.0, "dt": 0.001}, "'fmax'"),
    ],
)
def test_relax_walker_bad_values_one_line(tmp_path, extra, key):
    s = cu(tmp_path / "c.extxyz")
    with pytest.raises(UserError) as err:
        parse_walkers([{**relax_walker("r", s), **extra}])
    assert "\n" not in str(err.value) and key in str(err.value) and "walker 'r'" in str(err.value)


# ----------------------------------------------------------------------------- config: stages, plan
def test_plan_relax_group_random_structures_per_walker(tmp_path):
    """A stage with an MD group on Cu and a relax group (cell at two pressures, 2 replicas) on a random
    CuNi system: every relax walker starts from its own random structure, its seed in its recipe."""
    import ase.io
    from select_helpers import cu_config

    from dpsnake.workflow.plan import make_walkers

    rnd = {"structure": {"random": {**SPEC, "min_dist": {"Cu-Cu": 2.2, "Cu-Ni": 2.1, "Ni-Ni": 2.2}}}}
    groups = [
        {"systems": ["Cu"], "temperatures": [300.0]},
        {
            "name": "rs",
            "systems": ["CuNi"],
            "ensemble": "relax",
            "relax_cell": True,
            "fmax": 0.02,
            "pressures": [0.0, 1e4],
            "replicas": 2,
        },
    ]
    systems = {**cu_config(".")["systems"], "CuNi": rnd}
    stage = {"explore": {"stages": [{"nsteps": 40, "trj_freq": 5, "groups": groups}]}, "type_map": ["Cu", "Ni"]}
    cfg = cu_config(tmp_path, systems=systems, **stage)
    ws = make_walkers(cfg, 1, 0, tmp_path / "ex")
    rel = [w for w in ws if w["ensemble"] == "relax"]
    assert [w["name"] for w in rel] == [
        "CuNi.rs.relax.P0.r0",
        "CuNi.rs.relax.P0.r1",
        "CuNi.rs.relax.P10000.r0",
        "CuNi.rs.relax.P10000.r1",
    ]
    assert all(w["relax_cell"] and w["fmax"] == 0.02 and "dt" not in w for w in rel)
    assert [w["pressure"] for w in rel] == [0.0, 0.0, 1e4, 1e4]
    cells = []
    for w in rel:
        at = ase.io.read(tmp_path / "ex" / w["structure"])
        assert sorted(at.get_chemical_symbols()) == ["Cu"] * 4 + ["Ni"] * 4
        seed = int(w["recipe"].split("seed:")[1].split()[0])
        ref = random_structure(SPEC | {"min_dist": rnd["structure"]["random"]["min_dist"]}, seed=seed)
        assert np.allclose(at.cell.array, ref.cell.array) and np.allclose(at.positions, ref.positions)
        cells.append(at.cell.volume)
    assert len(set(np.round(cells, 6))) == 4  # each walker its own structure
    parsed = parse_walkers(ws, base=tmp_path / "ex")
    assert [w.relax_cell for w in parsed if w.ensemble == "relax"] == [True] * 4


def test_stage_relax_bad_values_one_line(tmp_path):
    from select_helpers import cu_config

    bad = {"nsteps": 40, "trj_freq": 5, "ensemble": "relax", "temperature_ramp": {"start": 300, "stop": 600}}
    with pytest.raises(UserError) as err:
        cu_config(tmp_path, explore={"stages": [bad]})
    assert "\n" not in str(err.value) and "temperature_ramp" in str(err.value)


def test_checkpoint_hash_of_md_walkers_unchanged_by_relax_keys(tmp_path):
    """An MD walker's spec hash leaves out the relax keys at their defaults: checkpoints written before
    relax walkers existed still resume; a relax walker's fmax changes its hash."""
    import dataclasses
    import hashlib

    from dpsnake.md.explorer import spec_hash

    s = cu(tmp_path / "c.extxyz")
    md = parse_walkers(
        [dict(name="m", structure=s, ensemble="nvt", temperature=300.0, nsteps=10, dt=0.001, trj_freq=5, seed=1)]
    )
    old = [
        {k: v for k, v in dataclasses.asdict(w).items() if k not in ("fmax", "relax_cell", "maxstep", "bias")}
        for w in md
    ]
    blob = json.dumps([old, ["m.dp"]], sort_keys=True)
    assert spec_hash(md, ["m.dp"]) == hashlib.sha1(blob.encode()).hexdigest()
    r1 = parse_walkers([relax_walker("r", s, fmax=0.05)])
    r2 = parse_walkers([relax_walker("r", s, fmax=0.02)])
    assert spec_hash(r1, ["m.dp"]) != spec_hash(r2, ["m.dp"])


def test_relax_walker_not_converged_stops_at_nsteps(tmp_path, cu_model):
    s = cu(tmp_path / "c.extxyz", seed=2)
    summary = run(tmp_path / "run", [relax_walker("r", s, fmax=1e-7, nsteps=20, trj_freq=5)], [cu_model["dp"]])
    rec = summary["walkers"]["r"]
    assert rec["status"] == "finished" and rec["steps"] == 20 and "not relaxed below 1e-07 eV/A" in rec["reason"]
    assert [f.info["step"] for f in read_frames(tmp_path / "run" / "r" / "traj.extxyz")] == [0, 5, 10, 15, 20]


def test_relax_on_cupy_equals_numpy(tmp_path):
    """On a GPU (skipped without CuPy, a device and .whl/models/t_cu.dp or DPSNAKE_GPU_MODEL): relax
    walkers (positions; cell at 1 GPa) beside an NVT walker on CuPy (the MD walker in CUDA graphs
    after the relax walkers leave) equal the NumPy run: same stops, positions and cells to 1e-8 A."""
    from engine_helpers import cupy_and_model_or_skip

    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.engine.model import load_model

    cp, model = cupy_and_model_or_skip()
    a = cu(tmp_path / "a.extxyz", seed=1)
    c = cu(tmp_path / "c.extxyz", seed=3, stretch=1.03)
    b = cu(tmp_path / "b.extxyz", rep=(2, 1, 1), seed=2)
    md = dict(name="md", structure=b, ensemble="nvt", temperature=600.0, nsteps=120, dt=0.002, trj_freq=10, seed=7)
    ws = parse_walkers([relax_walker("r", a, nsteps=120), relax_walker("c", c, relax_cell=True, pressure=1e4), md])
    out = {}
    for name, xp in (("np", np), ("cp", cp)):
        prov = EnsembleProvider(Ensemble([load_model(str(model))], xp=xp))
        out[name] = Explorer(ws, prov, ["Cu"], tmp_path / name, xp=xp, progress=False).run()
    assert out["np"] == out["cp"]
    assert all("relaxed" in out["cp"]["walkers"][n]["reason"] for n in ("r", "c"))
    for w in ws:
        fa = read_frames(tmp_path / "np" / w.name / "traj.extxyz")
        fb = read_frames(tmp_path / "cp" / w.name / "traj.extxyz")
        assert [f.info["step"] for f in fa] == [f.info["step"] for f in fb]
        for x, y in zip(fa, fb):
            assert np.abs(x.positions - y.positions).max() < 1e-8
            assert np.abs(x.cell.array - y.cell.array).max() < 1e-8


def test_relax_with_the_deepmd_kit_provider_equals_the_builtin_engine(tmp_path, pt_model):
    """The same se_e2_a model as DeePMD-kit's .pth (DeepmdProvider) and as .dp (built-in engine): a relax
    walker with the cell takes the same FIRE steps to the same structure."""
    from dpsnake.md.deepmd_provider import DeepmdProvider

    m = pt_model("se_e2_a")
    s = cu(tmp_path / "cu.extxyz", seed=5)
    w = [relax_walker("r", s, relax_cell=True, pressure=5000.0, fmax=0.02)]
    out = {}
    for name, prov in (("dp", provider([m["dp"]])), ("pt", DeepmdProvider([m["pth"]]))):
        ex = Explorer(parse_walkers(w), prov, ["Cu", "Ni"], tmp_path / name, progress=False)
        out[name] = (ex.run()["walkers"]["r"], read_frames(tmp_path / name / "r" / "traj.extxyz")[-1])
    (rd, fd), (rp, fp) = out["dp"], out["pt"]
    assert rd["status"] == rp["status"] == "finished" and rd["reason"] == rp["reason"], (rd, rp)
    assert "relaxed" in rd["reason"] and rd["steps"] == rp["steps"]
    assert np.abs(fd.positions - fp.positions).max() < 1e-8
    assert abs(fd.get_volume() - fp.get_volume()) < 1e-6
