"""Where the engine's time goes: one force call split into stages (neighbour build and selection,
env matrix + descriptor + fitting forward, backward, force/virial scatter), on NumPy or CuPy; the
full call with each family of fused kernels (engine/cuda/elementwise.py) on and off; and, with --check,
NumPy vs CuPy agreement of every fused path. Prints tables, writes JSON.

    python bench/profiling/profile_engine.py MODEL.dp [--walkers 256] [--rep 3] [--precision mixed]
        [--ablation] [--check EXTRA.dp ...] [--set NAME=VALUE ...] [--json out.json]
    CUDA_LAUNCH_BLOCKING=1 python bench/profiling/profile_engine.py MODEL.dp --cprofile 25   # per-function

Stages are timed separately with device synchronisation, so their sum exceeds one call slightly.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/: benchutil
from benchutil import add_settings_arg, engine_settings  # noqa: E402

from dpsnake.engine.settings import FAMILIES, EngineSettings

# fused elementwise families ("0" none, "all"), then flags: +warp (select="warp", else "thread"),
# +full (compact off: every slot), +fused (fused="on": fused embedding kernels, else "off")
FAST_CONFIGS = ("0", "all+warp+full", "all+warp", "all+warp+fused", "all+warp+fused+full")
SETTINGS = EngineSettings()  # --set NAME=VALUE on top of the DPSNAKE_* variables (main)
BROKEN = set()  # kernel families the checked ensembles switched off


def _config(cfg) -> EngineSettings:
    """The settings of configuration ``cfg`` (see FAST_CONFIGS), on top of SETTINGS."""
    fast, *flags = cfg.split("+")
    return SETTINGS.replace(
        fast=frozenset() if fast == "0" else frozenset(FAMILIES),
        select="warp" if "warp" in flags else "thread",
        compact="full" not in flags,
        fused="on" if "fused" in flags else "off",
        tab_kernels="fused" in flags,
    )


def check_cells(rng):
    """Rattled small / medium / triclinic fcc Cu cells (ase Atoms; no exact distance ties, whose
    order at truncation is arbitrary): the systems of the NumPy vs CuPy checks."""
    from ase.build import bulk

    ats = []
    for rep, a0 in ((1, 3.634), (2, 3.5)):
        a = bulk("Cu", "fcc", a=a0, cubic=True).repeat((rep * 2, rep * 2, rep))
        a.rattle(0.1, seed=rep)
        ats.append(a)
    tri = bulk("Cu", "fcc", a=3.6).repeat((3, 3, 3))
    tri.rattle(0.1, seed=7)
    tri.set_cell(tri.cell.array @ (np.eye(3) + 0.05 * rng.uniform(-1, 1, (3, 3))), scale_atoms=True)
    ats.append(tri)
    return ats


def walker_batch(xp, rep, walkers, seed=0):
    """W rattled copies of a rep^3 fcc Cu cubic cell in the flat batched layout (namespace xp):
    coords (W*n, 3), atype, system, cells (W, 3, 3), pbc (W,)."""
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.634, cubic=True).repeat((rep,) * 3)
    n, W = len(atoms), walkers
    rng = np.random.default_rng(seed)
    coords = xp.asarray((atoms.positions[None] + 0.05 * rng.standard_normal((W, n, 3))).reshape(-1, 3))
    return (
        coords,
        xp.zeros(W * n, dtype=xp.int64),
        xp.asarray(np.repeat(np.arange(W), n)),
        xp.asarray(np.tile(atoms.cell.array[None], (W, 1, 1))),
        xp.ones(W, dtype=bool),
    )


def _systems(ntypes, rng):
    """check_cells() flattened, random types."""
    ats = check_cells(rng)
    coords = np.concatenate([a.positions for a in ats])
    atype = rng.integers(0, ntypes, len(coords))
    system = np.repeat(np.arange(len(ats)), [len(a) for a in ats])
    cells = np.array([a.cell.array for a in ats])
    return coords, atype, system, cells


def check(paths, xp, emit):
    """NumPy vs CuPy for every fused-kernel configuration; returns {config: worst relative error}
    per precision (tolerances: 1e-12 double, 1e-5 mixed)."""
    import warnings

    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.engine.xp import to_numpy

    rng = np.random.default_rng(5)
    worst = {}
    for path in paths:
        for prec in ("double", "mixed"):
            ens = Ensemble([path], precision=prec, settings=SETTINGS)
            coords, atype, system, cells = _systems(ens.ntypes, rng)
            for pbc in (np.array([True, True, True]), np.array([True, False, True])):
                args = (coords, atype, system, cells, pbc)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    for atomic in (False, True):
                        ref = ens.evaluate(*args, atomic=atomic)
                        for cfg in FAST_CONFIGS:
                            try:
                                e2 = Ensemble([path], precision=prec, settings=_config(cfg))
                                got = e2.evaluate(*[xp.asarray(a) for a in args], atomic=atomic)
                                BROKEN.update(e2.ctx.broken)
                            except Exception as exc:  # an unverified kernel failed: report, go on
                                emit(
                                    check="numpy_vs_cupy",
                                    model=str(path),
                                    prec=prec,
                                    fast=cfg,
                                    error=f"{type(exc).__name__}: {exc}"[:300],
                                )
                                worst[f"{prec}:{cfg}"] = float("inf")
                                continue
                            err = max(
                                float(np.abs(ref[k] - to_numpy(got[k])).max() / max(np.abs(ref[k]).max(), 1e-300))
                                for k in ref
                            )
                            key = f"{prec}:{cfg}"
                            worst[key] = max(worst.get(key, 0.0), err)
                            emit(
                                check="numpy_vs_cupy",
                                model=str(path),
                                prec=prec,
                                fast=cfg,
                                pbc=pbc.tolist(),
                                atomic=atomic,
                                max_rel=err,
                            )
    verdict = {}
    for key, err in worst.items():
        tol = 1e-12 if key.startswith("double") else 1e-5
        verdict[key] = (err, "PASS" if err <= tol else "FAIL")
    emit(check_summary={k: f"{v[0]:.2e} {v[1]}" for k, v in verdict.items()}, broken=sorted(BROKEN))
    return verdict


def ops(xp, rt, ch, timed):
    """Single operations of the embedding on the profile's shapes (first type, whole chunk)."""
    from dpsnake.engine.cuda import elementwise as ew

    m, dt = rt.model, rt.dtype
    n, s = ch.valid.shape
    M = m.neuron[-1]
    net = rt.embeddings[0]
    rows = {}
    Rn = (
        ew.env_forward(xp, ch.d, ch.valid, rt.davg[0], rt.rstd[0], m.rcut_smth, m.rcut, m.env_protection, dt)
        if rt.ctx.fast(xp, "env")
        else xp.asarray(np.random.default_rng(0).random((n, s, 4)), dtype=dt)
    )
    rows["op: env matrix kernel"], _ = timed(
        lambda: ew.env_forward(xp, ch.d, ch.valid, rt.davg[0], rt.rstd[0], m.rcut_smth, m.rcut, m.env_protection, dt)
    )
    x = Rn[:, :, 0:1]
    for k, l in enumerate(net.layers):
        xin = x
        if l.nin > 1:
            rows[f"op: layer {k} GEMM ({l.nin}->{l.nout})"], _ = timed(lambda: xin.reshape(-1, l.nin) @ l.w)
        rows[f"op: layer {k} fused tanh kernel"], (x, dy) = timed(lambda: ew.dense_tanh(xp, l, xin, True))
        rows[f"op: layer {k} gy * dy"], _ = timed(lambda: x * dy)
    G = x
    ggr = xp.asarray(np.random.default_rng(1).random((n, 4, M)), dtype=dt)
    rows["op: Rn^T G (batched)"], _ = timed(lambda: xp.matmul(Rn.transpose(0, 2, 1), G))
    rows["op: Rn ggr (batched, K=4)"], _ = timed(lambda: xp.matmul(Rn, ggr))
    rows["op: G ggr^T (batched)"], _ = timed(lambda: xp.matmul(G, ggr.transpose(0, 2, 1)))
    gRn = xp.asarray(Rn)
    rows["op: env chain-rule kernel"], g = timed(
        lambda: ew.env_backward(xp, gRn, ch.d, ch.valid, rt.rstd[0], m.rcut_smth, m.rcut, m.env_protection)
    )
    f = xp.zeros((int(ch.owner.max()) + 1, 3))
    own = xp.where(ch.valid, ch.owner, ch.centers[:, None])
    rows["op: force scatter kernel"], _ = timed(lambda: ew.scatter_neg(xp, f, own, ch.valid, g))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--walkers", type=int, default=256)
    ap.add_argument("--rep", type=int, default=3)
    ap.add_argument("--precision", default="mixed")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--ablation", action="store_true", help="full call per kernel configuration (FAST_CONFIGS)")
    add_settings_arg(ap)
    ap.add_argument("--check", nargs="*", default=None, help="NumPy vs CuPy check (+ extra .dp)")
    ap.add_argument("--ops", action="store_true", help="also time single operations on these shapes")
    ap.add_argument("--cprofile", type=int, default=0, help="print the N costliest functions")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    global SETTINGS
    SETTINGS = engine_settings(a.set)

    from dpsnake.engine.descriptor import energy_and_grad
    from dpsnake.engine.ensemble import Ensemble, _compact
    from dpsnake.engine.neighbor import NeighborBuilder, chunk_stats
    from dpsnake.engine.xp import to_numpy

    xp = np
    if a.device in ("auto", "gpu"):
        try:
            import cupy as xp  # noqa: F811
        except ImportError:
            if a.device == "gpu":
                raise
    sync = (lambda: xp.cuda.runtime.deviceSynchronize()) if xp is not np else (lambda: None)
    results = []

    def emit(**kw):
        results.append(kw)
        print(json.dumps(kw), flush=True)

    if a.check is not None and xp is not np:
        check([a.model, *a.check], xp, emit)

    coords, atype, system, cells, pbc = walker_batch(xp, a.rep, a.walkers)
    W = a.walkers
    n = coords.shape[0] // W
    ens = Ensemble([a.model], precision=a.precision, settings=SETTINGS)
    m = ens.models[0]
    natoms = W * n

    def timed(fn):
        fn()
        sync()
        ts = []
        for _ in range(a.repeat):
            t = time.perf_counter()
            out = fn()
            sync()
            ts.append(time.perf_counter() - t)
        return float(np.median(ts)), out

    full = lambda: ens.evaluate(coords, atype, system, cells, pbc)  # noqa: E731
    if a.cprofile:
        import cProfile
        import pstats

        full()
        sync()
        pr = cProfile.Profile()
        pr.enable()
        full()
        sync()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(a.cprofile)
        return 0

    rows = {}
    if a.ablation:
        for cfg in FAST_CONFIGS:
            try:
                e2 = Ensemble([a.model], precision=a.precision, settings=_config(cfg))
                rows[f"full call, {cfg}"], _ = timed(lambda: e2.evaluate(coords, atype, system, cells, pbc))
            except Exception as exc:  # an unverified kernel failed: report, keep the table
                print(f"config {cfg} failed: {type(exc).__name__}: {exc}")
    rows["full call"], _ = timed(full)
    centers = xp.arange(natoms)
    build = lambda: NeighborBuilder(
        xp,
        coords,
        atype,
        system,
        cells,
        pbc,
        m.rcut,
        m.sel,  # noqa: E731
        m.pair_exclude,
        ctx=ens.ctx,
    )
    rows["neighbour build (images, bins)"], nb = timed(build)
    nb.sorted_ext()
    rows["neighbour select (chunk)"], ch = timed(lambda: nb.chunk(centers))
    widths = to_numpy(chunk_stats(xp, ch, m.sel))[:-1]
    rows["compact slots"], (ch, slots, _) = timed(lambda: _compact(ens.ctx, xp, ch, m.sel, widths))
    rt = ens._rt(xp, 0)
    rows["forward (energy only)"], _ = timed(
        lambda: energy_and_grad(rt, 0, ch.d, ch.valid, need_grad=False, slots=slots)
    )
    rows["forward + backward"], _ = timed(lambda: energy_and_grad(rt, 0, ch.d, ch.valid, slots=slots))
    rows["backward (difference)"] = rows["forward + backward"] - rows["forward (energy only)"]
    rows["rest (full - neighbours - forward - backward)"] = (
        rows["full call"]
        - rows["neighbour build (images, bins)"]
        - rows["neighbour select (chunk)"]
        - rows["compact slots"]
        - rows["forward + backward"]
    )
    if a.ops:
        try:
            rows.update(ops(xp, rt, ch, timed))
        except Exception as err:  # report and keep the stage table
            print(f"ops failed: {type(err).__name__}: {err}")
    print(f"| stage ({W} x {n} atoms, {a.precision}, {xp.__name__}) | ms | us/atom |")
    print("|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v * 1e3:.2f} | {v / natoms * 1e6:.3f} |")
    emit(natoms=natoms, device=xp.__name__, precision=a.precision, seconds=rows)
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
