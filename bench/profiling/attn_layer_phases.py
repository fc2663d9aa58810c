"""Where the whole-layer TF32 kernels (dpsnake.engine.cuda.attn_layer) spend their time: each warp's clock cycles
between marks in the source (``PHASE(k)``, compiled in with ``-DPHASES``), summed over the warps and centres of
one launch; prints a table per kernel and writes JSON.

    python3 bench/profiling/attn_layer_phases.py [--centres 4608] [--n 88] [--nnei 120] [--e 100] [--h 128]
        [--reps 5] [--out F.json]

Kernels: the forward alone (KEEP 0), a force call's forward (keeps the backward's inputs) and the backward, on
the probe's layer and inputs (attn_layer_probe.py). Cycles are per warp and centre (a warp's wall clock: a
phase that waits on memory or on the other warps at a barrier counts that wait). The marked build's median time
is printed beside the unmarked one's, so the marks' own cost shows.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # attn_layer_probe
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/: benchutil
from benchutil import write_results  # noqa: E402

PH_BLOCKS, PH_SLOTS = 1024, 16
NAMES = {
    "fwd": ["x, sw, r, mask in", "k: project (+ keep)", "v: project (+ keep)", "q: project (+ keep)",
            "barrier", "logits", "row chain", "o = A v", "out-projection", "LayerNorm, stores"],
    "bwd": ["stage k, v", "LayerNorm backward", "do, dA", "logits again", "softmax again", "row chain bwd 1",
            "row chain bwd 2", "dq, its dx term", "stage q", "dv, its dx term", "dk, its dx term, dx out",
            "d sw, d r out"],
}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--centres", type=int, default=4608)
    ap.add_argument("--n", type=int, default=88)
    ap.add_argument("--nnei", type=int, default=120)
    ap.add_argument("--e", type=int, default=100)
    ap.add_argument("--h", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import cupy as cp
    import numpy as np
    from attn_layer_probe import _inputs, _layers, _time

    from dpsnake.engine.cuda import attn_layer

    B, n, E, H = args.centres, args.n, args.e, args.h
    p = _layers(E, H, args.nnei, 1)
    lw = attn_layer.LayerWeights.of(p.to(cp, np.float32).layers[0], cp)
    G, mask, r, sw = _inputs(cp, B, n, E)
    x, r32 = (cp.ascontiguousarray(a.astype(cp.float32)) for a in (G, r))
    sw2, mask_c = cp.ascontiguousarray(sw.reshape(B, n).astype(cp.float32)), cp.ascontiguousarray(mask)
    flags = (p.scaling, True, True, True, p.nnei)
    marks = (("PHASES", 1), ("PH_BLOCKS", PH_BLOCKS))
    dout = cp.random.default_rng(2).standard_normal((B, n, E), dtype=cp.float32)

    def run(kind, extra):
        if kind == "fwd0":
            return lambda: attn_layer.forward(lw, x, sw2, r32, mask_c, *flags, extra=extra)
        if kind == "fwd1":
            return lambda: attn_layer.forward(lw, x, sw2, r32, mask_c, *flags, keep=True, extra=extra)
        _, cache = attn_layer.forward(lw, x, sw2, r32, mask_c, *flags, keep=True, extra=extra)
        dsw, dr = cp.zeros((B, n), dtype=cp.float32), cp.zeros((B, n, 3), dtype=cp.float32)
        return lambda: attn_layer.backward(lw, cache, dout, sw2, r32, mask_c, *flags, dsw, dr, extra=extra)

    res = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "centres": B, "n": n,
           "nnei": args.nnei, "E": E, "H": H, "kernels": {}}  # fmt: skip
    for kind, label in (("fwd0", "forward alone"), ("fwd1", "forward keeping"), ("bwd", "backward")):
        keep = kind != "fwd0"
        defs = tuple(attn_layer._defines(n, E, H, True, True, True, p.nnei, keep=keep).items())
        plain = _time(cp, run(kind, ()), args.reps)
        fn = run(kind, marks)
        marked = _time(cp, fn, args.reps)
        fns, caps, mod = attn_layer._module(defs + marks)
        grid = max(caps.values())  # blocks of the largest grid
        if grid > PH_BLOCKS:
            raise SystemExit(f"attn_layer_phases: grid {grid} > PH_BLOCKS {PH_BLOCKS}")
        buf = cp.ndarray((PH_BLOCKS * PH_SLOTS,), dtype=cp.uint64, memptr=mod.get_global("ph_buf"))
        buf[...] = 0
        fn()
        cp.cuda.runtime.deviceSynchronize()
        cyc = cp.asnumpy(buf).reshape(PH_BLOCKS, PH_SLOTS).sum(axis=0).astype(float)
        warps = B * attn_layer.padded_slots(n) // 16
        names = NAMES["bwd" if kind == "bwd" else "fwd"]
        per = {nm: cyc[k] / warps for k, nm in enumerate(names)}
        tot = sum(per.values())
        kf = fns["attn_layer_bwd" if kind == "bwd" else "attn_layer_fwd"]
        res["kernels"][label] = {"us_per_centre": plain / B * 1e6, "us_per_centre_marked": marked / B * 1e6,
                                 "cycles_per_warp_centre": per, "registers": kf.num_regs,
                                 "local_bytes": kf.local_size_bytes}  # fmt: skip
        print(f"\n{label}: {plain / B * 1e6:.4f} us per centre ({marked / B * 1e6:.4f} marked), "
              f"{kf.num_regs} registers, {kf.local_size_bytes} B local; cycles per warp and centre:")  # fmt: skip
        for nm, c in per.items():
            print(f"  {nm:22s} {c:9.0f}  {100 * c / tot:5.1f}%")
        print(f"  {'total':22s} {tot:9.0f}")
    print(f"\n{res['device']}, {B} centres x {n} slots (nnei {args.nnei}), E {E}, H {H}")
    write_results(pathlib.Path(args.out) if args.out else None, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
