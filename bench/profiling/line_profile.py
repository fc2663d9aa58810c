"""Per-source-line time of one engine force call, the device synchronised after every line.

Lines of ``src/dpsnake/engine/*.py`` are traced (``sys.settrace``); the time from one line event
to the next, after a device synchronisation, is charged to the earlier line, so a line's time is its
own launches and kernels (the first line after a call into another engine function gets that
function's time only through that function's own lines). Prints the costliest lines, writes JSON.

    python bench/profiling/line_profile.py MODEL.dp [--walkers 256] [--rep 3] [--precision mixed] [--top 40]
        [--set NAME=VALUE ...]

Tracing adds ~10-20 us per line, so totals exceed an untraced call; use it to rank lines.
"""

from __future__ import annotations

import argparse
import json
import linecache
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/: benchutil
from benchutil import add_settings_arg, engine_settings  # noqa: E402

ENGINE = str(ROOT / "src" / "dpsnake" / "engine")


class LineTimer:
    """Charges wall time between consecutive traced line events (after ``sync()``) to the earlier line."""

    def __init__(self, sync, prefix: str = ENGINE):
        self.sync = sync
        self.prefix = prefix  # only lines of files under this folder are traced
        self.acc: dict[tuple[str, int], float] = {}
        self.hits: dict[tuple[str, int], int] = {}
        self.last = None
        self.t = 0.0

    def _tick(self, key):
        self.sync()
        now = time.perf_counter()
        if self.last is not None:
            self.acc[self.last] = self.acc.get(self.last, 0.0) + now - self.t
            self.hits[self.last] = self.hits.get(self.last, 0) + 1
        self.last = key
        self.t = time.perf_counter()

    def _local(self, frame, event, arg):
        if event == "line":
            self._tick((frame.f_code.co_filename, frame.f_lineno))
        elif event == "return":  # the rest of the calling line is charged to that line again
            self._tick((frame.f_code.co_filename, frame.f_lineno))
            back = frame.f_back
            if back is not None and back.f_code.co_filename.startswith(self.prefix):
                self._tick((back.f_code.co_filename, back.f_lineno))
        return self._local

    def _global(self, frame, event, arg):
        if frame.f_code.co_filename.startswith(self.prefix):
            return self._local
        return None

    def run(self, fn):
        sys.settrace(self._global)
        try:
            out = fn()
        finally:
            sys.settrace(None)
            self._tick(None)
        return out


def stages(xp, ens, coords, atype, system, cells, pbc) -> int:
    """CPU and GPU time of the call and of its stages: where the host, not the GPU, is the limit."""
    from cupyx.profiler import benchmark

    from dpsnake.engine.descriptor import energy_and_grad
    from dpsnake.engine.ensemble import _compact
    from dpsnake.engine.neighbor import NeighborBuilder, chunk_stats

    m = ens.models[0]
    cells_h, pbc_h = cells.get(), pbc.get()
    nb = NeighborBuilder(xp, coords, atype, system, cells_h, pbc_h, m.rcut, m.sel, m.pair_exclude)
    centers = xp.arange(coords.shape[0])
    ch = nb.chunk(centers)
    widths = chunk_stats(xp, ch, m.sel).get()[:-1]
    ch2, slots, _ = _compact(xp, ch, m.sel, widths)
    rt = ens._rt(xp, 0)
    cases = {
        "full call": lambda: ens.evaluate(coords, atype, system, cells, pbc),
        "neighbour build": lambda: NeighborBuilder(
            xp, coords, atype, system, cells_h, pbc_h, m.rcut, m.sel, m.pair_exclude
        ),
        "neighbour select": lambda: nb.chunk(centers),
        "compact": lambda: _compact(xp, ch, m.sel, widths),
        "forward": lambda: energy_and_grad(rt, 0, ch2.d, ch2.valid, need_grad=False, slots=slots),
        "forward + backward": lambda: energy_and_grad(rt, 0, ch2.d, ch2.valid, slots=slots),
    }
    print("| stage | CPU ms | GPU ms |")
    print("|---|---|---|")
    for name, fn in cases.items():
        r = benchmark(fn, n_repeat=20, n_warmup=3)
        print(f"| {name} | {np.median(r.cpu_times) * 1e3:.2f} | {np.median(r.gpu_times[0]) * 1e3:.2f} |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--walkers", type=int, default=256)
    ap.add_argument("--rep", type=int, default=3)
    ap.add_argument("--precision", default="mixed")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--compress", type=float, default=None, metavar="MIN_NBOR_DIST", help="tabulated embedding nets")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--stages", action="store_true", help="host (CPU) vs device (GPU) time per stage with cupyx.profiler.benchmark"
    )
    add_settings_arg(ap)
    a = ap.parse_args()

    from profile_engine import walker_batch

    from dpsnake.engine.ensemble import Ensemble

    try:
        import cupy as xp

        sync = xp.cuda.runtime.deviceSynchronize
    except ImportError:
        xp, sync = np, (lambda: None)
    coords, atype, system, cells, pbc = walker_batch(xp, a.rep, a.walkers)
    n, W = coords.shape[0] // a.walkers, a.walkers
    ens = Ensemble(
        [a.model],
        precision=a.precision,
        compress=None if a.compress is None else {"min_nbor_dist": a.compress},
        settings=engine_settings(a.set),
    )
    call = lambda: ens.evaluate(coords, atype, system, cells, pbc)  # noqa: E731
    for _ in range(2):
        call()
    sync()
    t = time.perf_counter()
    call()
    sync()
    plain = time.perf_counter() - t
    if a.stages:
        return stages(xp, ens, coords, atype, system, cells, pbc)
    lt = LineTimer(sync)
    lt.run(call)
    total = sum(lt.acc.values())
    rows = sorted(lt.acc.items(), key=lambda kv: -kv[1])[: a.top]
    print(
        f"{W} x {n} atoms, {a.precision}, {xp.__name__}: untraced call {plain * 1e3:.2f} ms, "
        f"traced lines {total * 1e3:.2f} ms"
    )
    print("| ms | hits | file:line | source |")
    print("|---|---|---|---|")
    out = []
    for (f, ln), s in rows:
        src = linecache.getline(f, ln).strip()[:90]
        name = f"{pathlib.Path(f).name}:{ln}"
        print(f"| {s * 1e3:.3f} | {lt.hits[(f, ln)]} | {name} | `{src}` |")
        out.append({"ms": s * 1e3, "hits": lt.hits[(f, ln)], "line": name, "source": src})
    if a.json:
        pathlib.Path(a.json).write_text(
            json.dumps({"untraced_ms": plain * 1e3, "traced_ms": total * 1e3, "lines": out}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
