"""Mixed periodicity (issue 20 item 5): slabs (pbc T, T, F, as ASE's builders make them) and wires
(F, F, T) in the neighbour search of both force providers, against the same system fully periodic
with a vacuum wider than rcut (the reference), and DeePMD-kit's DeepPot.eval of that reference.
Real tiny DeePMD-kit Cu model (tests/dpmodels.py: se_e2_a, rcut 4.5 A, FP64), NumPy."""

from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111
from engine_helpers import cluster, ref_eval, rel_err
from test_engine_elementwise import NONE, emulated  # noqa: F401  (emulated: the CUDA kernels on the CPU)
from test_md_engine import walker  # the walker dict of the engine's MD tests

from dpsnake.errors import UserError

A0 = 3.7  # the third fcc shell (4.53 A) outside rcut 4.5 A: sel 40 is never exceeded
RCUT = 4.5
TOL = 1e-10  # FP64: relative to the largest value of each quantity
ERRS = {}  # the largest error of each comparison, printed at the end of a run with -s


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _note(name, err):
    ERRS[name] = max(ERRS.get(name, 0.0), err)
    print(f"{name}: {err:.2e}")
    return err


def slab(seed=0, vacuum=6.0):
    """Cu fcc(111), 3 x 3 x 4 (36 atoms; in-plane cell 7.8 A, shorter than 2 rcut), pbc T T F."""
    at = fcc111("Cu", size=(3, 3, 4), a=A0, vacuum=vacuum)
    at.info.clear()
    at.rattle(0.05, seed=seed)
    return at


def wire(seed=0):
    """A Cu rod along z: 2 x 2 cubic cells across (7.4 A), 3 along (48 atoms), pbc F F T."""
    at = bulk("Cu", "fcc", a=A0, cubic=True).repeat((2, 2, 3))
    at.rattle(0.05, seed=seed)
    at.pbc = [False, False, True]
    return at


def reference(at):
    """``at`` periodic in all directions: each non-periodic cell row replaced by the axis (x, y, z;
    the test systems' non-periodic directions are Cartesian) times the atoms' extent + 2 rcut."""
    ref = at.copy()
    cell = ref.cell.array.copy()
    for k in np.nonzero(~at.pbc)[0]:
        ext = np.ptp(at.positions[:, k])
        cell[k] = np.eye(3)[k] * (ext + 2 * RCUT)
    ref.cell = cell
    ref.pbc = True
    return ref


def variants(at):
    """The same slab or wire with other cell rows along its non-periodic directions, which play no
    part: as built, zero, and short and tilted with the atoms moved 40 A out of the cell along them."""
    zero, tilted = at.copy(), at.copy()
    c0, c1 = zero.cell.array.copy(), tilted.cell.array.copy()
    for k in np.nonzero(~at.pbc)[0]:
        c0[k] = 0.0
        c1[k] = np.array([0.7, -0.4, 0.9]) + np.eye(3)[k]
        tilted.positions = tilted.positions + 40.0 * np.eye(3)[k]
    zero.cell, tilted.cell = c0, c1
    return {"built": at, "zero-row": zero, "tilted-row-shifted": tilted}


def x_slab(seed=3):
    """A slab whose non-periodic direction is the first (pbc F T T): coordinates and cell rows
    permuted cyclically (a rotation)."""
    at = slab(seed=seed)
    cell = at.cell.array[[2, 0, 1]][:, [2, 0, 1]]
    out = Atoms(at.get_chemical_symbols(), positions=at.positions[:, [2, 0, 1]], cell=cell, pbc=[False, True, True])
    return out


def bulk_cu(seed=4):
    at = bulk("Cu", "fcc", a=A0, cubic=True).repeat((2, 2, 2))
    at.rattle(0.05, seed=seed)
    return at


def flat(structs):
    """Flat batch of ase.Atoms: coords (N, 3), atype, system, cells (S, 3, 3), pbc (S, 3)."""
    coords = np.concatenate([a.positions for a in structs])
    atype = np.zeros(len(coords), dtype=np.int64)
    system = np.concatenate([np.full(len(a), i) for i, a in enumerate(structs)])
    cells = np.array([a.cell.array for a in structs])
    pbc = np.array([a.pbc for a in structs], dtype=bool)
    return coords, atype, system, cells, pbc


