"""Registers, spills and shared memory of the engine's attention kernels as ptxas allocates them, no GPU needed:
what decides their occupancy (docs/benchmarks.md, "Whole-layer TF32 kernels"). Prints a table; ``--out`` JSON.

    pip install nvidia-cuda-nvcc-cu12     # ptxas (once; nvidia-cuda-nvrtc-cu12 comes with the tests' extras)
    python3 bench/profiling/ptxas_stats.py [--n 88] [--e 100] [--h 128] [--nnei 120] [--arch sm_90] [--out F.json]

Kernels: cuda/attn_layer (mixed + TF32, each flag set of smooth / dotr / normalize as a force call compiles them:
the forward on the two-stage W ring, the backward on none; with all three flags on: the forward alone (KEEP 0, deep
W rings), and a force call's kernels both on the deep rings, both on the two-stage ring, both on none, and with
session 33's FP32 y) and cuda/attn_core (FP64)
at the given shape (default: the se_atten_v2 benchmark's, 88 slots of 120, embedding 100, attention 128).
"""

from __future__ import annotations

import argparse
import json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=88, help="neighbour slots a chunk runs")
    ap.add_argument("--nnei", type=int, default=120)
    ap.add_argument("--e", type=int, default=100, help="embedding width (last of neuron)")
    ap.add_argument("--h", type=int, default=128, help="attention width (attn)")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from dpsnake.engine.cuda import attn_core, attn_layer
    from dpsnake.engine.cuda.ptx import ptxas_stats

    rows = []
    for smooth, dotr, normalize in ((1, 1, 1), (1, 0, 1), (0, 0, 1), (1, 1, 0)):
        defs = attn_layer.defines(args.n, args.e, args.h, smooth, dotr, normalize, args.nnei)
        for k, v in ptxas_stats(attn_layer.source(**defs), args.arch).items():
            rows.append({"kernel": k, "flags": f"smooth {smooth} dotr {dotr} normalize {normalize}", **v})
    variants = (
        (False, {}, "forward alone"),
        (True, {"WRING": 1, "WDEEP": 1, "BRING": 1}, "deep rings"),
        (True, {"WRING": 1, "WDEEP": 0, "BRING": 1}, "two-stage ring"),
        (True, {"WRING": 0, "BRING": 0}, "no ring"),
        (True, {"YH": 0}, "FP32 y"),
    )
    for keep, extra, label in variants:
        defs = attn_layer.defines(args.n, args.e, args.h, 1, 1, 1, args.nnei, keep=keep) | extra
        for k, v in ptxas_stats(attn_layer.source(**defs), args.arch).items():
            rows.append({"kernel": k, "flags": f"smooth 1 dotr 1 normalize 1, {label}", **v})
    n8 = -(-args.n // 8) * 8
    if attn_core.supported("float64", n8, args.h) is None:
        for k, v in ptxas_stats(attn_core.source(n8, args.h, True, True, args.nnei - n8), args.arch).items():
            rows.append({"kernel": k, "flags": "smooth 1 dotr 1 (FP64)", **v})
    print(f"{args.arch}, n {args.n} (nnei {args.nnei}), E {args.e}, H {args.h}")
    print(f"{'kernel':16s} {'flags':46s} {'regs':>5s} {'spill st':>9s} {'spill ld':>9s} {'stack':>6s} {'smem':>6s}")
    for r in rows:
        print(f"{r['kernel']:16s} {r['flags']:46s} {r['registers']:5d} {r['spill_stores']:9d} {r['spill_loads']:9d} "
              f"{r['stack']:6d} {r['smem']:6d}")  # fmt: skip
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"arch": args.arch, "n": args.n, "nnei": args.nnei, "E": args.e, "H": args.h, "kernels": rows},
                      fh, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
