"""The strip-mode geometric net + gate kernels alone on the GPU (issue 21): cuda/strip_net.py (FP32 FMAs, a slot per
thread; fma_pair: its forward on two slots per thread, the backward the same) against cuda/strip_net_tc.py (TF32
tensor cores, a warp per 16 slots; its backward bounded for 3 blocks per SM, the default, and unbounded; tc_direct: G
and gG not through shared tiles, tc_direct_ch4: its forward on 4 n tiles per chunk), forward and backward, on DeePMD-
kit's example-size net [25, 50, 100] (random weights, tanh, resnet) over 27,648 centres x 88 slots with a two-type
table and smooth w. Prints a table (ms per call, ns per slot) and the largest difference of the TF32 kernels' G /
dL/ds to the FP32 ones; writes JSON.

    python3 bench/profiling/strip_net_probe.py --out strip_net_probe_h100.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchutil import timeit  # noqa: E402


def main():
    import cupy as cp

    from dpsnake.engine.cuda import strip_net, strip_net_tc
    from dpsnake.engine.nets import Layer, Net

    ap = argparse.ArgumentParser()
    ap.add_argument("--centres", type=int, default=27648)
    ap.add_argument("--slots", type=int, default=88)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    sizes = [1, 25, 50, 100]
    net = Net([Layer(rng.normal(size=(i, o)) / np.sqrt(i), rng.normal(size=o) * 0.1, None, "tanh", True)
               for i, o in zip(sizes[:-1], sizes[1:])])  # fmt: skip
    n, ns, M = args.centres, args.slots, sizes[-1]
    Rn = cp.asarray(rng.normal(size=(n, ns, 4)).astype(np.float32))
    table = cp.asarray(rng.normal(size=(6, M)).astype(np.float32))
    row = cp.asarray(rng.integers(0, 6, size=(n, ns)).astype(np.int32))
    w = cp.asarray(rng.uniform(size=(n, ns)).astype(np.float32))
    gG = cp.asarray(rng.normal(size=(n, ns, M)).astype(np.float32))
    sync = cp.cuda.Stream.null.synchronize
    kernels = {"fma": strip_net.StripNet(net, "float32", pair=False),
               "fma_pair": strip_net.StripNet(net, "float32", pair=True),
               "tc_minb3": strip_net_tc.StripNetTC(net, 3, direct=False),
               "tc_direct": strip_net_tc.StripNetTC(net, 3, direct=True),
               "tc_direct_ch4": strip_net_tc.StripNetTC(net, 3, direct=True, fwd_ch=4),
               "tc_unbounded": strip_net_tc.StripNetTC(net, 0, direct=False)}  # fmt: skip
    res, outs = {"gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "slots": n * ns}, {}
    for name, k in kernels.items():
        res[name + "_fwd_ms"] = 1e3 * timeit(lambda k=k: k.forward(Rn, table, row, w), sync, n=args.reps)
        res[name + "_bwd_ms"] = 1e3 * timeit(lambda k=k: k.backward(Rn, gG, table, row, w), sync, n=args.reps)
        outs[name] = (k.forward(Rn, table, row, w), *k.backward(Rn, gG, table, row, w))
    for name in ("fma_pair", "tc_minb3", "tc_direct", "tc_direct_ch4", "tc_unbounded"):
        for q, label in enumerate(("G", "ds", "dw")):
            ref = outs["fma"][q]
            res[f"{name}_{label}_rel_diff"] = float(abs(outs[name][q] - ref).max() / abs(ref).max())
    print(f"{res['gpu']}: {n} centres x {ns} slots, net {sizes}")
    print(f"{'kernels':14s} {'fwd ms':>8s} {'bwd ms':>8s} {'ns/slot':>8s}")
    for name in kernels:
        f, b = res[name + "_fwd_ms"], res[name + "_bwd_ms"]
        print(f"{name:14s} {f:8.3f} {b:8.3f} {1e6 * (f + b) / (n * ns):8.3f}")
    print({k: f"{v:.1e}" for k, v in res.items() if k.endswith("_rel_diff")})
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
