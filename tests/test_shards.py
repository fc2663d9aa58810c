"""Sharded exploration (dpsnake.workflow.shards): the cost split on hand-made costs, and a sharded
exploration through `dpsnake explore --shard` + `dpsnake merge-shards` equal to the unsharded one,
file by file, on both force providers (real DeePMD-kit models trained for a few steps)."""

from __future__ import annotations

import json
import pathlib

import ase.io
import numpy as np
import pytest
from ase.build import bulk
from ase.cluster import Icosahedron

from dpsnake.cli import main as dpsnake
from dpsnake.errors import UserError
from dpsnake.workflow import shards


def test_split_is_longest_first_into_the_least_loaded_shard():
    costs = [7.0, 5.0, 4.0, 4.0, 3.0, 3.0, 2.0]
    parts = shards.split(costs, 3)
    # by hand: 7->A, 5->B, 4->C, 4->C (4 < 5, 7), 3->B (5), 3->A (7), 2->B (B and C at 8: lower index)
    assert parts == [[0, 5], [1, 4, 6], [2, 3]]
    loads = [sum(costs[i] for i in p) for p in parts]
    assert loads == [10.0, 10.0, 8.0]
    assert shards.balance(loads) == pytest.approx(10.0 / (28.0 / 3))
    assert sorted(i for p in parts for i in p) == list(range(len(costs)))


def test_cost_split_beats_count_split_on_mixed_sizes():
    # 4 walkers of 500 atoms and 12 of 32 (NPT, 4 models, deviation every 10): by count, 2 shards of 8
    # walkers can hold all big ones in one; by cost the shards are within 4/3 of each other
    natoms = [500] * 4 + [32] * 12
    costs = [shards.walker_cost(n, 1000, 10, 4) for n in natoms]
    assert costs[0] == pytest.approx(500 * 1000 * 1.3)
    by_cost = [sum(costs[i] for i in p) for p in shards.split(costs, 2)]
    by_count = [sum(costs[:8]), sum(costs[8:])]
    assert shards.balance(by_cost) <= 1.05 < shards.balance(by_count)


def test_shard_count():
    assert shards.shard_count(3, 1e9, 10, 1e8) == 3
    assert shards.shard_count(3, 1e9, 2, 1e8) == 2  # never more shards than walkers
    assert shards.shard_count("auto", 1e9, 100, 3e8) == 4  # ceil(1e9 / 3e8)
    assert shards.shard_count("auto", 0.0, 5, 3e8) == 1
    for bad in (0, -1, 1.5, True, "two"):
        with pytest.raises(UserError, match="explore.shards: must be a positive integer or 'auto'"):
            shards.shard_count(bad, 1e9, 10, 1e8)


def _walkers(tmp: pathlib.Path) -> list[dict]:
    """Five walkers of three sizes and kinds (bulk NPT/NVT, a cell of 4 atoms, a cluster)."""
    import ase.io

    big = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    big.symbols[[1, 6, 11, 20]] = "Ni"
    small = bulk("Cu", "fcc", a=3.6, cubic=True)
    clus = Icosahedron("Cu", 2)
    clus.center(vacuum=5.0)
    for seed, (name, at) in enumerate((("big", big), ("small", small), ("clus", clus))):
        # rattled: the test models' sel is too small for fcc Cu, and which of several neighbours at exactly
        # the same distance a full neighbour list drops depends on the batch's neighbour search
        at.rattle(0.02, seed=seed)
        ase.io.write(tmp / f"{name}.extxyz", at)
    base = {"nsteps": 10, "dt": 0.002, "trj_freq": 5, "tau_t": 0.1}
    return [
        {**base, "name": "big.npt", "structure": "big.extxyz", "ensemble": "npt", "temperature": 600.0,
         "pressure": 0.0, "seed": 1},
        {**base, "name": "big.nvt", "structure": "big.extxyz", "ensemble": "nvt", "temperature": 900.0, "seed": 2},
        {**base, "name": "small.a", "structure": "small.extxyz", "ensemble": "nvt", "temperature": 300.0, "seed": 3},
        {**base, "name": "small.b", "structure": "small.extxyz", "ensemble": "nve", "seed": 4},
        {**base, "name": "clus", "structure": "clus.extxyz", "ensemble": "nvt", "temperature": 500.0, "seed": 5},
    ]  # fmt: skip


def _explore(models, folder: pathlib.Path, *extra) -> None:
    args = ["explore", "--models", *map(str, models), "--walkers", str(folder / "walkers.json")]
    assert dpsnake([*args, "--outdir", str(folder), "--device", "cpu", "--no-progress", *extra]) == 0


