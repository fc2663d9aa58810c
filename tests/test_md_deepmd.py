"""Exploration on DeePMD-kit's own PyTorch models (explore.engine: deepmd), CPU, real models trained
for a few steps by DeePMD-kit (tests/dpmodels.py: CuNi, se_e2_a / se_atten_v2 / DPA-2 / DPA-3)."""

import json
import os
import pathlib
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest
from ase.build import bulk
from test_md_engine import walker  # the walker dict of the engine's MD tests

from dpsnake.md import integrators as I
from dpsnake.md.deepmd_provider import DeepmdProvider
from dpsnake.md.explorer import Explorer
from dpsnake.md.providers import EnsembleProvider
from dpsnake.md.state import start_state
from dpsnake.md.trajectory import read_frames
from dpsnake.md.walkers import parse_walkers, read_structures

TYPE_MAP = ["Cu", "Ni"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def cuni(rep=(2, 2, 2), a=3.6, seed=0, rattle=0.08):
    """A CuNi fcc cell: half of the atoms Ni (random), rattled."""
    rng = np.random.default_rng(seed)
    at = bulk("Cu", "fcc", a=a, cubic=True).repeat(rep)
    at.symbols[rng.permutation(len(at))[: len(at) // 2]] = "Ni"
    at.rattle(rattle, seed=seed + 1)
    return at


def write(at, path):
    at.write(path, format="extxyz")
    return str(path)


def flat_state(structs):
    """The provider's view of a batch (positions, types, walker index, cells, pbc) for ``structs``."""
    pos = np.concatenate([a.positions for a in structs])
    atype = np.concatenate([[TYPE_MAP.index(s) for s in a.get_chemical_symbols()] for a in structs])
    system = np.concatenate([np.full(len(a), i) for i, a in enumerate(structs)])
    return types.SimpleNamespace(
        pos=pos,
        atype=atype,
        system=system,
        natoms=np.array([len(a) for a in structs]),
        pbc=np.array([bool(a.pbc.all()) for a in structs]),
        cells=np.array([a.cell.array for a in structs]),
    )


def mixed_batch():
    """Walkers of 4, 32, 108 and 32 atoms (two sizes shared, not neighbours in the batch), one cluster."""
    cluster = cuni((2, 1, 1), seed=9, rattle=0.05)
    cluster.pbc = False
    cluster.cell = np.zeros((3, 3))
    return [
        cuni((2, 2, 2), seed=1),
        cuni((1, 1, 1), seed=2, a=3.7),
        cuni((3, 3, 3), seed=3),
        cuni((2, 2, 2), a=3.55, seed=4),
        cluster,
        cuni((1, 1, 1), seed=5),
    ]


@pytest.mark.parametrize("descriptor", ["se_atten_v2", "dpa2", "dpa3"])
def test_mixed_batch_equals_deeppot_eval(pt_model, descriptor):
    """Every walker of a mixed-size batch (periodic and not) gets DeePMD-kit's DeepPot.eval of its
    frame alone (<= 1e-10 relative, FP64); the .dp file (converted by DeePMD-kit) gives the .pth's numbers."""
    from deepmd.infer import DeepPot

    m = pt_model(descriptor)
    prov = DeepmdProvider([m["pth"], m["dp"]])
    assert prov.type_map == TYPE_MAP
    structs = mixed_batch()
    st = flat_state(structs)
    out = prov(st, True)
    assert out["energy"].shape == (2, len(structs))
    assert out["force"].shape == (2, len(st.pos), 3) and out["virial"].shape == (2, len(structs), 9)
    ref = DeepPot(str(m["pth"]))
    lo = 0
    for i, a in enumerate(structs):
        hi = lo + len(a)
        e, f, v = ref.eval(
            a.positions.reshape(1, -1), a.cell.array.reshape(1, 9) if a.pbc.all() else None, st.atype[lo:hi]
        )
        for k in range(2):
            assert abs(out["energy"][k, i] - e[0, 0]) <= 1e-10 * abs(e[0, 0])
            assert np.abs(out["force"][k, lo:hi] - f[0]).max() <= 1e-10 * np.abs(f[0]).max()
            if a.pbc.all():
                assert np.abs(out["virial"][k, i] - v[0]).max() <= 1e-10 * np.abs(v[0]).max()
        lo = hi
    only0 = prov(st, False)  # ordinary steps: model 0 alone, the same numbers (TorchScript's optimised
    # second run may round differently)
    assert only0["force"].shape[0] == 1 and np.abs(only0["force"][0] - out["force"][0]).max() < 1e-12
    small = DeepmdProvider([m["pth"]], max_atoms=64)(st, False)  # groups split into calls of <= 64 atoms
    for k in ("energy", "force", "virial"):
        assert np.abs(small[k] - out[k][:1]).max() <= 1e-12 * np.abs(out[k]).max()


@pytest.mark.parametrize("descriptor", ["se_atten_v2", "dpa3"])
def test_kept_neighbour_list_equals_deepmd_forward(pt_model, descriptor):
    """The kept images + Verlet list (deepmd_lower, DeePMD-kit's forward_lower) give DeePMD-kit's
    forward (skin=None: its own list every call) to 1e-10 relative on the mixed batch, also after
    moves within half the skin or a 1% cell scaling with the positions (list kept) and beyond it or a
    5% cell change alone (list rebuilt)."""
    m = pt_model(descriptor)
    kept, fresh = DeepmdProvider([m["pth"]], skin=0.6), DeepmdProvider([m["pth"]], skin=None)
    assert kept.skin == 0.6 and fresh.skin is None
    st = flat_state(mixed_batch())
    rng = np.random.default_rng(3)
    pos0, cells0 = st.pos.copy(), st.cells.copy()

    def same():
        a, b = kept(st, True), fresh(st, True)
        for k in ("energy", "force", "virial"):
            assert np.abs(a[k] - b[k]).max() <= 1e-10 * np.abs(b[k]).max(), k

    def builds():
        return [g.ghosts.builds for g in kept._groups]

    same()
    assert builds() == [1] * len(kept._groups)
    st.pos = pos0 + rng.uniform(-0.1, 0.1, pos0.shape)  # |dx| < 0.6 / 4: kept
    same()
    assert builds() == [1] * len(kept._groups)
    st.pos = pos0 + rng.uniform(-0.3, 0.3, pos0.shape)  # up to 0.52 A: rebuilt
    same()
    assert all(b == 2 for b in builds())
    pos1, per = st.pos.copy(), st.pbc[st.system][:, None]
    st.cells, st.pos = cells0 * 1.01, np.where(per, pos1 * 1.01, pos1)  # a barostat's scaling: no motion
    same()
    assert builds() == [2] * len(kept._groups)
    st.cells, st.pos = cells0 * 1.05, pos1  # the cell alone changes: periodic walkers rebuilt, the cluster not
    same()
    assert sorted(builds()) == [2] + [3] * (len(kept._groups) - 1)


def test_dpa3_without_padding_equals_deepmd(pt_model):
    """DPA-3 .pth and .dp files load as DeePMD-kit's dynamic-selection model (sel_reduce_factor 1: no
    padded edges or angles) and give the static model's numbers to 1e-10 relative on the mixed batch;
    other descriptors load as they are."""
    import torch

    from dpsnake.md.deepmd_provider import dynamic_sel_model

    m = pt_model("dpa3")
    cpu = torch.device("cpu")
    for f in (m["pth"], m["dp"]):
        rf = dynamic_sel_model(pathlib.Path(f), cpu).atomic_model.descriptor.repflows
        assert rf.use_dynamic_sel and rf.sel_reduce_factor == 1.0
        assert all(ly.use_dynamic_sel and ly.sel_reduce_factor == 1.0 for ly in rf.layers)
    assert dynamic_sel_model(pathlib.Path(pt_model("se_atten_v2")["pth"]), cpu) is None
    st = flat_state(mixed_batch())
    a = DeepmdProvider([m["pth"], m["dp"]])(st, True)
    b = DeepmdProvider([m["pth"]], skin=None, dynamic_sel=False)(st, True)
    for k in ("energy", "force", "virial"):
        assert np.abs(a[k] - b[k]).max() <= 1e-10 * np.abs(b[k]).max(), k


def test_dpa3_compiled_layers_equal_torchscript(pt_model):
    """compile=True (DPA-3 eager, its repflow layers through torch.compile with dynamic shapes) gives the
    TorchScript model's energies, forces and virials to 1e-10 relative in FP64, also after the atoms moved
    (other edge and angle counts) and on 3 walkers (another batch size); other models load as without it."""
    import shutil

    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("TorchInductor on the CPU needs a C++ compiler")
    m = pt_model("dpa3")
    st = flat_state([cuni((2, 2, 2), seed=1), cuni((2, 2, 2), a=3.55, seed=4)])
    comp, ref = DeepmdProvider([m["pth"]], compile=True), DeepmdProvider([m["pth"]], compile=False)
    assert (comp.compiled, ref.compiled) == (1, 0)
    moved = flat_state([cuni((2, 2, 2), seed=1), cuni((2, 2, 2), a=3.55, seed=4)])
    moved.pos = moved.pos + np.random.default_rng(3).normal(0.0, 0.1, moved.pos.shape)
    for batch in (st, moved, flat_state([cuni((2, 2, 2), seed=s) for s in (5, 6, 7)])):
        a, b = comp(batch, False), ref(batch, False)
        for k in ("energy", "force", "virial"):
            assert np.abs(a[k] - b[k]).max() <= 1e-10 * np.abs(b[k]).max(), k
    assert DeepmdProvider([pt_model("se_atten_v2")["pth"]], compile=True).compiled == 0


def test_a_failed_compilation_falls_back_to_torchscript(tmp_path, pt_model):
    """explore.compile (default auto on GPUs) must not stop an exploration where torch.compile cannot
    build its kernels: here TorchInductor's C++ compiler does not exist (CXX, a fresh cache folder so
    nothing compiled before is found), in a process of its own. The first call warns once, every model
    runs as TorchScript from then on, and the forces are the TorchScript provider's."""
    m = pt_model("dpa3")
    code = (
        "import json, sys, warnings\n"
        "import numpy as np\n"
        "from types import SimpleNamespace\n"
        "from ase.build import bulk\n"
        "from dpsnake.md.deepmd_provider import DeepmdProvider\n"
        "at = bulk('Cu', 'fcc', a=3.6, cubic=True).repeat((2, 2, 2)); at.rattle(0.05, seed=1)\n"
        "n = len(at)\n"
        "st = SimpleNamespace(pos=at.positions, atype=np.arange(n) % 2, system=np.zeros(n, int),"
        " natoms=np.array([n]), pbc=np.array([True]), cells=at.cell.array[None])\n"
        "comp, ref = DeepmdProvider([sys.argv[1]], compile=True), DeepmdProvider([sys.argv[1]], compile=False)\n"
        "before = comp.compiled\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a, a2 = comp(st, False), comp(st, False)\n"
        "said = [str(x.message) for x in w if 'torch.compile of the DPA-3 layers failed' in str(x.message)]\n"
        "b = ref(st, False)\n"
        "print(json.dumps({'before': before, 'after': comp.compiled, 'warned': len(said),"
        " 'diff': float(max(np.abs(a['force'] - b['force']).max(), np.abs(a2['force'] - b['force']).max()))}))\n"
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "c"))
    p = subprocess.run([sys.executable, "-c", code, m["pth"]], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert (got["before"], got["after"], got["warned"]) == (1, 0, 1), got
    assert got["diff"] < 1e-12, got  # eV/A: both TorchScript (the profiling executor rounds its own way)


def test_kept_neighbour_list_npt_run(tmp_path, pt_model):
    """30 NPT steps of two walkers (4 and 32 atoms, pressure 1 GPa, the cells change) on the kept list
    equal the run on DeePMD-kit's forward to 1e-10 A, and the list was kept for some steps."""
    m = pt_model("dpa3")
    ws = [
        walker("a", write(cuni((1, 1, 1), seed=2, a=3.7), tmp_path / "a.extxyz"), ensemble="npt", pressure=10000.0),
        walker("b", write(cuni((2, 2, 2), seed=1), tmp_path / "b.extxyz"), ensemble="npt", seed=4, pressure=10000.0),
    ]
    kept, fresh = DeepmdProvider([m["pth"]], skin=0.5), DeepmdProvider([m["pth"]], skin=None)
    sa, sb, (_, c0) = _lockstep(ws, kept, fresh, 30)
    assert np.abs(sa.pos - sb.pos).max() < 1e-10 and np.abs(sa.cells - sb.cells).max() < 1e-10
    assert np.abs(sa.cells - c0).max() > 1e-4  # the cells changed
    assert all(1 <= g.ghosts.builds < kept.calls for g in kept._groups)


def _batch(ws, provider):
    ws = parse_walkers(ws)
    st = start_state(ws, read_structures(ws, TYPE_MAP), np)
    I.set_forces(st, provider(st, False))
    return st, st.flags()


def _lockstep(ws, pa, pb, steps: int):
    """The walkers ``ws`` run ``steps`` MD steps on provider ``pa`` and, step by step, on ``pb``: (the two
    end states, (start positions, start cells))."""
    (sa, fa), (sb, fb) = _batch(ws, pa), _batch(ws, pb)
    start = (sa.pos.copy(), sa.cells.copy())
    for k in range(steps):
        I.md_step(sa, pa, k, fa)
        I.md_step(sb, pb, k, fb)
    return sa, sb, start


def test_builtin_and_deepmd_agree_on_se_e2_a(tmp_path, pt_model):
    """The same se_e2_a model on the built-in engine (.dp) and on DeePMD-kit (.pth): the same NPT + NVT
    trajectories to 1e-10 A over 20 steps (FP64)."""
    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.engine.model import load_model

    m = pt_model("se_e2_a")
    ws = [
        walker(
            "npt", write(cuni((1, 1, 1), seed=2, a=3.7), tmp_path / "a.extxyz"), ensemble="npt", pressure=1000.0, seed=3
        ),
        walker("nvt", write(cuni((2, 2, 2), seed=1), tmp_path / "b.extxyz"), ensemble="nvt", seed=4),
    ]
    built = EnsembleProvider(Ensemble([load_model(m["dp"])]))
    deep = DeepmdProvider([m["pth"]])
    sa, sb, (start, _) = _lockstep(ws, built, deep, 20)
    assert np.abs(sa.pos - sb.pos).max() < 1e-10
    assert np.abs(sa.cells - sb.cells).max() < 1e-10
    assert np.abs(sa.vel - sb.vel).max() < 1e-10
    assert np.abs(sa.pos - start).max() > 1e-3  # it moved


def test_walker_in_batch_equals_walker_alone_and_resume(tmp_path, pt_model):
    """se_atten_v2 ensemble of two: a walker run alone gives the frames and model_devi.out lines it gets
    in a mixed batch; a run killed (stop_after) and resumed from its checkpoint gives the same files."""
    models = [pt_model("se_atten_v2")["pth"], pt_model("se_atten_v2", seed=2)["pth"]]
    ws = [
        walker(
            "big", write(cuni((2, 2, 2), seed=1), tmp_path / "big.extxyz"), ensemble="nvt-langevin", seed=7, nsteps=30
        ),
        walker(
            "small",
            write(cuni((1, 1, 1), seed=2, a=3.7), tmp_path / "small.extxyz"),
            ensemble="npt-tri",
            pressure=1000.0,
            seed=8,
            nsteps=30,
            trj_freq=15,
        ),
        walker("mid", write(cuni((2, 1, 1), seed=3), tmp_path / "mid.extxyz"), ensemble="nvt", seed=9, nsteps=20),
    ]
    Explorer(parse_walkers(ws), DeepmdProvider(models), TYPE_MAP, tmp_path / "batch", progress=False).run()
    for w in ws[:2]:
        Explorer(parse_walkers([w]), DeepmdProvider(models), TYPE_MAP, tmp_path / w["name"], progress=False).run()
        fb = read_frames(tmp_path / "batch" / w["name"] / "traj.extxyz")
        fa = read_frames(tmp_path / w["name"] / w["name"] / "traj.extxyz")
        assert [f.info["step"] for f in fb] == [f.info["step"] for f in fa] == list(range(0, 31, w.get("trj_freq", 10)))
        for x, y in zip(fb, fa):
            assert np.abs(x.positions - y.positions).max() < 1e-8
            assert np.abs(x.cell.array - y.cell.array).max() < 1e-8
        assert np.abs(fb[-1].positions - fb[0].positions).max() > 1e-3
        db = np.loadtxt(tmp_path / "batch" / w["name"] / "model_devi.out")
        da = np.loadtxt(tmp_path / w["name"] / w["name"] / "model_devi.out")
        assert np.allclose(db, da, rtol=1e-5, atol=1e-12) and db[:, 4].max() > 0
    # killed after 12 steps (a checkpoint at step 10), rerun: the same files as one uninterrupted run
    out = tmp_path / "resumed"
    ex = Explorer(
        parse_walkers(ws), DeepmdProvider(models), TYPE_MAP, out, progress=False, checkpoint_steps=10, stop_after=12
    )
    assert ex.run() == {} and (out / "checkpoint.npz").exists()
    Explorer(parse_walkers(ws), DeepmdProvider(models), TYPE_MAP, out, progress=False).run()
    for w in ws:
        for f in ("traj.extxyz", "model_devi.out"):
            assert (out / w["name"] / f).read_text() == (tmp_path / "batch" / w["name"] / f).read_text()


def test_nve_energy_drift_dpa1(tmp_path, pt_model):
    """NVE with a se_atten_v2 (DPA-1) model, 32 atoms, 300 K, dt 1 fs, 1000 steps: total energy within
    1e-4 eV/atom of its start, linear drift below 2e-5 eV/atom/ps."""
    prov = DeepmdProvider([pt_model("se_atten_v2")["pth"]])
    st, flags = _batch(
        [walker("a", write(cuni((2, 2, 2), seed=1, rattle=0.03), tmp_path / "a.extxyz"), dt=0.001, seed=2)], prov
    )
    etot = [float(st.energy[0] + I.kinetic_energy(st)[0])]
    for k in range(1000):
        I.md_step(st, prov, k, flags)
        etot.append(float(st.energy[0] + I.kinetic_energy(st)[0]))
    e = (np.array(etot) - etot[0]) / 32
    slope = np.polyfit(np.arange(len(e)) * 0.001, e, 1)[0]
    temp = float(I.temperature(st)[0])
    print(f"NVE DPA-1 1 ps: max |dE| {np.abs(e).max():.2e} eV/atom, drift {slope:.2e} eV/atom/ps, T {temp:.0f} K")
    assert np.abs(e).max() < 1e-4
    assert abs(slope) < 2e-5
    assert temp > 30  # it moved (a model trained for 10 steps heats the crystal: its energy surface is rough)


def test_model_devi_equals_dp_model_devi(tmp_path, pt_model):
    """model_devi.out of a DPA-3 ensemble equals `dp --pt model-devi` on the written frames."""
    import dpdata

    models = [str(pt_model("dpa3")["pth"]), str(pt_model("dpa3", seed=2)["pth"])]
    ws = [
        walker(
            "w",
            write(cuni((2, 2, 2), seed=1), tmp_path / "w.extxyz"),
            ensemble="nvt",
            temperature=900.0,
            nsteps=30,
            trj_freq=5,
        )
    ]
    Explorer(parse_walkers(ws), DeepmdProvider(models), TYPE_MAP, tmp_path / "run", progress=False).run()
    frames = read_frames(tmp_path / "run" / "w" / "traj.extxyz")
    sysdir = tmp_path / "frames"
    ms = None
    for f in frames:
        s = dpdata.System(f, fmt="ase/structure")
        ms = s if ms is None else ms + s
    ms.to_deepmd_npy(str(sysdir), type_map=TYPE_MAP)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepmd",
            "--pt",
            "model-devi",
            "-m",
            *models,
            "-s",
            str(sysdir),
            "-o",
            str(tmp_path / "ref.out"),
            "-f",
            "5",
        ],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    ref = np.loadtxt(tmp_path / "ref.out")[:, :7]
    ours = np.loadtxt(tmp_path / "run" / "w" / "model_devi.out")
    assert ours.shape == ref.shape == (7, 7)
    assert np.array_equal(ours[:, 0], ref[:, 0])
    assert np.allclose(ours[:, 1:], ref[:, 1:], rtol=1e-5, atol=1e-9)  # ours is written with 7 digits
    assert ours[:, 4].min() > 0


def test_explore_cli_picks_the_engine(tmp_path, pt_model, cu_model):
    """`dpsnake explore --engine auto`: the built-in engine for se_e2_a .dp files, DeePMD-kit for
    DPA-2 (reason in engine.json and the log); --engine builtin on DPA-2: one line, exit 2 (se_atten_v2:
    tests/test_engine_attn_load.py); --compile reaches DeePMD-kit's provider (DPA-2: nothing to compile)
    and the built-in engine says it ignores it."""
    s = write(cuni((1, 1, 1), seed=2), tmp_path / "s.extxyz")
    (tmp_path / "w.json").write_text(json.dumps([walker("w", s, nsteps=10, trj_freq=5)]))
    atten = str(pt_model("dpa2")["dp"])

    def explore(models, engine, outdir, *extra):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "dpsnake.cli",
                "explore",
                "--models",
                *models,
                "--walkers",
                str(tmp_path / "w.json"),
                "--outdir",
                str(tmp_path / outdir),
                "--device",
                "cpu",
                "--engine",
                engine,
                "--no-progress",
                *extra,
            ],
            capture_output=True,
            text=True,
        )

    p = explore([atten, atten], "auto", "a", "--compile")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "--compile: 0 of 2 models compiled" in p.stdout, p.stdout
    info = json.loads((tmp_path / "a" / "engine.json").read_text())
    assert info["engine"] == "deepmd" and "dpa2" in info["reason"], info
    assert "engine deepmd" in p.stdout
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["walkers"]["w"]["status"] == "finished"
    assert len(np.loadtxt(tmp_path / "a" / "w" / "model_devi.out")) == 3
    p = explore([str(pt_model("se_e2_a")["dp"])], "auto", "b", "--compile")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "--compile: an option of engine deepmd, ignored by the built-in engine" in p.stdout, p.stdout
    assert json.loads((tmp_path / "b" / "engine.json").read_text())["engine"] == "builtin"
    p = explore([atten], "builtin", "c")
    assert p.returncode == 2
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "dpa2" in err[0] and atten in err[0], p.stderr


