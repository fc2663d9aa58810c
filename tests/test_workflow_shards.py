"""Sharded exploration in the workflow (explore.shards): a sharded iteration equals the unsharded one
walker by walker, and a kill during one shard reruns that shard alone, from its checkpoint.
kill_during_a_shard runs in the folder of a finished reduced run (tests/test_workflow.py::test_end_to_end
calls it: its trained models and data, no second training); the same on the local SLURM (one GPU per
shard) is in tests/test_slurm.py."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import signal

import ase.io
import numpy as np
import yaml
from test_workflow import CONFIG, _run_until, smk

from dpsnake.cli import main as dpsnake

EXPLORE = "results/iter.000000/explore"


def sharded_config(wd: pathlib.Path, shards=2, nsteps=None) -> dict:
    """tests/configs/reduced.yaml in ``wd`` with explore.shards (and a longer run) set."""
    cfg = yaml.safe_load((wd / CONFIG).read_text())
    cfg["explore"]["shards"] = shards
    if nsteps:
        cfg["explore"]["stages"][0]["nsteps"] = nsteps
    (wd / CONFIG).write_text(yaml.safe_dump(cfg))
    return cfg


def assert_same_as_unsharded(wd: pathlib.Path, nshards: int) -> None:
    """Run iteration 0's walkers unsharded with `dpsnake explore` (same models, same options as the
    rule) and compare every walker's frames and deviations, and the summary, with the sharded run."""
    ex = wd / EXPLORE
    plan = json.loads((ex / "shards.json").read_text())
    assert len(plan["shards"]) == nshards and all(s["walkers"] for s in plan["shards"])
    assert json.loads((ex / "engine.json").read_text())["shards"] == nshards
    ref = wd / "unsharded"
    ref.mkdir()
    shutil.copy(ex / "walkers.json", ref)
    shutil.copytree(ex / "structures", ref / "structures")
    models = sorted(str(p) for p in (wd / "results/iter.000000/train").glob("model.*/model.dp"))
    data = [str(p) for p in sorted((wd / "results/data/init").iterdir())]
    args = ["--models", *models, "--walkers", str(ref / "walkers.json"), "--outdir", str(ref), "--device", "cpu"]
    assert dpsnake(["explore", *args, "--compress", "auto", "--compress-data", *data, "--no-progress"]) == 0
    walkers = json.loads((ex / "walkers.json").read_text())
    assert sorted(n for s in plan["shards"] for n in s["walkers"]) == sorted(w["name"] for w in walkers)
    for w in walkers:
        a, b = (ase.io.read(d / w["name"] / "traj.extxyz", ":") for d in (ex, ref))
        assert len(a) == len(b) > 1, w["name"]
        for fa, fb in zip(a, b):  # the files' precision: 10 decimals
            assert np.abs(fa.positions - fb.positions).max() <= 2e-10, w["name"]
            assert np.abs(fa.cell.array - fb.cell.array).max() <= 2e-10, w["name"]
        da, db = (np.loadtxt(d / w["name"] / "model_devi.out") for d in (ex, ref))
        np.testing.assert_allclose(da, db, rtol=2e-6, atol=1e-12, err_msg=w["name"])
    assert json.loads((ex / "summary.json").read_text()) == json.loads((ref / "summary.json").read_text())


def jobs_run(log: str) -> list[tuple[str, str]]:
    """(rule, wildcards) of the jobs in a Snakemake log."""
    out = []
    for m in re.finditer(r"^(?:localrule|localcheckpoint|rule|checkpoint) (\w+):\n((?:    .*\n)+)", log, re.M):
        wc = re.search(r"^ +wildcards: (.*)$", m[2], re.M)
        out.append((m[1], wc[1] if wc else ""))
    return out


def kill_during_a_shard(wd: pathlib.Path) -> None:
    """Iteration 0's exploration again in ``wd`` (a finished run of tests/configs/reduced.yaml, its
    models kept) with explore.shards: 2 and 600 steps: the plan, then the shards one at a time; one shard
    finishes, the other is stopped while it runs (SIGTERM, as SLURM does before a kill: it saves a
    checkpoint); the rerun runs that shard alone, from its checkpoint, and the merge."""
    sharded_config(wd, shards=2, nsteps=600)
    ex = wd / EXPLORE
    models = [f"results/iter.000000/train/model.{k}/model.dp" for k in range(2)]
    trained = {m: (wd / m).stat().st_mtime_ns for m in models}
    shutil.rmtree(ex)  # walkers, shards.json (one shard), frames: planned and explored again
    p = smk(wd, *models, f"{EXPLORE}/shards.json")
    assert jobs_run(p.stdout + p.stderr) == [("plan", "it=000000")]  # the models are kept
    assert {m: (wd / m).stat().st_mtime_ns for m in models} == trained

    def one_done_other_running():
        done = [k for k in range(2) if (ex / f"shards/shard.{k}/summary.json").is_file()]
        if len(done) != 1:
            return False
        other = json.loads((ex / "shards.json").read_text())["shards"][1 - done[0]]["walkers"][0]
        part = ex / other / "model_devi.out.part"
        return part.is_file() and part.read_text().count("\n") > 15

    _run_until(wd, one_done_other_running, signal.SIGTERM, args=("--cores", "1", f"{EXPLORE}/summary.json"))
    done = [k for k in range(2) if (ex / f"shards/shard.{k}/summary.json").is_file()]
    assert len(done) == 1 and not (ex / "summary.json").exists()
    killed = 1 - done[0]
    assert (ex / f"shards/shard.{killed}/checkpoint.npz").is_file()
    kept = (ex / f"shards/shard.{done[0]}/summary.json").stat().st_mtime_ns

    smk(wd, "--unlock")
    p = smk(wd, "--cores", "1", f"{EXPLORE}/summary.json")
    ran = jobs_run(p.stdout + p.stderr)
    assert sorted(r for r, _ in ran) == ["explore_merge", "explore_shard"], ran
    assert f"shard={killed}" in dict(ran)["explore_shard"]
    assert (ex / f"shards/shard.{done[0]}/summary.json").stat().st_mtime_ns == kept
    log = (wd / f"logs/iter.000000/explore.shard.{killed}.log").read_text()
    step = int(re.search(r"resumed from \S+ at step (\d+)", log)[1])
    assert 0 < step < 600
    assert_same_as_unsharded(wd, 2)
