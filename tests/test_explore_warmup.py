"""explore.warmup (issue 17, iteration 0 of the GPU demo): `dpsnake explore-warmup` builds an untrained
model of the config's architecture with DeePMD-kit's own code, runs the iteration's walkers briefly with
it, never fails the run, and Snakemake schedules it for iteration 0's exploration only (and not for a run
that explored iteration 0 already). On a GPU (skipped in CI): after a warm-up, the exploration of models
of the same architecture finds every kernel in CuPy's cache."""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from test_workflow_inputs import CONFIG, jobs, smk

from dpsnake.workflow.config import check, write_if_changed

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(tmp_path: pathlib.Path, plan: bool = True, **explore) -> dict:
    """tests/configs/reduced.yaml (its explore section updated), resolved into results/config.json,
    and (``plan``) iteration 0's walkers (dpsnake plan) in results/iter.000000/explore/walkers.json."""
    raw = copy.deepcopy(yaml.safe_load((ROOT / "tests" / "configs" / "reduced.yaml").read_text()))
    raw["explore"].update(explore)
    (tmp_path / CONFIG).write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = check(raw, tmp_path)
    write_if_changed(cfg, tmp_path / "results" / "config.json")
    walkers = tmp_path / "results" / "iter.000000" / "explore" / "walkers.json"
    if plan:
        dpsnake("plan", "--config", "results/config.json", "--iter", "0", "--out", walkers, cwd=tmp_path)
    return cfg


