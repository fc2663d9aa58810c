"""Where the engine's time goes: one force call split into stages (neighbour search, descriptor +
fitting forward, backward, force/virial scatter), on NumPy or CuPy. Prints a table, writes JSON.

    python bench/profile_engine.py MODEL.dp [--walkers 256] [--rep 3] [--precision mixed] [--json out.json]

Stages are timed separately with device synchronisation, so their sum exceeds one fused call slightly.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "src"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--walkers", type=int, default=256)
    ap.add_argument("--rep", type=int, default=3)
    ap.add_argument("--precision", default="mixed")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from ase.build import bulk

    from dpsnake.engine.descriptor import energy_and_grad
    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.engine.neighbor import NeighborBuilder

    xp = np
    if a.device in ("auto", "gpu"):
        try:
            import cupy as xp  # noqa: F811
        except ImportError:
            if a.device == "gpu":
                raise
    sync = (lambda: xp.cuda.runtime.deviceSynchronize()) if xp is not np else (lambda: None)

    atoms = bulk("Cu", "fcc", a=3.634, cubic=True).repeat((a.rep,) * 3)
    n, W = len(atoms), a.walkers
    rng = np.random.default_rng(0)
    coords = xp.asarray((atoms.positions[None] + 0.05 * rng.standard_normal((W, n, 3))).reshape(-1, 3))
    atype = xp.zeros(W * n, dtype=xp.int64)
    system = xp.asarray(np.repeat(np.arange(W), n))
    cells = xp.asarray(np.tile(atoms.cell.array[None], (W, 1, 1)))
    pbc = xp.ones(W, dtype=bool)
    ens = Ensemble([a.model], precision=a.precision)
    m = ens.models[0]

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

    rows = {}
    rows["full call"], _ = timed(lambda: ens.evaluate(coords, atype, system, cells, pbc))
    centers = xp.arange(W * n)
    def neigh():
        nb = NeighborBuilder(xp, coords, atype, system, cells, pbc, m.rcut, m.sel, m.pair_exclude)
        return nb.chunk(centers)
    rows["neighbour search"], ch = timed(neigh)
    rt = ens._rt(xp, 0)
    rows["forward (energy only)"], _ = timed(lambda: energy_and_grad(rt, 0, ch.d, ch.valid, need_grad=False))
    rows["forward + backward"], (e, g) = timed(lambda: energy_and_grad(rt, 0, ch.d, ch.valid))
    rows["backward (difference)"] = rows["forward + backward"] - rows["forward (energy only)"]
    natoms = W * n
    print(f"| stage ({W} x {n} atoms, {a.precision}, {xp.__name__}) | ms | us/atom |")
    print("|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v * 1e3:.2f} | {v / natoms * 1e6:.3f} |")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({"natoms": natoms, "device": xp.__name__,
                                                    "precision": a.precision, "seconds": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
