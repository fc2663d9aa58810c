"""Host vs device timeline of one batched force call: where the GPU waits for the host.

Stages of ``Ensemble.evaluate`` (neighbour build, chunk selection, compaction, each model's nets)
are wrapped; at each stage's start and end the host time, and at its end a CUDA event, are recorded,
without synchronising. For each stage the table shows the host's time in it and when the device
finished that stage's work relative to when the host finished issuing it. A stage
whose device end is close to its host end left the GPU waiting for the host (launch-bound); a
device end far behind means the host ran ahead (GPU-bound).

    python bench/profiling/timeline_engine.py MODEL.dp [MODEL.dp ...] [--compress 2.0] [--calls 10]
        [--set tf32=1 ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/: bench_engine
from benchutil import add_settings_arg, engine_settings  # noqa: E402


class Timeline:
    """(stage, host start, host end, end event) records of the current call."""

    def __init__(self, cp):
        self.cp, self.rec = cp, []

    def wrap(self, owner, name, label):
        fn = getattr(owner, name)
        tl = self

        def wrapped(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            t1 = time.perf_counter()
            e1 = tl.cp.cuda.Event()
            e1.record()
            tl.rec.append((label, t0, t1, e1))
            return out

        setattr(owner, name, wrapped)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--compress", type=float, default=None)
    ap.add_argument("--precision", default="mixed")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--json", default=None)
    add_settings_arg(ap)
    args = ap.parse_args()
    import cupy as cp
    from bench_engine import batch_frames

    from dpsnake.engine import ensemble as ens_mod
    from dpsnake.engine import neighbor
    from dpsnake.engine.deeppot import frames_to_flat

    comp = None if args.compress is None else {"min_nbor_dist": args.compress}
    settings = engine_settings(args.set)
    ens = ens_mod.Ensemble(args.models, precision=args.precision, compress=comp, settings=settings)
    c, b, t = batch_frames()
    flat = frames_to_flat(cp, cp.asarray(c), cp.asarray(b), cp.asarray(t))[:5]
    tl = Timeline(cp)
    tl.wrap(ens_mod, "NeighborBuilder", "neighbour build")
    tl.wrap(neighbor.NeighborBuilder, "chunk", "chunk select")
    tl.wrap(ens_mod, "_compact", "compact")
    tl.wrap(ens_mod, "energy_and_grad", "nets (per model)")
    for _ in range(3):
        ens.evaluate(*flat)
    cp.cuda.Device().synchronize()
    rows, walls = {}, []
    for _ in range(args.calls):
        tl.rec = []
        e_start = cp.cuda.Event()
        e_start.record()
        t_start = time.perf_counter()
        ens.evaluate(*flat)
        t_host = time.perf_counter()
        e_end = cp.cuda.Event()
        e_end.record()
        e_end.synchronize()
        t_end = time.perf_counter()
        walls.append((t_end - t_start, t_host - t_start, cp.cuda.get_elapsed_time(e_start, e_end) * 1e-3))
        prev_h = 0.0
        for label, t0, t1, e1 in tl.rec:
            d1 = cp.cuda.get_elapsed_time(e_start, e1) * 1e-3
            r = rows.setdefault(
                label, {"host_ms": [], "host_end_ms": [], "dev_end_ms": [], "gap_before_ms": [], "calls": 0}
            )
            r["host_ms"].append((t1 - t0) * 1e3)
            r["host_end_ms"].append((t1 - t_start) * 1e3)
            r["dev_end_ms"].append(d1 * 1e3)
            r["gap_before_ms"].append((t0 - t_start) * 1e3 - prev_h)
            prev_h = (t1 - t_start) * 1e3
            r["calls"] += 1
    med = lambda v: float(np.median(v))  # noqa: E731
    w = np.median(np.array(walls), axis=0) * 1e3
    nat = c.shape[0] * c.shape[1]
    print(
        f"{len(args.models)} model(s), {args.precision}, compress={args.compress}: wall {w[0]:.2f} ms "
        f"({w[0] / nat * 1e3:.3f} us/atom), host returns at {w[1]:.2f} ms, device span {w[2]:.2f} ms, "
        f"compaction widths redone in {ens.width_misses} calls; settings {settings.to_dict()}"
    )
    print("| stage | per call | host ms (sum) | host end ms (last) | device end ms (last) | host time before it |")
    print("|---|---|---|---|---|---|")
    out = {
        "wall_ms": w[0],
        "host_return_ms": w[1],
        "device_span_ms": w[2],
        "width_misses": ens.width_misses,
        "settings": settings.to_dict(),
        "stages": {},
    }
    ncalls = args.calls
    for label, r in rows.items():
        k = r["calls"] // ncalls
        host = np.array(r["host_ms"]).reshape(ncalls, k).sum(axis=1)
        he = np.array(r["host_end_ms"]).reshape(ncalls, k)[:, -1]
        de = np.array(r["dev_end_ms"]).reshape(ncalls, k)[:, -1]
        gap = np.array(r["gap_before_ms"]).reshape(ncalls, k).sum(axis=1)
        print(f"| {label} | {k} | {med(host):.2f} | {med(he):.2f} | {med(de):.2f} | {med(gap):.2f} |")
        out["stages"][label] = {
            "per_call": k,
            "host_ms": med(host),
            "host_end_ms": med(he),
            "device_end_ms": med(de),
            "host_gap_before_ms": med(gap),
        }
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
