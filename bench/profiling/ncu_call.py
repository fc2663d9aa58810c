"""One engine force call between cudaProfilerStart/Stop, for Nsight Compute (bench/profiling/ncu_engine.sh).

python bench/profiling/ncu_call.py MODEL.dp [--precision mixed] [--compress 2.0] [--walkers 256] [--rep 3]
    [--set tf32=1 ...]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "src"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--precision", default="mixed")
    ap.add_argument("--compress", type=float, default=None, metavar="MIN_NBOR_DIST")
    ap.add_argument("--walkers", type=int, default=256)
    ap.add_argument("--rep", type=int, default=3)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an engine setting (EngineSettings field, docs/engine.md), on top of the DPSNAKE_* variables",
    )
    a = ap.parse_args()
    import cupy as cp
    from profile_engine import walker_batch

    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.engine.settings import EngineSettings

    args = walker_batch(cp, a.rep, a.walkers)
    ens = Ensemble(
        [a.model],
        precision=a.precision,
        compress=None if a.compress is None else {"min_nbor_dist": a.compress},
        settings=EngineSettings.parse(a.set, EngineSettings.from_env(os.environ)),
    )
    for _ in range(2):  # compile and warm the caches outside the profiled range
        ens.evaluate(*args)
    cp.cuda.runtime.deviceSynchronize()
    cp.cuda.profiler.start()
    ens.evaluate(*args)
    cp.cuda.runtime.deviceSynchronize()
    cp.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
