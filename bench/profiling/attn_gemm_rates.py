"""Rates of the FP64 GEMMs of one se_atten_v2 attention layer, each alone on the GPU (cuBLAS through
dpsnake.engine.cuda.bmm, as attention.py calls them): time, TFLOP/s and the bandwidth their operands
and result need (each read and written once). Says whether the batched (centres, n, n) products are
compute- or bandwidth-bound, i.e. what a hand-written batched kernel could win (docs/benchmarks.md).

    python3 bench/profiling/attn_gemm_rates.py [--centres 4608] [--n 88] [--h 128] [--e 100] [--out F.json]

Shapes (per centre, n neighbour slots, H the attention width, E the embedding width): the forward's
q k^T (n x H . H x n) and A v (n x n . n x H), the backward's do v^T, A^T do, dL k, dL^T q, and the
flat in_proj (centres n x E . E x 3H) and out_proj (centres n x H . H x E) GEMMs.
"""

from __future__ import annotations

import argparse
import json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--centres", type=int, default=4608, help="centres per chunk (the engine's default chunk)")
    ap.add_argument("--n", type=int, default=88, help="neighbour slots run (88 of 120 for fcc CuNi)")
    ap.add_argument("--h", type=int, default=128, help="attention width (attn)")
    ap.add_argument("--e", type=int, default=100, help="embedding width (last of neuron)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import cupy

    from dpsnake.engine.cuda.bmm import bmm

    B, n, H, E = args.centres, args.n, args.h, args.e
    rng = cupy.random.default_rng(0)

    def arr(*shape):
        return rng.standard_normal(shape, dtype=cupy.float64)

    q, k, v, do = arr(B, n, H), arr(B, n, H), arr(B, n, H), arr(B, n, H)
    A, dL = arr(B, n, n), arr(B, n, n)
    x, wqkv, o, wout = arr(1, B * n, E), arr(1, E, 3 * H), arr(1, B * n, H), arr(1, H, E)
    out_nn, out_nh = cupy.empty((B, n, n)), cupy.empty((B, n, H))
    cases = [  # name, call, (m, n, k) per batch item, batch
        ("q k^T", lambda: bmm(q, k, tb=True, out=out_nn), (n, n, H), B),
        ("A v", lambda: bmm(A, v, out=out_nh), (n, H, n), B),
        ("do v^T", lambda: bmm(do, v, tb=True, out=out_nn), (n, n, H), B),
        ("A^T do", lambda: bmm(A, do, ta=True, out=out_nh), (n, H, n), B),
        ("dL k", lambda: bmm(dL, k, out=out_nh), (n, H, n), B),
        ("dL^T q", lambda: bmm(dL, q, ta=True, out=out_nh), (n, H, n), B),
        ("in_proj (flat)", lambda: bmm(x, wqkv), (B * n, 3 * H, E), 1),
        ("out_proj (flat)", lambda: bmm(o, wout), (B * n, E, H), 1),
    ]
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    rows = []
    for name, call, (m, nn, kk), batch in cases:
        call()
        cupy.cuda.Device().synchronize()
        times = []
        for _ in range(args.reps):
            start.record()
            call()
            stop.record()
            stop.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, stop) * 1e-3)
        t = sorted(times)[len(times) // 2]
        flop = 2.0 * batch * m * nn * kk
        byte = 8.0 * batch * (m * kk + kk * nn + m * nn) if batch > 1 else 8.0 * (m * kk + kk * nn + m * nn)
        rows.append(
            {"gemm": name, "m": m, "n": nn, "k": kk, "batch": batch, "ms": t * 1e3, "tflops": flop / t * 1e-12,
             "tb_per_s": byte / t * 1e-12, "flop_per_byte": flop / byte}
        )  # fmt: skip
    dev = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"{dev}: {B} centres x {n} slots, H {H}, E {E}, FP64, median of {args.reps}")
    print(f"{'GEMM':<16} {'m x n x k':>16} {'ms':>8} {'TFLOP/s':>8} {'TB/s':>7} {'FLOP/B':>7}")
    for r in rows:
        print(
            f"{r['gemm']:<16} {r['m']:>5}x{r['n']}x{r['k']:<5} {r['ms']:>8.3f} {r['tflops']:>8.2f} {r['tb_per_s']:>7.2f}"
            f" {r['flop_per_byte']:>7.1f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": dev, "centres": B, "n": n, "h": H, "e": E, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
