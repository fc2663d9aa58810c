"""Seconds of one small exploration (the demo's: 8 walkers x 32 atoms, 600 steps, 4 models, deviation
every 10) per engine setting, in one process, each setting run twice (on a GPU the first compiles its
kernels): where the explore job's time goes when the batch is too small to fill a GPU (issue 17's demo),
or, with ``--device cpu``, what the CPU demo's neighbour handling costs (a full search every step vs the
candidates the explorer keeps, settings ``skin``; with the lists built per run).

    python3 bench/profiling/explore_small.py --models m0.dp m1.dp m2.dp m3.dp --walkers walkers.json \
        [--device gpu|cpu] [--out F.json]
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
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    a = ap.parse_args()
    if a.device == "cpu":
        import numpy as xp

        def sync():
            pass
    else:
        import cupy as xp

        sync = xp.cuda.Device().synchronize

    from dpsnake.engine.dispatch import make_ensemble
    from dpsnake.engine.settings import EngineSettings
    from dpsnake.md.explore import MD_SKIN, min_nbor_dist  # noqa: F401  (the explore job's imports)
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
    if a.device == "cpu":  # the explorer's CPU ensemble keeps candidates (skin); the full search for comparison
        variants = {
            "double, full search every step (skin 0)": dict(precision="double"),
            f"double, kept candidates (skin {MD_SKIN}, the explorer's)": dict(
                precision="double", settings=EngineSettings(skin=MD_SKIN)
            ),
        }
    rows = {}
    for name, kw in variants.items():
        times, builds = [], None
        for _ in range(a.repeat):
            ens = make_ensemble(a.models, xp=xp, **kw)
            out = tempfile.mkdtemp()
            sync()
            t = time.perf_counter()
            Explorer(
                walkers, EnsembleProvider(ens), list(ens.type_map), out, xp=xp, models=a.models, progress=False
            ).run()
            sync()
            times.append(round(time.perf_counter() - t, 3))
            shutil.rmtree(out)
            builds = None if ens._kept is None else [ens._kept.builds, ens._kept.calls]
        rows[name] = times if builds is None else {"s": times, "builds_calls": builds}
        print(
            f"{name:48s} s per run: {times}"
            + ("" if builds is None else f"; lists built {builds[0]} in {builds[1]} calls"),
            flush=True,
        )
    if a.out:
        import datetime
        import sys

        meta = {"device": a.device, "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}
        json.dump({**meta, "seconds": rows}, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
