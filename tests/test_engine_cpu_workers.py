"""Chunks of centres run in threads on CPUs (EngineSettings ``cpu_workers``; engine/ensemble.py
``_map_chunks``): the same results as one after the other, work really spread over threads, BLAS
single-threaded inside them, and the default taken from BLAS's thread count."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from engine_helpers import fcc, rel_err
from test_engine_attn import attn_model, flat, systems
from threadpoolctl import threadpool_info, threadpool_limits

import dpsnake.engine.attn.ensemble as attn_ens
import dpsnake.engine.ensemble as se_ens
from dpsnake.engine.attn.ensemble import AttnEnsemble
from dpsnake.engine.ensemble import Ensemble
from dpsnake.engine.settings import EngineSettings

OUTPUTS = ("energy", "force", "virial", "atom_energy", "atom_virial")


def _blas_threads() -> int:
    return max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")


def _spy(monkeypatch, module):
    """Wrap ``module.energy_and_grad``: records (thread id, BLAS threads) of every chunk's call."""
    seen, inner = [], module.energy_and_grad

    def spy(*args, **kw):
        seen.append((threading.get_ident(), _blas_threads()))
        return inner(*args, **kw)

    monkeypatch.setattr(module, "energy_and_grad", spy)
    return seen


def _run(cls, models, args, workers, monkeypatch, module):
    seen = _spy(monkeypatch, module)
    ens = cls(models, chunk_atoms=3, settings=EngineSettings(cpu_workers=workers))
    out = ens.evaluate(*args, atomic=True)
    monkeypatch.undo()
    return out, seen


@pytest.mark.parametrize("kind", ["se_atten_v2", "se_e2_a"])
def test_threads_give_the_results_of_one_after_the_other(model_cache, cu_model, monkeypatch, kind):
    """Chunks of 3 centres, two models: 3 threads equal 1 to rounding; the chunks ran on more than
    one thread, with BLAS at one thread there (and at its own count for workers=1)."""
    if kind == "se_atten_v2":
        cls, module = AttnEnsemble, attn_ens
        models = [str(attn_model(model_cache, n)["dp"]) for n in ("v2_l2", "excl")]
        ats = systems(cls(models[:1]).type_map)[:4]
    else:
        cls, module = Ensemble, se_ens
        models = [str(cu_model["dp"])] * 2
        ats = [fcc(rep=(2, 2, 2), seed=1), fcc(rep=(3, 3, 3), seed=2)]
    args = flat(ats, cls(models[:1]).type_map)
    with threadpool_limits(2, user_api="blas"):
        one, seen1 = _run(cls, models, args, 1, monkeypatch, module)
        three, seen3 = _run(cls, models, args, 3, monkeypatch, module)
    for q in OUTPUTS:
        assert rel_err(three[q], one[q]) < 1e-13, q
    assert len(seen3) == len(seen1) > 6  # every chunk and model once
    assert len({t for t, _ in seen1}) == 1 and {b for _, b in seen1} == {2}
    assert len({t for t, _ in seen3}) > 1 and {b for _, b in seen3} == {1}
    assert _blas_threads() >= 1  # the limit is lifted after the call (threadpool_limits restores it)


def test_default_workers_follow_blas_threads(cu_model):
    """cpu_workers None: the BLAS threads of the process at the first call; an int overrides it;
    CuPy never uses the pool; bad values are refused."""
    with threadpool_limits(3, user_api="blas"):
        assert Ensemble([str(cu_model["dp"])])._workers(np) == 3
        assert Ensemble([str(cu_model["dp"])], settings=EngineSettings(cpu_workers=1))._workers(np) == 1
    with threadpool_limits(1, user_api="blas"):
        assert Ensemble([str(cu_model["dp"])])._workers(np) == 1
    fake_cupy = type("M", (), {"__name__": "cupy"})()
    assert Ensemble([str(cu_model["dp"])], settings=EngineSettings(cpu_workers=4))._workers(fake_cupy) == 1
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="cpu_workers"):
            EngineSettings(cpu_workers=bad)


def test_small_calls_skip_the_pool(cu_model, monkeypatch):
    """cpu_workers None: a call below CPU_POOL_MIN_MB of work memory (two 32-atom cells) runs
    its chunks on the calling thread with BLAS's own threads; with the bound at 0 the same call uses
    the pool. Same results either way."""
    args = flat([fcc(rep=(2, 2, 2), seed=1), fcc(rep=(2, 2, 2), seed=2)], ["Cu"])
    runs = {}
    with threadpool_limits(2, user_api="blas"):
        for bound in (se_ens.CPU_POOL_MIN_MB, 0.0):
            monkeypatch.setattr(se_ens, "CPU_POOL_MIN_MB", bound)
            seen = _spy(monkeypatch, se_ens)
            out = Ensemble([str(cu_model["dp"])], chunk_atoms=16).evaluate(*args)
            monkeypatch.undo()
            runs[bound] = out, {t for t, _ in seen}, {b for _, b in seen}
    (small, t_small, b_small), (pooled, t_pool, b_pool) = runs.values()
    assert t_small == {threading.get_ident()} and b_small == {2}
    assert threading.get_ident() not in t_pool and b_pool == {1}
    for q in ("energy", "force", "virial"):
        assert rel_err(pooled[q], small[q]) < 1e-13, q
