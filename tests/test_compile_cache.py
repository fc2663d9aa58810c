"""explore.compile (engine deepmd, DPA-3 through torch.compile): the warm-up (explore.warmup) and the explore
jobs share TorchInductor's on-disk cache (`--compile-cache`, the rules' results/cache/torchinductor), so only
the first of them compiles.
Each job is a process of its own, as the rules run them; the second explores other weights of the same
architecture and its log says every graph came from the cache. CPU: TorchInductor's C++ kernels (CI); GPU:
the same through `--compile auto` (skipped without CuPy)."""

from __future__ import annotations

import copy
import re
import shutil

import pytest
import yaml
from test_explore_warmup import ROOT, dpsnake
from test_workflow_inputs import CONFIG

from dpsnake.workflow.config import check, write_if_changed


def _dpa3_config(tmp_path, device: str):
    """tests/configs/reduced.yaml with the tests' tiny DPA-3 (PyTorch backend), engine deepmd, compile on,
    2 walkers of 10 steps; resolved, and iteration 0 planned. Returns (config, walkers.json)."""
    from dpmodels import PT_DESCRIPTORS

    raw = copy.deepcopy(yaml.safe_load((ROOT / "tests" / "configs" / "reduced.yaml").read_text()))
    raw["train"]["backend"] = "pt"
    raw["train"]["input"]["model"]["descriptor"] = copy.deepcopy(PT_DESCRIPTORS["dpa3"])
    raw["explore"].update(engine="deepmd", compile=True, compress=None, device=device)
    raw["explore"]["stages"][0].update(nsteps=10, temperatures=[300], pressures=[0.0])
    (tmp_path / CONFIG).write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = check(raw, tmp_path)
    write_if_changed(cfg, tmp_path / "results" / "config.json")
    walkers = tmp_path / "results" / "iter.000000" / "explore" / "walkers.json"
    dpsnake("plan", "--config", "results/config.json", "--iter", "0", "--out", walkers, cwd=tmp_path)
    return cfg, walkers


def _explore(tmp_path, cfg, walkers, cache, device: str, seed: int, out: str) -> tuple[int, int]:
    """`dpsnake explore` of an untrained model of the config's architecture (weights from ``seed``) with the
    cache folder (`--compile auto` on a GPU, where the rules pass it; `on` on the CPU, where auto is off);
    returns (graphs loaded from the cache, graphs compiled) from its log."""
    from dpsnake.md.warmup import untrained_model

    c = copy.deepcopy(cfg)
    c["train"]["seed"] = seed
    model = untrained_model(c, tmp_path / f"m{seed}.dp")
    log = dpsnake(
        "explore", "--models", model, "--walkers", walkers, "--outdir", out, "--engine", "deepmd",
        "--device", device, "--compile", "auto" if device == "gpu" else "on", "--compile-cache", cache,
        "--no-progress", cwd=tmp_path,
    )  # fmt: skip
    m = re.search(r"torch.compile: (\d+) graphs loaded from the cache, (\d+) compiled", log)
    assert m, log
    assert f"--compile: cache {cache.resolve()}" in log, log
    return int(m[1]), int(m[2])


def _two_jobs(tmp_path, device: str) -> None:
    cfg, walkers = _dpa3_config(tmp_path, device)
    cache = tmp_path / "cache"
    loaded, compiled = _explore(tmp_path, cfg, walkers, cache, device, 100, "explore1")
    assert loaded == 0 and compiled >= 1 and any(cache.rglob("*"))
    loaded, compiled = _explore(tmp_path, cfg, walkers, cache, device, 200, "explore2")
    assert loaded >= 1 and compiled == 0


def _warm_up(tmp_path, walkers, cache) -> dict:
    """The warm-up (explore.warmup) of an untrained model with compile on, on NumPy, in a process of its own
    (its command skips without a GPU: its function, as the command calls it); returns its record with
    {"graphs": compile_cache_counts()}."""
    import json
    import subprocess
    import sys

    code = (
        "import json, pathlib, sys, numpy\n"
        "from dpsnake.md.deepmd_provider import compile_cache_counts, use_compile_cache\n"
        "from dpsnake.md.warmup import warm_up\n"
        "from dpsnake.workflow.config import read_resolved\n"
        "use_compile_cache(sys.argv[1])\n"
        "r = warm_up(read_resolved('results/config.json'), sys.argv[2], pathlib.Path(sys.argv[3]), numpy,"
        " engine='deepmd', compile=True)\n"
        "print(json.dumps(dict(r, graphs=compile_cache_counts())))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(cache), str(walkers), str(tmp_path / "scratch")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert not (tmp_path / "scratch").exists()
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_the_warm_up_and_the_explore_jobs_load_every_graph_from_the_cache(tmp_path):
    """CPU: the warm-up compiles (2 models, 2 walkers); an explore job of other weights, then another,
    each load every graph and compile none."""
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("TorchInductor on the CPU needs a C++ compiler")
    cfg, walkers = _dpa3_config(tmp_path, "cpu")
    cache = tmp_path / "cache"
    rec = _warm_up(tmp_path, walkers, cache)
    assert rec["engine"] == "deepmd" and rec["models"] == 2 and rec["walkers"] == 2, rec
    assert rec["graphs"]["compiled"] >= 1 and rec["graphs"]["loaded"] == 0 and any(cache.rglob("*")), rec
    for seed, out in ((100, "explore1"), (200, "explore2")):
        loaded, compiled = _explore(tmp_path, cfg, walkers, cache, "cpu", seed, out)
        assert loaded >= 1 and compiled == 0


def test_gpu_the_second_explore_job_loads_every_graph_from_the_cache(tmp_path):
    from engine_helpers import cupy_or_skip

    cupy_or_skip()
    _two_jobs(tmp_path, "gpu")


def test_gpu_warm_up_compiles_the_graphs_the_exploration_loads(tmp_path):
    """explore.warmup with explore.compile through Snakemake on a GPU, as a campaign runs it: while
    iteration 0 trains its DPA-3 models, the warm-up job compiles an untrained model's repflow layers into
    results/cache/torchinductor; the exploration of the trained models then loads every graph from there
    and compiles none (its log says so)."""
    import json

    from engine_helpers import cupy_or_skip
    from test_workflow_inputs import smk

    cupy_or_skip()
    from dpmodels import PT_DESCRIPTORS

    for name in ("Snakefile", "workflow", "config", "profiles", "envs"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    raw = copy.deepcopy(yaml.safe_load((ROOT / "tests" / "configs" / "reduced.yaml").read_text()))
    raw["train"]["backend"] = "pt"
    raw["train"]["input"]["model"]["descriptor"] = copy.deepcopy(PT_DESCRIPTORS["dpa3"])
    raw["explore"].update(engine="deepmd", compile=True, compress=None, device="gpu", warmup=True)
    raw["explore"]["stages"][0].update(nsteps=10, temperatures=[300], pressures=[0.0])
    (tmp_path / CONFIG).write_text(yaml.safe_dump(raw, sort_keys=False))
    smk(tmp_path, "results/iter.000000/explore/summary.json")
    rec = json.loads((tmp_path / "results" / "iter.000000" / "explore" / "warmup.json").read_text())
    assert rec["engine"] == "deepmd" and rec["graphs"]["compiled"] >= 1, rec
    log = (tmp_path / "logs" / "iter.000000" / "explore.log").read_text()
    m = re.search(r"torch.compile: (\d+) graphs loaded from the cache, (\d+) compiled", log)
    assert m, log
    assert int(m[1]) >= 1 and int(m[2]) == 0, log