@pytest.fixture(scope="module")
def ens(cu_model):
    from dpsnake.engine.ensemble import Ensemble

    return Ensemble([cu_model["dp"]])


@pytest.fixture(scope="module")
def deepmd_prov(cu_model):
    """DeePMD-kit's PyTorch model of the same .dp as the exploration provider; the TorchScript file is
    made once next to the model (DeePMD-kit's own .dp -> .pth conversion, ~15 s) and then loaded."""
    pytest.importorskip("torch")
    from dpsnake.md.deepmd_provider import DeepmdProvider, _from_dp

    pth = cu_model["dp"].parent / "model.pth"
    if not pth.exists():
        import torch

        tmp = pth.with_name(f"model.{os.getpid()}.pth")  # renamed: other sessions may share the cache
        torch.jit.save(_from_dp(cu_model["dp"], torch.device("cpu")), str(tmp))
        os.replace(tmp, pth)
    return DeepmdProvider([pth])


def _compare(name, got, ref, keys=("energy", "force", "virial", "atom_energy", "atom_virial")):
    for k in keys:
        assert _note(f"{name} {k}", rel_err(got[k], ref[k])) < TOL, k


@pytest.mark.parametrize("kind", ["slab", "wire"])
def test_engine_equals_vacuum_reference_and_deepmd(ens, cu_model, kind):
    """The built-in engine on a slab (T T F) or wire (F F T) equals the same system fully periodic with
    vacuum (energy, forces, virial, atomic energies and virials to 1e-10), whatever the cell holds along
    the non-periodic directions; the reference equals DeePMD-kit's DeepPot.eval (TensorFlow, .pb)."""
    base = slab() if kind == "slab" else wire()
    ref = reference(base)
    r = ens.evaluate(*flat([ref]), atomic=True)
    e, f, v, ae, av = ref_eval(
        cu_model["pb"], ref.positions[None], ref.cell.array.reshape(1, 9), np.zeros(len(ref), int)
    )
    dp = {"energy": e.T, "force": f, "virial": v[None], "atom_energy": ae[..., 0], "atom_virial": av}
    _compare(f"{kind} reference vs DeePMD-kit", r, dp)
    for name, at in variants(base).items():
        got = ens.evaluate(*flat([at]), atomic=True)
        _compare(f"{kind} {name} vs reference", got, r)
        _compare(f"{kind} {name} vs DeePMD-kit", got, dp)


