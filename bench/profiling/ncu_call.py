"""One engine force call between cudaProfilerStart/Stop, for Nsight Compute (bench/profiling/ncu_engine.sh).

python bench/profiling/ncu_call.py MODEL.dp [--precision mixed] [--compress 2.0] [--walkers 256] [--rep 3]
    [--set tf32=1 ...]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/: benchutil
from benchutil import add_settings_arg, engine_settings  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--precision", default="mixed")
    ap.add_argument("--compress", type=float, default=None, metavar="MIN_NBOR_DIST")
    ap.add_argument("--walkers", type=int, default=256)
    ap.add_argument("--rep", type=int, default=3)
    add_settings_arg(ap)
    a = ap.parse_args()
    import cupy as cp
    from profile_engine import walker_batch

    from dpsnake.engine.ensemble import Ensemble

    args = walker_batch(cp, a.rep, a.walkers)
    ens = Ensemble(
        [a.model],
        precision=a.precision,
        compress=None if a.compress is None else {"min_nbor_dist": a.compress},
        settings=engine_settings(a.set),
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
