"""explore.compile (engine deepmd, DPA-3 through torch.compile): the explore jobs share TorchInductor's
on-disk cache (`--compile-cache`, the rules' results/cache/torchinductor), so only the first job compiles.
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


def test_the_second_explore_job_loads_every_graph_from_the_cache(tmp_path):
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("TorchInductor on the CPU needs a C++ compiler")
    _two_jobs(tmp_path, "cpu")


def test_gpu_the_second_explore_job_loads_every_graph_from_the_cache(tmp_path):
    from engine_helpers import cupy_or_skip

    cupy_or_skip()
    _two_jobs(tmp_path, "gpu")