def test_batch_of_slab_bulk_cluster_wire_equals_each_alone(ens):
    """One call on a slab, a bulk cell, a cluster, a wire and a slab periodic along y, z gives each
    system's numbers alone (and the x-slab equals the z-slab it is a rotation of)."""
    structs = [slab(seed=1), bulk_cu(), cluster(nat=19), wire(seed=2), x_slab(seed=3)]
    structs[2].symbols[:] = "Cu"
    out = ens.evaluate(*flat(structs), atomic=True)
    lo = 0
    for s, at in enumerate(structs):
        alone = ens.evaluate(*flat([at]), atomic=True)
        hi = lo + len(at)
        assert _note("batch vs alone energy", rel_err(out["energy"][:, s], alone["energy"][:, 0])) < 1e-12
        assert _note("batch vs alone force", rel_err(out["force"][:, lo:hi], alone["force"])) < 1e-12
        assert _note("batch vs alone virial", rel_err(out["virial"][:, s], alone["virial"][:, 0])) < 1e-12
        lo = hi
    z = ens.evaluate(*flat([slab(seed=3)]))
    assert rel_err(out["energy"][:, 4], z["energy"][:, 0]) < 1e-12
    # x-slab components (x, y, z) are the z-slab's (z, x, y)
    assert rel_err(out["force"][:, lo - 36 : lo][..., [1, 2, 0]], z["force"]) < 1e-11


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")
def test_kernel_path_equals_array_code(ens, emulated):  # noqa: F811
    """The neighbour build's CUDA kernels (nbr.cu, compiled with g++ and run on the CPU) on the mixed
    batch: the array code's wrapped atoms, ghosts and bins, and the same energies and forces; the
    non-periodic coordinates are not wrapped."""
    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.engine.neighbor import NeighborBuilder

    structs = [slab(seed=1), bulk_cu(), cluster(nat=19), wire(seed=2), x_slab(seed=3)]
    structs[2].symbols[:] = "Cu"
    structs[0].positions = structs[0].positions + [0.0, 0.0, 30.0]  # beyond the cell's vacuum
    coords, atype, system, cells, pbc = flat(structs)
    args = (np, coords, atype, system, cells, pbc, RCUT, [40])
    got, ref = NeighborBuilder(*args), NeighborBuilder(*args, ctx=NONE)
    assert got._geo is not None and not got.ctx.broken and ref._geo is None
    assert got.n_ext == ref.n_ext
    np.testing.assert_allclose(got.wrapped, ref.wrapped, atol=1e-12)
    np.testing.assert_array_equal(got.cbin, ref.cbin)
    np.testing.assert_array_equal(got.edges, ref.edges)
    own = sorted(zip(got.eowner.tolist(), np.round(got.epos, 9).tolist()))
    assert own == sorted(zip(ref.eowner.tolist(), np.round(ref.epos, 9).tolist()))
    z = system == 0
    np.testing.assert_allclose(ref.wrapped[z, 2], coords[z, 2], atol=1e-12)  # slab: z as it was
    for s in (0, 3, 4):  # no ghost of a slab or wire is displaced along a non-periodic direction
        k = np.nonzero(~pbc[s])[0]  # (Cartesian axes here)
        sel = system[ref.eowner] == s
        d = ref.epos[sel] - ref.wrapped[ref.eowner[sel]]
        assert np.abs(d[:, k]).max() < 1e-9 and (np.abs(d).max(axis=1) > 1.0).sum() > 20
    fast = ens.evaluate(coords, atype, system, cells, pbc)
    slow = Ensemble([ens.models[0]], settings=NONE).evaluate(coords, atype, system, cells, pbc)
    for k in ("energy", "force", "virial"):
        assert _note(f"kernels vs array code {k}", rel_err(fast[k], slow[k])) < 1e-12


def test_deepmd_provider_equals_reference(cu_model, deepmd_prov):
    """DeePMD-kit's PyTorch model (the same .dp) as the exploration provider: slabs (three cell
    variants), a wire, a bulk cell and a slab periodic along y, z in one batch equal each system's
    fully periodic reference and DeePMD-kit's DeepPot.eval of it (TensorFlow, .pb) to 1e-10."""
    prov = deepmd_prov
    structs = [*variants(slab(seed=5)).values(), wire(seed=6), bulk_cu(), x_slab(seed=7)]
    refs = [reference(a) for a in structs]
    out = prov.evaluate(*flat(structs))
    ref = prov.evaluate(*flat(refs))
    for k in ("energy", "force", "virial"):
        assert _note(f"deepmd provider mixed vs reference {k}", rel_err(out[k], ref[k])) < TOL
    lo = 0
    for s, r in enumerate(refs):
        e, f, v, _, _ = ref_eval(cu_model["pb"], r.positions[None], r.cell.array.reshape(1, 9), np.zeros(len(r), int))
        hi = lo + len(r)
        assert _note("deepmd provider vs DeePMD-kit energy", rel_err(out["energy"][0, s], e[0, 0])) < TOL
        assert _note("deepmd provider vs DeePMD-kit force", rel_err(out["force"][0, lo:hi], f[0])) < TOL
        assert _note("deepmd provider vs DeePMD-kit virial", rel_err(out["virial"][0, s], v[0])) < TOL
        lo = hi


