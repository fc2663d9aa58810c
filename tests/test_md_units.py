"""Exploration MD pieces that need no model: walker validation, RNG streams, output formats."""

import json

import numpy as np
import pytest
from ase.build import bulk

from dpsnake.errors import UserError
from dpsnake.md import rng
from dpsnake.md.trajectory import (
    DEVI_HEADER,
    bundle_frames,
    devi_line,
    devi_lines,
    encoded_rows,
    frame_text,
    read_frames,
)
from dpsnake.md.walkers import load_walkers, maxwell_boltzmann, parse_walkers


@pytest.fixture
def poscar(tmp_path):
    p = tmp_path / "POSCAR"
    bulk("Cu", "fcc", a=3.7, cubic=True).write(p, format="vasp")
    return p


def _w(path, **kw):
    d = dict(name="w0", structure=str(path), ensemble="nvt", temperature=300, nsteps=10, dt=0.002, trj_freq=5, seed=1)
    d.update(kw)
    return d


@pytest.mark.parametrize(
    "change, message",
    [
        ({"ensemble": "nph"}, "key 'ensemble' must be one of"),
        ({"ensemble": "npt"}, "key 'pressure' is required"),
        ({"temperature": -5}, "key 'temperature' must be"),
        ({"trj_freq": 0}, "key 'trj_freq' must be positive"),
        ({"nsteps": 2.5}, "key 'nsteps' must be an integer"),
        ({"dt": "1fs"}, "key 'dt' must be a number"),
        ({"structure": "missing.xyz"}, "file not found"),
        ({"name": "a/b"}, "folder-safe"),
        ({"tau_tt": 0.1}, "unknown key 'tau_tt'"),
        ({"thermostat": "berendsen"}, "key 'thermostat' must be one of"),
    ],
)
def test_walker_validation_names_the_key(poscar, change, message):
    with pytest.raises(UserError, match=message) as err:
        parse_walkers([_w(poscar, **change)])
    assert "\n" not in str(err.value)
    assert "walker" in str(err.value)


def test_walkers_file_and_defaults(tmp_path, poscar):
    f = tmp_path / "walkers.json"
    f.write_text(json.dumps([_w("POSCAR"), _w("POSCAR", name="w1", ensemble="npt-tri", pressure=1.0)]))
    ws = load_walkers(f)
    assert [w.thermostat for w in ws] == ["nhc", "bussi"]
    assert ws[1].barostat == "tri" and ws[0].barostat is None
    assert ws[0].system == "w0" and ws[0].tau_t == 0.1
    with pytest.raises(UserError, match="duplicate name"):
        parse_walkers([_w(poscar), _w(poscar)])
    f.write_text("[{")
    with pytest.raises(UserError, match="not valid JSON"):
        load_walkers(f)


def test_maxwell_boltzmann_start():
    m = np.array([63.546] * 50 + [58.69] * 58)
    v = maxwell_boltzmann(m, 300.0, seed=4, nf=3 * 108 - 3)
    from ase import units

    assert np.allclose((m[:, None] * v).sum(axis=0), 0, atol=1e-12)  # no net momentum
    ke = 0.5 * (m[:, None] * v * v).sum()
    assert ke == pytest.approx(0.5 * (3 * 108 - 3) * units.kB * 300.0, rel=1e-12)
    assert np.array_equal(v, maxwell_boltzmann(m, 300.0, seed=4, nf=321))
    assert not np.array_equal(v, maxwell_boltzmann(m, 300.0, seed=5, nf=321))


def test_rng_streams_are_per_walker_and_normal():
    xp = np
    seeds = np.array([11, 12, 13], dtype=np.uint64)
    nat = np.array([5, 4000, 7])
    system = np.repeat(np.arange(3), nat)
    local = np.concatenate([np.arange(n) for n in nat])
    g = rng.atom_normals(xp, seeds, system, local, step=17, stream=rng.LANGEVIN)
    # the same walker alone (seed 13, 7 atoms) draws the same numbers
    alone = rng.atom_normals(xp, seeds[2:], np.zeros(7, dtype=np.int64), np.arange(7), 17, rng.LANGEVIN)
    assert np.array_equal(g[-7:], alone)
    big = g[5:4005].ravel()
    assert abs(big.mean()) < 4 / np.sqrt(big.size)
    assert abs(big.var() - 1) < 4 * np.sqrt(2 / big.size)
    assert abs(np.corrcoef(big[:-1], big[1:])[0, 1]) < 4 / np.sqrt(big.size)
    # other step / stream: different numbers
    assert not np.allclose(g, rng.atom_normals(xp, seeds, system, local, 18, rng.LANGEVIN))
    assert not np.allclose(g, rng.atom_normals(xp, seeds, system, local, 17, rng.BUSSI))
    s = rng.system_normals(xp, seeds, 3, rng.BAROSTAT, 6)
    assert s.shape == (3, 6) and np.isfinite(s).all()


