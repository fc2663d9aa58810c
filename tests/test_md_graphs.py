"""CUDA-graph replay of the integrator stages (md/graphs.py) against the eager step, on a GPU.

Needs CuPy with a device and a .dp model (DPSNAKE_GPU_MODEL, default .whl/models/t_cu.dp, the
small Cu model the device runs carry); skipped otherwise (CI has no GPU). Run on the lent GPU:
    DPSNAKE_GPU_MODEL=.whl/models/t_cu.dp python -m pytest tests/test_md_graphs.py
"""

from __future__ import annotations

import warnings

import numpy as np
from ase.build import bulk
from engine_helpers import cupy_or_skip, gpu_model

cp = cupy_or_skip()
MODEL, pytestmark = gpu_model("DPSNAKE_GPU_MODEL", "t_cu.dp")

from dpsnake.engine.settings import EngineSettings  # noqa: E402
from dpsnake.md import integrators  # noqa: E402
from dpsnake.md.graphs import GraphedStep  # noqa: E402

DYN = ("pos", "vel", "cells", "nhc_v", "nhc_eta", "energy", "force", "virial")
ENSEMBLES = [
    dict(ensemble="nve"),
    dict(ensemble="nvt"),
    dict(ensemble="nvt", thermostat="bussi"),
    dict(ensemble="nvt-langevin"),
    dict(ensemble="npt", pressure=1000.0),
    dict(ensemble="npt-aniso", pressure=1000.0),
    dict(ensemble="npt-tri", pressure=1000.0),
]


def _batch(tmp_path):
    from test_md_engine import batch

    spec = []
    for k, e in enumerate(ENSEMBLES):
        at = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 1 + k % 2, 1))
        at.rattle(0.05, seed=k)
        path = tmp_path / f"s{k}.extxyz"
        at.write(path, format="extxyz")
        spec.append(
            dict(
                name=f"w{k}", structure=str(path), temperature=300.0, nsteps=40, dt=0.002, trj_freq=10, seed=k + 1, **e
            )
        )
    st, prov, _ = batch(spec, [str(MODEL)], xp=cp)
    return st, prov


def _same(a, b):
    for f in DYN:
        x, y = cp.asnumpy(getattr(a, f)).reshape(-1), cp.asnumpy(getattr(b, f)).reshape(-1)
        np.testing.assert_allclose(y, x, rtol=1e-11, atol=1e-11, err_msg=f)


def test_graph_replay_equals_eager_steps_and_recaptures_after_a_drop(tmp_path):
    warnings.simplefilter("ignore", RuntimeWarning)
    st_a, prov = _batch(tmp_path)
    st_b, _ = _batch(tmp_path)
    graphed = GraphedStep()
    for k in range(12):
        integrators.md_step(st_a, prov, k, st_a.flags())
        graphed(st_b, prov, k, st_b.flags())
        _same(st_a, st_b)
    assert "graph" not in graphed.ctx.broken and graphed.graphs is not None
    assert graphed.refs["pos"] is st_b.pos  # replays write the state's own arrays
    moved = np.abs(cp.asnumpy(st_b.pos) - cp.asnumpy(_batch(tmp_path)[0].pos)).max()
    assert moved > 1e-3
    keep = np.ones(st_a.nsys, dtype=bool)
    keep[[1, 4]] = False  # walkers drop out: a new state, so a new capture
    st_a, st_b = st_a.select(keep), st_b.select(keep)
    old = graphed.graphs
    for k in range(12, 20):
        integrators.md_step(st_a, prov, k, st_a.flags())
        graphed(st_b, prov, k, st_b.flags())
        _same(st_a, st_b)
    assert graphed.graphs is not None and graphed.graphs is not old


def test_explorer_files_with_and_without_graphs(tmp_path, monkeypatch):
    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.engine.model import load_model
    from dpsnake.md.explorer import Explorer
    from dpsnake.md.providers import EnsembleProvider
    from dpsnake.md.trajectory import read_frames
    from dpsnake.md.walkers import parse_walkers

    warnings.simplefilter("ignore", RuntimeWarning)
    spec = []
    for k, e in enumerate(ENSEMBLES[3:]):
        at = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 2, 1))
        at.rattle(0.05, seed=k)
        at.write(tmp_path / f"e{k}.extxyz", format="extxyz")
        spec.append(
            dict(
                name=f"w{k}",
                structure=str(tmp_path / f"e{k}.extxyz"),
                temperature=300.0,
                nsteps=30 + 10 * k,
                dt=0.002,
                trj_freq=10,
                seed=k + 3,
                **e,
            )
        )
    for fast in ("all", "nets,env,scatter,desc,nbr"):
        settings = EngineSettings.parse([f"fast={fast}"])
        ens = Ensemble([load_model(MODEL), load_model(MODEL)], precision="double", xp=cp, settings=settings)
        prov = EnsembleProvider(ens)
        ex = Explorer(parse_walkers(spec), prov, ["Cu"], tmp_path / fast, xp=cp, progress=False)
        summary = ex.run()
        assert all(r["status"] == "finished" for r in summary["walkers"].values())
        assert (fast == "all") == isinstance(ex._md_step, GraphedStep)
    for w in spec:
        fa = read_frames(tmp_path / "all" / w["name"] / "traj.extxyz")
        fb = read_frames(tmp_path / "nets,env,scatter,desc,nbr" / w["name"] / "traj.extxyz")
        assert len(fa) == len(fb) == w["nsteps"] // 10 + 1
        for x, y in zip(fa, fb):
            np.testing.assert_allclose(x.positions, y.positions, rtol=0, atol=1e-9)
            np.testing.assert_allclose(x.cell.array, y.cell.array, rtol=0, atol=1e-9)
