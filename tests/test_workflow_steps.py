"""The workflow's steps one by one, fast (no training): init data (generated, or existing deepmd/npy and
HDF5), labelling with failures, collect's failed-fraction stop, the plan and the training input."""

from __future__ import annotations

import copy
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import yaml

from dpsnake.workflow.config import check, write_if_changed

ROOT = pathlib.Path(__file__).resolve().parents[1]
REDUCED = yaml.safe_load((ROOT / "tests" / "configs" / "reduced.yaml").read_text())


def dpsnake(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "dpsnake.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True
    )


def _config(tmp_path, mutate=None) -> dict:
    raw = copy.deepcopy(REDUCED)
    if mutate:
        mutate(raw)
    cfg = check(raw, tmp_path)
    write_if_changed(cfg, tmp_path / "config.json")
    return cfg


def test_init_data_generated_is_labelled_and_reproducible(tmp_path):
    import dpdata
    from ase.calculators.emt import EMT

    cfg = _config(tmp_path)
    for out in ("a", "b"):
        p = dpsnake("init-data", "--config", "config.json", "--system", "CuNi", "--out", f"{out}/CuNi", cwd=tmp_path)
        assert p.returncode == 0, p.stderr
    s = dpdata.LabeledSystem(str(tmp_path / "a" / "CuNi"), fmt="deepmd/npy")
    n = len(cfg["init_data"]["scales"]) * cfg["init_data"]["perturbations"]
    assert len(s) == n and s["atom_names"] == ["Cu", "Ni"] and list(s["atom_numbs"]) == [16, 16]
    assert np.array_equal(s["coords"], dpdata.LabeledSystem(str(tmp_path / "b" / "CuNi"), fmt="deepmd/npy")["coords"])
    vol = np.abs(np.linalg.det(s["cells"])) / 32
    assert vol.min() < 11.47 * 0.995 and vol.max() > 11.47 * 1.005  # scaled both ways around a=3.58
    for i in (0, n - 1):
        a = s.to("ase/structure")[i]
        a.calc = EMT()
        assert s["energies"][i] == pytest.approx(a.get_potential_energy(), abs=1e-8)
        assert np.allclose(s["forces"][i], a.get_forces(), atol=1e-8)
        assert np.allclose(s["virials"][i], -a.get_stress(voigt=False) * a.get_volume(), atol=1e-8)
    prov = (tmp_path / "a" / "CuNi" / "provenance.csv").read_text().splitlines()
    assert len(prov) == n + 1 and prov[1].startswith("-1,CuNi,init,0,")