def test_frame_text_read_by_ase_and_dpdata(tmp_path):
    import dpdata

    a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    a.symbols[[1, 5]] = "Ni"
    a.set_cell(a.cell.array + np.array([[0, 0, 0], [0.3, 0, 0], [0.1, -0.2, 0]]), scale_atoms=True)
    a.rattle(0.1, seed=3)
    path = tmp_path / "traj.extxyz"
    with open(path, "w") as f:
        for step in (0, 10):
            f.write(frame_text(np.array(a.get_chemical_symbols()), a.positions + step, a.cell.array, True, step))
    frames = read_frames(path)
    assert [fr.info["step"] for fr in frames] == [0, 10]
    assert frames[1].get_chemical_symbols() == a.get_chemical_symbols()
    assert np.allclose(frames[1].positions, a.positions + 10, atol=1e-9)
    assert np.allclose(frames[0].cell.array, a.cell.array, atol=1e-9) and frames[0].pbc.all()
    ms = dpdata.MultiSystems.from_file(str(path), fmt="ase/structure", labeled=False)
    assert ms.get_nframes() == 2
    s = ms[0] if len(ms) == 1 else None
    assert s is not None and sorted(s["atom_names"]) == ["Cu", "Ni"]
    assert np.allclose(s["cells"][0], a.cell.array, atol=1e-9)


def test_devi_line_matches_engine_writer(tmp_path):
    from dpsnake.engine.model_devi import COLUMNS, read_model_devi, write_model_devi

    vals = np.array([[1.5e-3, 2e-4, 7e-4, 0.123, 0.01, 0.05], [2.5e-3, 3e-4, 8e-4, 0.223, 0.02, 0.06]])
    ours = tmp_path / "ours.out"
    ours.write_text(DEVI_HEADER + devi_line(0, vals[0]) + devi_line(10, vals[1]))
    ref = tmp_path / "ref.out"
    write_model_devi(ref, [0, 10], {k: vals[:, i] for i, k in enumerate(COLUMNS[1:])})
    assert ours.read_text() == ref.read_text()
    assert read_model_devi(ours)["step"].tolist() == [0, 10]
    # a whole step's lines formatted at once (the explorer's path) equal the line-by-line ones
    many = np.random.default_rng(0).lognormal(-4, 3, (7, 6))
    many[2, 1] = 0.0
    assert devi_lines(123456, many) == [devi_line(123456, v) for v in many]
    assert devi_lines(5, np.zeros((0, 6))) == []


def test_bundle_frames_equal_frame_text():
    """A deviation step's frames sent to the helper as one bundle: the texts of frame_text."""
    a = bulk("Cu", "fcc", a=3.61, cubic=True)
    b = bulk("Ni", "fcc", a=3.5, cubic=True).repeat((1, 1, 2))
    symbols = np.array(a.get_chemical_symbols() + b.get_chemical_symbols() + a.get_chemical_symbols())
    pos = np.concatenate([a.positions, b.positions + 0.1, a.positions - 0.2])
    cells = np.array([a.cell.array, b.cell.array, a.cell.array])
    pbc = np.array([True, True, False])
    bounds = np.array([0, 4, 12, 16])
    bundle = (symbols, pos, cells, pbc, 40, bounds, np.array([2, 0]))
    texts = bundle_frames(bundle)
    assert texts == [
        frame_text(symbols[12:16], pos[12:16], cells[2], False, 40),
        frame_text(symbols[0:4], pos[0:4], cells[0], True, 40),
    ]
    devi = np.arange(12.0).reshape(2, 6)
    lines, frames = encoded_rows(bundle, devi)  # what the helper process hands the writer thread
    assert frames == [t.encode() for t in texts]
    assert lines == [devi_line(40, v).encode() for v in devi]