def test_md_on_a_slab_equals_the_vacuum_reference(tmp_path, cu_model, deepmd_prov):
    """NVT through the Explorer on a slab (T T F) lying above its cell (z not wrapped in the frames,
    pbc T T F written), on both providers, gives the trajectory of the fully periodic reference."""
    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.md.explorer import Explorer
    from dpsnake.md.providers import EnsembleProvider
    from dpsnake.md.trajectory import read_frames
    from dpsnake.md.walkers import parse_walkers

    at = slab(seed=8)
    at.positions = at.positions + [0.0, 0.0, 30.0]  # above the cell (c = 19 A)
    ref = reference(at)
    at.write(tmp_path / "slab.extxyz")
    ref.write(tmp_path / "ref.extxyz")
    kw = dict(ensemble="nvt", nsteps=20, trj_freq=10, temperature=600.0)
    runs = {
        "builtin": ("slab.extxyz", EnsembleProvider(Ensemble([cu_model["dp"]]))),
        "deepmd": ("slab.extxyz", deepmd_prov),
        "ref": ("ref.extxyz", EnsembleProvider(Ensemble([cu_model["dp"]]))),
    }
    frames = {}
    for name, (path, prov) in runs.items():
        ws = parse_walkers([walker("w", str(tmp_path / path), **kw)])
        Explorer(ws, prov, ["Cu"], tmp_path / name, progress=False).run()
        frames[name] = read_frames(tmp_path / name / "w" / "traj.extxyz")
    assert [f.info["step"] for f in frames["builtin"]] == [0, 10, 20]
    for name in ("builtin", "deepmd"):
        for x, y in zip(frames[name], frames["ref"]):
            assert x.pbc.tolist() == [True, True, False]
            np.testing.assert_allclose(x.cell.array, at.cell.array)
            assert _note(f"MD slab {name} vs reference positions (A)", np.abs(x.positions - y.positions).max()) < 1e-8
            assert x.positions[:, 2].min() > at.cell[2, 2]  # not wrapped into the cell
    moved = np.abs(frames["builtin"][-1].positions - frames["builtin"][0].positions).max()
    assert moved > 0.01


def test_npt_on_a_slab_is_refused_in_one_line(tmp_path):
    """A barostat scales all three directions with the volume: npt on a slab or wire is one line
    naming the walker and the remedy (read_structure, what the explorer calls first)."""
    from dpsnake.md.walkers import parse_walkers, read_structure

    slab().write(tmp_path / "slab.extxyz")
    wire().write(tmp_path / "wire.extxyz")
    for name, ens in (("slab", "npt"), ("wire", "npt-aniso")):
        w = parse_walkers([walker(name, str(tmp_path / f"{name}.extxyz"), ensemble=ens, pressure=1.0)])[0]
        with pytest.raises(UserError) as err:
            read_structure(w, ["Cu"])
        msg = str(err.value)
        assert "\n" not in msg and f"walker '{name}'" in msg and "use nvt" in msg and "periodic in all" in msg
        w = parse_walkers([walker(name, str(tmp_path / f"{name}.extxyz"), ensemble="nvt")])[0]
        atoms, _ = read_structure(w, ["Cu"])
        assert atoms.pbc.tolist() == ([True, True, False] if name == "slab" else [False, False, True])
    flat_slab = Atoms("Cu2", positions=[[0, 0, 0], [1, 1, 1]], cell=[[2, 0, 0], [4, 0, 0], [0, 0, 0]])
    flat_slab.pbc = [True, True, False]
    flat_slab.write(tmp_path / "flat.extxyz")
    w = parse_walkers([walker("flat", str(tmp_path / "flat.extxyz"))])[0]
    with pytest.raises(UserError, match="periodic directions are degenerate"):
        read_structure(w, ["Cu"])