def dpsnake(*args, cwd, env=None) -> str:
    p = subprocess.run(
        [sys.executable, "-m", "dpsnake.cli", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_untrained_model_has_the_config_architecture(tmp_path):
    from dpsnake.engine.dispatch import load_any
    from dpsnake.md.warmup import untrained_model

    cfg = _config(tmp_path)
    m = load_any(untrained_model(cfg, tmp_path / "u.dp"))
    want = cfg["train"]["input"]["model"]
    assert list(m.type_map) == cfg["type_map"]
    assert m.rcut == want["descriptor"]["rcut"] and list(m.sel) == want["descriptor"]["sel"]
    assert list(m.neuron) == want["descriptor"]["neuron"] and m.axis_neuron == want["descriptor"]["axis_neuron"]
    fit = next(f for f in m.fittings if f is not None)
    assert [layer.w.shape[1] for layer in fit.layers] == [*want["fitting_net"]["neuron"], 1]
    # DeePMD-kit's initial statistics: no training data went into it
    assert np.all(m.davg == 0) and np.all(m.dstd == 1)


def test_warm_up_runs_the_walkers_briefly_in_a_scratch_folder(tmp_path):
    from dpsnake.md.walkers import load_walkers
    from dpsnake.md.warmup import STEP_INTERVALS, warm_up

    cfg = _config(tmp_path)
    walkers = tmp_path / "results" / "iter.000000" / "explore" / "walkers.json"
    spec = load_walkers(walkers)
    scratch = tmp_path / "scratch"
    got = warm_up(cfg, walkers, scratch, np, precision="double")
    assert got["engine"] == "builtin" and got["models"] == cfg["train"]["numb_models"] == 2
    assert got["walkers"] == len(spec) == 8
    assert got["steps"] == STEP_INTERVALS * spec[0].trj_freq == 20 < spec[0].nsteps
    assert not scratch.exists()
    # the iteration's own exploration folder is untouched
    assert sorted(p.name for p in walkers.parent.iterdir()) == [
        "plan.json",
        "shards.json",
        "structures",
        "walkers.json",
    ]


def test_the_command_never_fails_the_run(tmp_path):
    from dpsnake.md import warmup

    _config(tmp_path)
    out = tmp_path / "w.json"
    walkers = "results/iter.000000/explore/walkers.json"
    dpsnake(
        "explore-warmup",
        "--config",
        "results/config.json",
        "--walkers",
        walkers,
        "--out",
        out,
        "--device",
        "cpu",
        cwd=tmp_path,
    )
    assert json.loads(out.read_text())["skipped"] == "no GPU: the CPU engine (NumPy) compiles nothing"
    # a fault (no GPU for --device gpu in CI, a missing walkers file on a GPU machine): recorded, exit 0
    args = argparse.Namespace(
        config=str(tmp_path / "results" / "config.json"),
        walkers=str(tmp_path / "missing.json"),
        out=str(out),
        engine="auto",
        device="gpu",
        precision="double",
        tf32=False,
        compress=None,
        compress_data=None,
        compile="off",
        compile_cache=None,
    )
    assert warmup.run(args) == 0
    assert json.loads(out.read_text())["skipped"].startswith("failed: ")


@pytest.fixture
def wd(tmp_path):
    for name in ("Snakefile", "workflow", "config", "profiles", "envs"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    return tmp_path


def test_snakemake_runs_it_for_iteration_0_only(wd):
    _config(wd, plan=False, warmup=True, compress=None)
    # iteration 0's plan, then the warm-up (on the CPU: recorded as skipped, in its log too)
    out = smk(wd, "results/iter.000000/explore/warmup.json")
    assert jobs(out, "plan") == jobs(out, "explore_warmup") == ["000000"]
    rec = json.loads((wd / "results" / "iter.000000" / "explore" / "warmup.json").read_text())
    assert rec["skipped"].startswith("no GPU")
    assert "skipped: no GPU" in (wd / "logs" / "iter.000000" / "explore.warmup.log").read_text()
    # the exploration of iteration 0 waits for it: removed, the dry run schedules it again ...
    (wd / "results" / "iter.000000" / "explore" / "warmup.json").unlink()
    assert jobs(smk(wd, "-n", "results/iter.000000/explore/summary.json"), "explore_warmup") == ["000000"]
    # ... but not for a run that explored iteration 0 before (here: its summary is there)
    (wd / "results" / "iter.000000" / "explore" / "summary.json").write_text("{}")
    assert not jobs(smk(wd, "-n", "results/iter.000000/explore/summary.json"), "explore_warmup")
    # auto with explore.device cpu: none
    _config(wd, plan=False, warmup="auto", compress=None)
    (wd / "results" / "iter.000000" / "explore" / "summary.json").unlink()
    assert not jobs(smk(wd, "-n"), "explore_warmup")
    # explore.compile: the warm-up and the exploration share one TorchInductor cache under results/
    _config(wd, plan=False, warmup=True, compress=None, compile=True)
    out = smk(wd, "-n", "-p", "results/iter.000000/explore/summary.json")
    cmds = [ln for ln in out.splitlines() if "dpsnake explore" in ln]  # explore-warmup and explore
    assert len(cmds) == 2 and all("--compile on --compile-cache results/cache/torchinductor" in c for c in cmds), cmds


def test_gpu_exploration_after_a_warm_up_compiles_nothing(tmp_path):
    """The warm-up command, then an exploration of differently initialised models of the same
    architecture, each a process of its own (as the rules run them), sharing a fresh CuPy kernel cache:
    the exploration adds no file to it (the warm-up compiled every kernel it runs)."""
    from engine_helpers import cupy_or_skip

    cupy_or_skip()
    from dpsnake.md.warmup import untrained_model

    cache = tmp_path / "cache"
    env = dict(os.environ, CUPY_CACHE_DIR=str(cache))
    cfg = _config(tmp_path, device="gpu", compress=None)
    walkers = "results/iter.000000/explore/walkers.json"

    dpsnake(
        "explore-warmup",
        "--config",
        "results/config.json",
        "--walkers",
        walkers,
        "--out",
        "w.json",
        "--device",
        "gpu",
        cwd=tmp_path,
        env=env,
    )
    rec = json.loads((tmp_path / "w.json").read_text())
    assert "skipped" not in rec and rec["engine"] == "builtin" and rec["kernel_cache"] == str(cache)
    files = sorted(cache.rglob("*"))
    assert rec["new_cache_files"] == len(files) > 5
    models = []
    for k in range(2):
        c = copy.deepcopy(cfg)
        c["train"]["seed"] = 100 + k
        models.append(untrained_model(c, tmp_path / f"m{k}.dp"))
    dpsnake(
        "explore",
        "--models",
        *models,
        "--walkers",
        walkers,
        "--outdir",
        "explore",
        "--device",
        "gpu",
        "--no-progress",
        cwd=tmp_path,
        env=env,
    )
    assert json.loads((tmp_path / "explore" / "summary.json").read_text())
    assert sorted(cache.rglob("*")) == files