def test_init_data_from_existing_npy_and_hdf5(tmp_path):
    import dpdata

    _config(tmp_path)
    assert (
        dpsnake("init-data", "--config", "config.json", "--system", "Cu", "--out", "gen/Cu", cwd=tmp_path).returncode
        == 0
    )
    assert (
        dpsnake(
            "init-data", "--config", "config.json", "--system", "CuNi", "--out", "gen/CuNi", cwd=tmp_path
        ).returncode
        == 0
    )
    cu = dpdata.LabeledSystem(str(tmp_path / "gen" / "Cu"), fmt="deepmd/npy")
    cuni = dpdata.LabeledSystem(str(tmp_path / "gen" / "CuNi"), fmt="deepmd/npy")
    cu_only = cu.copy()
    cu_only.data["atom_names"], cu_only.data["atom_numbs"] = ["Cu"], [32]  # its own, narrower type map
    cu_only.to_deepmd_npy(str(tmp_path / "own_npy"))
    dpdata.MultiSystems(cu, cuni).to_deepmd_hdf5(str(tmp_path / "multi.h5"))

    def use(path):
        def m(c):
            c["systems"]["Cu"]["init_data"] = path

        return m

    _config(tmp_path, use("own_npy"))
    p = dpsnake("init-data", "--config", "config.json", "--system", "Cu", "--out", "x/Cu", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    s = dpdata.LabeledSystem(str(tmp_path / "x" / "Cu"), fmt="deepmd/npy")
    assert s["atom_names"] == ["Cu", "Ni"] and np.allclose(s["energies"], cu["energies"])
    _config(tmp_path, use("multi.h5"))
    p = dpsnake("init-data", "--config", "config.json", "--system", "Cu", "--out", "y/Cu", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    subs = sorted(d for d in (tmp_path / "y" / "Cu").iterdir() if (d / "type.raw").is_file())
    assert len(subs) == 2
    assert sorted(len(dpdata.LabeledSystem(str(d), fmt="deepmd/npy")) for d in subs) == [len(cu), len(cuni)]


def _candidates(tmp_path, n=4):
    """n candidate frames as select writes them."""
    import ase.io
    from ase.build import bulk

    d = tmp_path / "select" / "candidates"
    d.mkdir(parents=True)
    for k in range(n):
        a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
        a.rattle(0.03 * k, seed=k)  # frame 0 is the perfect crystal (zero forces)
        a.info = {
            "iteration": 0,
            "system": "Cu",
            "walker": "Cu.T300.r0",
            "step": 10 * k,
            "max_devi_f": 0.1 + k,
            "task": f"{k:06d}",
        }
        ase.io.write(d / f"task.{k:06d}.extxyz", a, format="extxyz")
    stats = {
        "iteration": 0,
        "tasks": [f"{k:06d}" for k in range(n)],
        "systems": {"Cu": {"selected": n}, "CuNi": {"selected": 0}},
    }
    (tmp_path / "select" / "stats.json").write_text(json.dumps(stats))
    return [d / f"task.{k:06d}.extxyz" for k in range(n)]


def test_failed_labels_recorded_and_never_collected(tmp_path):
    import dpdata

    # a 0.3 eV/A sanity cap passes the perfect crystal (frame 0) and fails the most rattled frames
    _config(tmp_path, lambda c: c["label"].update(max_force=0.3, max_failed_fraction=0.6))
    cands = _candidates(tmp_path)
    outs = [tmp_path / "label" / c.name for c in cands]
    outs[0].parent.mkdir()
    p = dpsnake("label", "--config", "config.json", "--input", *cands, "--output", *outs, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    from dpsnake.labelers.io import read_labeled

    ok = [read_labeled(o)[1] for o in outs]
    failed = [o for o, g in zip(outs, ok) if not g]
    assert 0 < len(failed) < len(outs)
    for o in failed:
        rec = json.loads(o.with_name(o.name.replace(".extxyz", ".failed.json")).read_text())
        assert "above the sanity cap" in rec["reason"] and rec["system"] == "Cu"
    args = [
        "collect",
        "--config",
        "config.json",
        "--iter",
        0,
        "--stats",
        "select/stats.json",
        "--labels",
        *outs,
        "--data-out",
        "data/iter.000000",
        "--summary",
        "collect/summary.json",
    ]
    frac = len(failed) / len(outs)
    if frac <= 0.6:
        p = dpsnake(*args, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        summ = json.loads((tmp_path / "collect" / "summary.json").read_text())
        assert summ["failed"] == len(failed) and summ["labelled"] == len(outs) - len(failed)
        s = dpdata.LabeledSystem(str(tmp_path / "data" / "iter.000000" / "Cu"), fmt="deepmd/npy")
        assert len(s) == summ["labelled"] and np.abs(s["forces"]).max() < 0.3
        assert {f["task"] for f in summ["failures"]} == {o.name.split(".")[1] for o in failed}
    # a stricter limit stops the step with one line, and writes no data
    _config(tmp_path, lambda c: c["label"].update(max_force=0.3, max_failed_fraction=frac / 2))
    args[-3] = "data2"
    args[-1] = "collect/summary2.json"
    p = dpsnake(*args, cwd=tmp_path)
    assert p.returncode == 2 and "label.max_failed_fraction" in p.stderr and p.stderr.strip().count("\n") == 0
    assert not (tmp_path / "data2").exists() and not (tmp_path / "collect" / "summary2.json").exists()


def test_collect_refuses_missing_labels(tmp_path):
    _config(tmp_path)
    cands = _candidates(tmp_path, 2)
    out = tmp_path / "label" / cands[0].name
    out.parent.mkdir()
    assert (
        dpsnake("label", "--config", "config.json", "--input", cands[0], "--output", out, cwd=tmp_path).returncode == 0
    )
    p = dpsnake(
        "collect",
        "--config",
        "config.json",
        "--iter",
        0,
        "--stats",
        "select/stats.json",
        "--labels",
        out,
        "--data-out",
        "d",
        "--summary",
        "s.json",
        cwd=tmp_path,
    )
    assert p.returncode == 2 and "task.000001" in p.stderr


def test_plan_and_stage_progression(tmp_path):
    from dpsnake.workflow.plan import iteration_stage, make_walkers

    def two_stages(c):
        st = c["explore"]["stages"][0]
        c["explore"]["stages"] = [dict(st, max_iterations=2), dict(st, temperatures=[1200.0], systems=["CuNi"])]
        c["convergence"]["max_iterations"] = 5

    cfg = _config(tmp_path, two_stages)
    w = make_walkers(cfg, 3, 0, tmp_path / "ex")
    assert len(w) == 2 * 2 * 2 and len({x["name"] for x in w}) == len(w) and len({x["seed"] for x in w}) == len(w)
    assert all((tmp_path / "ex" / x["structure"]).is_file() and x["pressure"] in (0.0, 10000.0) for x in w)
    assert [x["system"] for x in make_walkers(cfg, 3, 1, tmp_path / "ex2")] == ["CuNi", "CuNi"]  # 2 pressures
    bad = {"systems": {"Cu": {"accurate_ratio": 0.1}, "CuNi": {"accurate_ratio": 0.1}}}
    assert iteration_stage(cfg, None) == (0, 0)
    assert iteration_stage(cfg, {"iteration": 0, "stage": 0, "stage_iteration": 0, **bad}) == (0, 1)
    assert iteration_stage(cfg, {"iteration": 1, "stage": 0, "stage_iteration": 1, **bad}) == (1, 0)
    good = {"systems": {"CuNi": {"accurate_ratio": 1.0}}}
    with pytest.raises(Exception, match="decided to stop .*accurate ratio >= 0.999"):
        iteration_stage(cfg, {"iteration": 2, "stage": 1, "stage_iteration": 0, **good})


def test_training_input(tmp_path):
    from dpsnake.workflow.train import make_input

    cfg = _config(tmp_path)
    a = make_input(cfg, 1, 0, ["/d/Cu", "/d/CuNi"], init=False)
    b = make_input(cfg, 1, 1, ["/d/Cu", "/d/CuNi"], init=False)
    assert a["model"]["type_map"] == ["Cu", "Ni"] and a["training"]["training_data"]["systems"] == ["/d/Cu", "/d/CuNi"]
    assert a["training"]["numb_steps"] == cfg["train"]["numb_steps"] and a["training"]["disp_file"] == "lcurve.out"
    assert a["model"]["descriptor"]["seed"] != b["model"]["descriptor"]["seed"]
    assert a["model"]["descriptor"]["sel"] == [32, 32]  # the fragment is kept


def test_structure_from_file_with_masses(tmp_path):
    """A system read from a POSCAR (path relative to the working folder) with a mass override reaches
    the walkers' start structure unchanged."""
    import ase.io
    from ase.build import bulk

    from dpsnake.workflow.plan import make_walkers

    a = bulk("Ni", "fcc", a=3.52, cubic=True).repeat((2, 1, 1))
    a.rattle(0.02, seed=3)
    ase.io.write(tmp_path / "POSCAR", a, format="vasp")

    def from_file(c):
        c["systems"] = {"Ni": {"structure": {"file": "POSCAR"}}}
        c["explore"]["stages"][0]["systems"] = ["Ni"]
        c["masses"] = {"Ni": 60.0}

    cfg = _config(tmp_path, from_file)
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)  # the workflow runs in its working folder; config paths are relative to it
    try:
        w = make_walkers(cfg, 0, 0, tmp_path / "ex")
    finally:
        os.chdir(cwd)
    b = ase.io.read(tmp_path / "ex" / w[0]["structure"])
    assert np.allclose(b.positions, a.positions, atol=1e-6) and np.allclose(b.cell.array, a.cell.array)
    assert np.allclose(b.get_masses(), 60.0)