def test_min_distances_match_ase_minimum_image():
    from dpsnake.md.deviation import min_distances

    frames = []
    for k, rep in enumerate([(2, 1, 1), (1, 1, 1), (2, 2, 1)]):
        a = bulk("Cu", "fcc", a=3.7, cubic=True).repeat(rep)
        a.set_cell(a.cell.array + np.array([[0, 0, 0], [0.4, 0, 0], [0.2, 0.3, 0]]), scale_atoms=True)
        a.rattle(0.3, seed=k)
        a.positions[0] += a.cell.array[0]  # unwrapped coordinates
        frames.append(a)
    mol = frames[0].copy()
    mol.pbc = False
    frames.append(mol)
    pos = np.concatenate([a.positions for a in frames])
    cells = np.array([a.cell.array for a in frames])
    pbc = np.array([a.pbc.all() for a in frames])
    nat = np.array([len(a) for a in frames])
    for max_pairs in (10, 4_000_000):  # one walker per group, and all in one group
        d = min_distances(np, pos, cells, pbc, nat, max_pairs=max_pairs)
        ref = [np.min(a.get_all_distances(mic=bool(a.pbc.all()))[~np.eye(len(a), dtype=bool)]) for a in frames]
        assert np.allclose(d, ref, atol=1e-12)


@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="needs g++")
def test_rng_cuda_kernel_source_matches_numpy(tmp_path):
    """The CuPy kernel body of rng.normals, compiled as C++ on the CPU, gives NumPy's numbers (the
    integer hash bit for bit; log/cos of two libms within 2 ulp), and also NVRTC compiles it."""
    import ctypes

    from engine_helpers import build_cpp

    src = (
        '#include <cmath>\nextern "C" void normals(const unsigned long long* key, const unsigned long long* '
        "counter, double* res, long n) {\n for (long i = 0; i < n; ++i) {\n"
        " const unsigned long long key_ = key[i], counter_ = counter[i]; double out;\n"
        + rng._NORMALS_SRC.replace("key", "key_").replace("counter", "counter_")
        + " res[i] = out; }\n}\n"
    )
    lib = build_cpp(tmp_path, "rng", src)
    seeds = np.array([1, 2, 2**63 + 5], dtype=np.uint64)
    key = rng.walker_keys(np, seeds, 17, rng.BUSSI)[np.array([0, 1, 2] * 100)]
    counter = np.arange(300, dtype=np.uint64)
    ref = rng.normals(np, key, counter)
    got = np.empty(300)
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    lib.normals(ptr(key), ptr(counter), ptr(got), ctypes.c_long(300))
    np.testing.assert_allclose(got, ref, rtol=4e-16, atol=1e-300)
    assert abs(ref.mean()) < 0.2 and 0.8 < ref.std() < 1.2


def test_compress_auto_min_nbor_dist_from_training_data(tmp_path, capsys):
    """--compress auto: the closest pair (minimum image) over every frame of the datasets below the
    folders given, as `dp compress` takes min_nbor_dist from the training data; bad values: one line."""
    import dpdata
    from ase.build import bulk, molecule

    from dpsnake.errors import UserError
    from dpsnake.md.explore import compress_distance, min_nbor_dist

    frames = []
    for k, a in enumerate((3.61, 3.52)):
        at = bulk("Cu", "fcc", a=a, cubic=True).repeat((2, 1, 1))
        at.rattle(0.08, seed=k)
        frames.append(at)
    expect = min(float(at.get_all_distances(mic=True)[np.triu_indices(len(at), 1)].min()) for at in frames)
    for k, at in enumerate(frames):  # two systems in a nested folder, as results/data/iter.N/<system>
        dpdata.System(at, fmt="ase/structure").to("deepmd/npy", str(tmp_path / "iter.000000" / f"s{k}"))
    h2o = molecule("H2O")  # a non-periodic set alone
    dpdata.System(h2o, fmt="ase/structure").to("deepmd/npy", str(tmp_path / "mol"))
    assert abs(min_nbor_dist([tmp_path / "iter.000000"]) - expect) < 1e-9
    d_mol = float(h2o.get_all_distances()[np.triu_indices(3, 1)].min())
    assert abs(min_nbor_dist([tmp_path / "mol"]) - d_mol) < 1e-9
    assert abs(min_nbor_dist([tmp_path / "mol", tmp_path / "iter.000000"]) - min(d_mol, expect)) < 1e-9
    assert abs(compress_distance("auto", [str(tmp_path / "iter.000000")]) - expect) < 1e-9
    assert "min_nbor_dist" in capsys.readouterr().out
    assert compress_distance("2.5", None) == 2.5 and compress_distance(None, None) is None
    for value, data, msg in (
        ("auto", None, "needs --compress-data"),
        ("big", None, "neither a distance"),
        ("auto", [str(tmp_path / "nope")], "not found"),
    ):
        with pytest.raises(UserError, match=msg):
            compress_distance(value, data)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no frames"):
        compress_distance("auto", [str(tmp_path / "empty")])