def test_ase_calculator_and_min_distances_on_a_slab(cu_model):
    """The ASE calculator takes pbc T T F (stress: not without a periodic volume), and the explorer's
    minimum distances use images along the periodic directions only (equal to ASE's mic)."""
    from ase.calculators.calculator import PropertyNotImplementedError

    from dpsnake.engine.calculator import DP
    from dpsnake.md.deviation import min_distances

    at = slab(seed=9)
    ref = reference(at)
    at.calc, ref.calc = DP(cu_model["dp"]), DP(cu_model["dp"])
    assert _note("ASE calculator energy", rel_err(at.get_potential_energy(), ref.get_potential_energy())) < TOL
    assert _note("ASE calculator force", rel_err(at.get_forces(), ref.get_forces())) < TOL
    with pytest.raises(PropertyNotImplementedError):
        at.get_stress()
    # two atoms 1.2 A apart across the periodic x face; a cell 1 A longer than the slab along the
    # non-periodic z (layers 0 and 3 are above each other: an image along z would be 1 A away)
    s = slab(seed=10)
    s.cell[2] = [0.0, 0.0, np.ptp(s.positions[:, 2]) + 1.0]
    s.positions[0] = [0.3, 0.2, s.positions[:, 2].min()]
    s.positions[1] = s.positions[0] + s.cell[0] - [1.2, 0.0, 0.0]
    w = wire(seed=11)
    structs = [s, w, bulk_cu()]
    coords, _, _, cells, pbc = flat(structs)
    got = min_distances(np, coords, cells, pbc, np.array([len(a) for a in structs]))
    want = [np.min(a.get_all_distances(mic=True)[~np.eye(len(a), dtype=bool)]) for a in structs]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert abs(got[0] - 1.2) < 1e-9


def test_config_check_takes_slabs_with_vacuum():
    """check-config: a slab from fcc111 with its vacuum passes on nvt stages; npt on it is one line
    with the remedy; a vacuum below the descriptor's rcut (DeePMD-kit trains on the cell as periodic)
    is one line naming the direction and the length needed."""
    import copy
    import pathlib

    import yaml

    from dpsnake.workflow import config as C

    root = pathlib.Path(__file__).resolve().parents[1]
    reduced = yaml.safe_load((root / "tests" / "configs" / "reduced.yaml").read_text())
    spec = {"builder": "fcc111", "kwargs": {"symbol": "Cu", "size": [2, 2, 3], "a": 3.61, "vacuum": 10.0}}

    def check(vacuum, ensemble):
        cfg = copy.deepcopy(reduced)
        cfg["systems"]["Cu"]["structure"] = copy.deepcopy(spec)
        cfg["systems"]["Cu"]["structure"]["kwargs"]["vacuum"] = vacuum
        for st in cfg["explore"]["stages"]:
            st["ensemble"] = ensemble
            if not ensemble.startswith("npt"):
                st.pop("pressures", None)
        return C.check(cfg, root)

    assert check(10.0, "nvt")["systems"]["Cu"]["structure"]["builder"] == "fcc111"
    with pytest.raises(UserError) as err:
        check(10.0, "npt")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("explore.stages[0]") and "system Cu is a slab or wire" in msg
    with pytest.raises(UserError) as err:
        check(1.0, "nvt")  # 2 A of vacuum in all, below rcut 4 A
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("systems.Cu.structure.builder: fcc111: pbc [True, True, False]")
    assert "non-periodic direction c" in msg and "at least 8.17 A along c" in msg


def test_model_devi_command_on_slab_frames(tmp_path, cu_model, dp_model):
    """``dpsnake model-devi`` on an extxyz of slab frames (pbc T T F, a cell shorter than the slab
    along z) writes the deviations of the fully periodic vacuum reference's frames."""
    import ase.io

    from dpsnake.cli import main
    from dpsnake.engine.model_devi import read_model_devi

    seed2 = {"model": {"descriptor": {"seed": 2}, "fitting_net": {"seed": 2}}, "training": {"seed": 2}}
    models = [str(cu_model["dp"]), str(dp_model(seed2)["dp"])]
    frames = [slab(seed=20 + k) for k in range(3)]
    for f in frames:
        f.cell[2] = [0.0, 0.0, np.ptp(f.positions[:, 2]) + 1.0]
    ase.io.write(tmp_path / "slab.extxyz", frames)
    ase.io.write(tmp_path / "ref.extxyz", [reference(f) for f in frames])
    for name in ("slab", "ref"):
        sysf, out = str(tmp_path / f"{name}.extxyz"), str(tmp_path / f"{name}.out")
        assert main(["model-devi", "-m", *models, "-s", sysf, "-o", out]) == 0
    got, want = read_model_devi(tmp_path / "slab.out"), read_model_devi(tmp_path / "ref.out")
    assert want["max_devi_f"].min() > 0
    for k in ("max_devi_f", "avg_devi_f", "max_devi_v", "devi_e"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, err_msg=k)  # the file's 6 digits