@pytest.mark.parametrize("provider", ["builtin", "deepmd"])
def test_sharded_exploration_equals_unsharded(tmp_path, pt_model, provider):
    m = [pt_model("se_e2_a"), pt_model("se_e2_a", seed=2)]
    models = [x["dp"] for x in m] if provider == "builtin" else [x["pth"] for x in m]
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    for d in (whole, sharded):
        d.mkdir()
        walkers = _walkers(d)
        (d / "walkers.json").write_text(json.dumps(walkers))
    natoms = {"big.extxyz": 32, "small.extxyz": 4, "clus.extxyz": 13}
    plan = shards.plan_shards(walkers, natoms, 2, 1e9, nmodels=2)
    # costs 384, 384, 48, 48, 156 atom-steps: big ones first, then the cluster onto shard 0 (tie)
    assert [s["walkers"] for s in plan["shards"]] == [["big.npt", "clus"], ["big.nvt", "small.a", "small.b"]]
    (sharded / "shards.json").write_text(json.dumps(plan))

    _explore(models, whole, "--engine", provider)
    for k in (1, 0):  # any order
        _explore(
            models, sharded, "--engine", provider, "--shard", str(k), "--shards-file", str(sharded / "shards.json")
        )
        assert (sharded / "shards" / f"shard.{k}" / "summary.json").is_file()
    assert not (sharded / "summary.json").exists()
    args = ["--walkers", str(sharded / "walkers.json"), "--shards-file", str(sharded / "shards.json")]
    assert dpsnake(["merge-shards", *args, "--outdir", str(sharded)]) == 0

    # walker by walker: the same trajectories and deviations (same seeds; a different batch around a walker
    # only reorders floating-point sums), the same summary
    for w in walkers:
        a, b = (ase.io.read(d / w["name"] / "traj.extxyz", ":") for d in (sharded, whole))
        assert len(a) == len(b) == 3
        for fa, fb in zip(a, b):
            # the files' precision: 10 decimals (A), 7 significant digits (eV/A)
            assert np.abs(fa.positions - fb.positions).max() <= 2e-10, w["name"]
            assert np.abs(fa.cell.array - fb.cell.array).max() <= 2e-10, w["name"]
        da, db = (np.loadtxt(d / w["name"] / "model_devi.out") for d in (sharded, whole))
        assert da.shape == db.shape == (3, 7), w["name"]
        np.testing.assert_allclose(da, db, rtol=2e-6, atol=1e-12, err_msg=w["name"])
    assert json.loads((sharded / "summary.json").read_text()) == json.loads((whole / "summary.json").read_text())
    engine = json.loads((sharded / "engine.json").read_text())
    assert engine["engine"] == provider and engine["shards"] == 2
    assert engine["balance"] == pytest.approx(plan["balance"])


def test_merge_names_the_missing_shard(tmp_path, capsys):
    w = [{"name": "a"}, {"name": "b"}]
    (tmp_path / "walkers.json").write_text(json.dumps(w))
    plan = shards.plan_shards(
        [{"name": n, "structure": "s", "nsteps": 10, "trj_freq": 5} for n in "ab"], {"s": 4}, 2, 1e9, 2
    )
    (tmp_path / "shards.json").write_text(json.dumps(plan))
    sdir = shards.state_dir(tmp_path, 0)
    sdir.mkdir(parents=True)
    (sdir / "summary.json").write_text(json.dumps({"walkers": {"a": {"status": "finished"}}}))
    (sdir / "engine.json").write_text(json.dumps({"engine": "builtin", "device": "cpu"}))
    args = ["--walkers", str(tmp_path / "walkers.json"), "--shards-file", str(tmp_path / "shards.json")]
    assert dpsnake(["merge-shards", *args, "--outdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dpsnake merge-shards: error: shard 1: file not found:"), err
    assert str(shards.state_dir(tmp_path, 1) / "summary.json") in err[-1]
    assert not (tmp_path / "summary.json").exists()


def test_merge_refuses_a_walker_in_two_shards(tmp_path, capsys):
    (tmp_path / "walkers.json").write_text(json.dumps([{"name": "a"}, {"name": "b"}]))
    plan = {"balance": 1.0, "shards": [{"walkers": ["a", "b"], "cost": 2.0}, {"walkers": ["a"], "cost": 1.0}]}
    (tmp_path / "shards.json").write_text(json.dumps(plan))
    for k, names in enumerate((["a", "b"], ["a"])):
        sdir = shards.state_dir(tmp_path, k)
        sdir.mkdir(parents=True)
        (sdir / "summary.json").write_text(json.dumps({"walkers": {n: {"status": "finished"} for n in names}}))
        (sdir / "engine.json").write_text(json.dumps({"engine": "builtin", "device": "cpu"}))
    args = ["--walkers", str(tmp_path / "walkers.json"), "--shards-file", str(tmp_path / "shards.json")]
    assert dpsnake(["merge-shards", *args, "--outdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("walker 'a' is not in exactly one shard"), err
    assert not (tmp_path / "summary.json").exists()
