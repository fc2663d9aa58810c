"""Seconds of one small exploration (the GPU demo's: 8 walkers x 32 atoms, 600 steps, 4 models, deviation
every 10) per engine setting, in one process, each setting run twice (the first compiles its kernels):
where the explore job's time goes when the batch is too small to fill a GPU (issue 17's demo).

    python3 bench/profiling/explore_small.py --models m0.dp m1.dp m2.dp m3.dp --walkers walkers.json [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--walkers", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    import cupy as cp

    from dpsnake.engine.dispatch import make_ensemble
    from dpsnake.engine.settings import EngineSettings
    from dpsnake.md.explore import min_nbor_dist  # noqa: F401  (the explore job's imports)
    from dpsnake.md.explorer import Explorer
    from dpsnake.md.providers import EnsembleProvider
    from dpsnake.md.walkers import load_walkers

    walkers = load_walkers(a.walkers)
    variants = {
        "double (default)": dict(precision="double"),
        "double, fused nets": dict(precision="double", settings=EngineSettings(fused="on")),
        "mixed (FP32 nets, fused)": dict(precision="mixed"),
        "double, tabulated": dict(precision="double", compress={"min_nbor_dist": 1.8}),
        "mixed, tabulated": dict(precision="mixed", compress={"min_nbor_dist": 1.8}),
    }
    rows = {}
    for name, kw in variants.items():
        times = []
        for _ in range(a.repeat):
            ens = make_ensemble(a.models, xp=cp, **kw)
            out = tempfile.mkdtemp()
            cp.cuda.Device().synchronize()
            t = time.perf_counter()
            Explorer(
                walkers, EnsembleProvider(ens), list(ens.type_map), out, xp=cp, models=a.models, progress=False
            ).run()
            cp.cuda.Device().synchronize()
            times.append(round(time.perf_counter() - t, 3))
            shutil.rmtree(out)
        rows[name] = times
        print(f"{name:28s} s per run: {times}", flush=True)
    if a.out:
        json.dump(rows, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