def test_report_accuracy_runs_models_the_engine_does_not(pt_model, model_cache):
    """The report's accuracy table evaluates DPA-2 .dp files through DeePMD-kit (energies and
    forces equal DeepPot.eval on the labelled frames)."""
    from deepmd.infer import DeepPot
    from dpmodels import emt_dataset

    from dpsnake.md.deepmd_provider import DeepmdProvider
    from dpsnake.report.accuracy import load_ensemble, predict, read_labelled

    m = pt_model("dpa2")
    ens, tmap = load_ensemble([m["dp"]])
    assert isinstance(ens, DeepmdProvider) and tmap == TYPE_MAP
    data = read_labelled(emt_dataset(model_cache, "CuNi"))
    p = predict(ens, tmap, data, "CuNi", "init")
    e, f, _ = DeepPot(str(m["pth"])).eval(
        data["coords"].reshape(len(data), -1),
        data["cells"].reshape(len(data), 9),
        [tmap.index(data["atom_names"][t]) for t in data["atom_types"]],
    )
    assert np.allclose(p.e_pred[0], e.reshape(-1), rtol=1e-10, atol=0)
    assert np.abs(p.f_pred[0] - f.reshape(p.f_pred[0].shape)).max() < 1e-10


def test_check_config_needs_the_pytorch_backend_for_deepmd_exploration(monkeypatch):
    """explore.engine auto with a DPA-2 input (or engine deepmd) where torch is not importable:
    one line at check time naming the engine, the reason and the pip command; se_e2_a with auto is fine."""
    import importlib.util

    import yaml

    from dpsnake.errors import UserError
    from dpsnake.workflow import config as dpconfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    root = pathlib.Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / "config" / "config.yaml").read_text())
    dpconfig.check(raw, root)  # se_e2_a: the built-in engine explores, torch is not needed
    raw["train"]["backend"] = "pt"
    from dpmodels import PT_DESCRIPTORS

    raw["train"]["input"]["model"]["descriptor"] = json.loads(json.dumps(PT_DESCRIPTORS["dpa2"]))
    with pytest.raises(UserError) as err:
        dpconfig.check(raw, root)
    msg = str(err.value)
    assert msg.startswith("explore.engine: auto: ") and "dpa2" in msg and "deepmd-kit[torch]" in msg
    assert "\n" not in msg
