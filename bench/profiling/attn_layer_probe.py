"""What keeping a whole attention layer on chip gains: the TF32 whole-layer kernels
(dpsnake.engine.cuda.attn_layer) against the engine's cuBLAS path in mixed + TF32 (TF32 GEMMs and the row
kernels) on one chunk of centres, the same layers and inputs; prints a table and writes JSON.

    python3 bench/profiling/attn_layer_probe.py [--centres 4608] [--n 88] [--nnei 120] [--e 100] [--h 128]
        [--layers 2] [--reps 9] [--out F.json]

Layers: random weights of DeePMD-kit's se_atten_v2 example shape (smooth, dotr, normalize, bias), inputs
as a fcc CuNi chunk has them (78-88 of n slots filled per centre, switch 1 -> 0 along the slots). Times are
median CUDA-event times per call over the chunk, in us per centre (= per atom) and layer:
  engine fwd keep  -- attention_forward as a force call runs it (keeps the cache backward reads), cuBLAS path
  engine fwd       -- the same without the cache
  engine bwd       -- attention_backward from the kept cache
  fused fwd        -- attn_layer.forward, layer after layer, nothing kept
  fused fwd keep   -- the same keeping what attn_layer.backward reads (q, k, v in FP16, norms, LayerNorm's xhat)
  fused bwd        -- attn_layer.backward, layer after layer
  (fused: attn_layer.defines' constants: the forward alone on the deep W rings, a force call's forward on the
   two-stage ring and its backward on none)
  ... deep         -- both kernels of a force call on the deep W rings (WRING 1, WDEEP 1, BRING 1)
  ... nodeep       -- both on the two-stage ring (WDEEP 0, session 32's)
  ... noring       -- both without a ring (WRING 0, BRING 0): each warp streams the weights from L2 itself
  ... bring        -- the backward on the two-stage ring (BRING 1), the forward as shipped
  ... fdeep        -- a force call's forward on the deep rings (WDEEP 1), the backward as shipped
  ... fp32y        -- a force call's kernels keeping q, k, v in FP32 (YH 0, session 33's)
  ... tf32fwd      -- the forward's products on TF32 operands (F16 0, session 35's)
  ... tf32bwd      -- the backward's products on TF32 operands (B16 0)
  ... tf32         -- both (session 35's kernels)
  ... ex2          -- the softmax on ex2.approx (EX2: settings attn_ex2, the engine's default since session 44;
                      "fused" itself runs expf, attn_layer.defines' constant)
  ... xh, pref     -- EX2 and xhat kept in FP16 (XH, attn_xhat16) / the forward's next centre's x toward L2
                      (PREF, attn_prefetch; the default in session 45 only: EX2 alone is); xhpref both
Errors: max |out - out_FP64| / max |out_FP64| (forward) and the same of df/dG, df/dr, df/dsw (backward) of the
fused kernels and the engine's cuBLAS TF32 path; the FP64 reference is the engine's FP64 path. Kernel
resources (registers, local memory = spills) from CuPy.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/: benchutil
from benchutil import write_results  # noqa: E402


def _layers(E: int, H: int, nnei: int, nl: int, seed: int = 0):
    import numpy as np

    from dpsnake.engine.attn.attention import AttentionLayers, AttnLayer

    rng = np.random.default_rng(seed)
    layers = [
        AttnLayer(
            w_in=rng.normal(scale=E**-0.5, size=(E, 3 * H)),
            b_in=rng.normal(scale=0.1, size=3 * H),
            w_out=rng.normal(scale=H**-0.5, size=(H, E)),
            b_out=rng.normal(scale=0.1, size=E),
            gamma=1.0 + 0.2 * rng.normal(size=E),
            beta=0.2 * rng.normal(size=E),
            eps=1e-5,
            dotr=True,
            normalize=True,
            smooth=True,
            scaling=H**-0.5,
        )  # fmt: skip
        for _ in range(nl)
    ]
    return AttentionLayers(layers=layers, nnei=nnei, embed_dim=E, hidden_dim=H, dotr=True, normalize=True,
                           scaling=H**-0.5, smooth=True)  # fmt: skip


def _inputs(cp, B: int, n: int, E: int, seed: int = 1):
    rng = cp.random.default_rng(seed)
    full = rng.integers(n - 10, n + 1, size=(B, 1))
    slot = cp.arange(n)[None, :]
    mask = slot < full
    sw = cp.where(mask, 1.0 - slot / n, 0.0)
    r = rng.standard_normal((B, n, 3))
    r /= cp.linalg.norm(r, axis=-1, keepdims=True)
    r = cp.where(mask[..., None], r, 0.0)
    G = rng.standard_normal((B, n, E))
    return G, mask, r, sw[..., None]


def _time(cp, fn, reps: int) -> float:
    """Median seconds of fn() over reps (after one warm-up call)."""
    fn()
    ts = []
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(cp.cuda.get_elapsed_time(a, b) * 1e-3)
    return statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--centres", type=int, default=4608, help="centres per chunk (the engine's default chunk)")
    ap.add_argument("--n", type=int, default=88, help="neighbour slots run (88 of 120 for fcc CuNi)")
    ap.add_argument("--nnei", type=int, default=120)
    ap.add_argument("--e", type=int, default=100, help="embedding width (last of neuron)")
    ap.add_argument("--h", type=int, default=128, help="attention width (attn)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--variants", nargs="*", default=None, help="the A/B variants to run (default: all)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import cupy as cp
    import numpy as np

    from dpsnake.engine.attn.attention import attention_backward, attention_forward
    from dpsnake.engine.cuda import attn_layer
    from dpsnake.engine.settings import DEFAULT_FAST, EngineContext, EngineSettings

    B, n, E, H, nl = args.centres, args.n, args.e, args.h, args.layers
    why = attn_layer.supported(np.float32, n, H, args.nnei, True, E)
    if why:
        raise SystemExit(f"attn_layer_probe: the kernel does not run this shape: {why}")
    p = _layers(E, H, args.nnei, nl)
    p64, p32 = p.to(cp, np.float64), p.to(cp, np.float32)
    G, mask, r, sw = _inputs(cp, B, n, E)
    G32, r32, sw32 = (cp.ascontiguousarray(a.astype(cp.float32)) for a in (G, r, sw))
    ref, cache64 = attention_forward(p64, G, mask, r, sw)
    dG = cp.random.default_rng(2).standard_normal(ref.shape, dtype=cp.float32)
    ref_b = attention_backward(p64, cache64, dG.astype(cp.float64))
    del cache64
    blas = EngineContext.of(EngineSettings(tf32=True, fast=DEFAULT_FAST - {"attn_layer"}))

    def engine(keep):
        with blas.tf32(cp, np.float32):
            return attention_forward(p32, G32, mask, r32, sw32, keep=keep, ctx=blas)

    out_tf32, cache = engine(True)

    def engine_bwd():
        with blas.tf32(cp, np.float32):
            return attention_backward(p32, cache, dG)

    lws = [attn_layer.LayerWeights.of(lay, cp) for lay in p32.layers]
    sw2, mask_c = cp.ascontiguousarray(sw32.reshape(B, n)), cp.ascontiguousarray(mask)

    flags = (p.scaling, True, True, True, p.nnei)

    def fused(keep=False, extra=()):
        x, caches = G32, []
        for lw in lws:
            x = attn_layer.forward(lw, x, sw2, r32, mask_c, *flags, keep=keep, extra=extra)
            if keep:
                x, c = x
                caches.append(c)
        return (x, caches) if keep else x

    out_fused, fcaches = fused(True)
    variants = {"deep": (("WRING", 1), ("WDEEP", 1), ("BRING", 1)),
                "nodeep": (("WRING", 1), ("WDEEP", 0), ("BRING", 1)), "noring": (("WRING", 0), ("BRING", 0)),
                "bring": (("BRING", 1),), "fdeep": (("WDEEP", 1),),
                "fp32y": (("YH", 0),), "tf32fwd": (("F16", 0),), "tf32bwd": (("B16", 0),),
                "tf32": (("F16", 0), ("B16", 0)), "ex2": (("EX2", 1),),
                "xh": (("EX2", 1), ("XH", 1)), "pref": (("EX2", 1), ("PREF", 1)),
                "xhpref": (("EX2", 1), ("XH", 1), ("PREF", 1))}  # fmt: skip
    if args.variants is not None:
        variants = {v: variants[v] for v in args.variants}
    vcaches = {(): fcaches} | {x: fused(True, x)[1] for x in variants.values()}  # the backward reads its build's y

    def fused_bwd(extra=()):
        dsw, dr = cp.zeros((B, n), dtype=cp.float32), cp.zeros((B, n, 3), dtype=cp.float32)
        dx = dG
        for lw, c in zip(reversed(lws), reversed(vcaches[extra])):
            dx = attn_layer.backward(lw, c, dx, sw2, r32, mask_c, *flags, dsw, dr, extra=extra)
        return dx, dr, dsw[..., None]

    def rel(a, b):
        return float(cp.abs(a - b).max()) / float(cp.abs(b).max())

    err = {"fused": rel(out_fused, ref), "engine_tf32": rel(out_tf32, ref)}
    err |= {v: rel(fused(extra=extra), ref) for v, extra in variants.items()}
    bwds = {"fused": fused_bwd(), "engine_tf32": engine_bwd()} | {v: fused_bwd(x) for v, x in variants.items()}
    for label, got in bwds.items():
        for name, g, w in zip(("dG", "dr", "dsw"), got, ref_b):
            err[f"{label}_{name}"] = rel(g, w)
    t = {
        "engine_fwd_keep": _time(cp, lambda: engine(True), args.reps),
        "engine_fwd": _time(cp, lambda: engine(False), args.reps),
        "engine_bwd": _time(cp, engine_bwd, args.reps),
        "fused_fwd": _time(cp, fused, args.reps),
        "fused_fwd_keep": _time(cp, lambda: fused(True), args.reps),
        "fused_bwd": _time(cp, fused_bwd, args.reps),
    }
    for v, x in variants.items():
        t[f"{v}_fwd"] = _time(cp, lambda x=x: fused(extra=x), args.reps)
        t[f"{v}_fwd_keep"] = _time(cp, lambda x=x: fused(True, x), args.reps)
        t[f"{v}_bwd"] = _time(cp, lambda x=x: fused_bwd(x), args.reps)
    us = {k: v / B / nl * 1e6 for k, v in t.items()}  # per centre and layer
    flop = 2 * (n * E * 3 * H + 2 * n * n * H + n * H * E)  # per centre and layer, forward
    defs = attn_layer._defines(n, E, H, True, True, True, p.nnei)
    fns = attn_layer._module(tuple(defs.items()))[0]
    alone = attn_layer._module(tuple(attn_layer._defines(n, E, H, True, True, True, p.nnei, keep=False).items()))[0]
    fns = fns | {"attn_layer_fwd_alone": alone["attn_layer_fwd"]}
    res = {
        "device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
        "centres": B, "n": n, "nnei": args.nnei, "E": E, "H": H, "layers": nl,
        "us_per_centre_layer": us, "seconds_per_call": t,
        "fused_tflops": flop * B * nl / t["fused_fwd"] / 1e12,
        "engine_fwd_keep_tflops": flop * B * nl / t["engine_fwd_keep"] / 1e12,
        "engine_over_fused_fwd_bwd": (t["engine_fwd_keep"] + t["engine_bwd"]) / (t["fused_fwd_keep"] + t["fused_bwd"]),
        "rel_err_vs_fp64": err,
        "kernel": {k: {"num_regs": f.num_regs, "local_size_bytes": f.local_size_bytes} for k, f in fns.items()}
        | {"defines": defs, "smem_bytes": [attn_layer.smem_bytes(defs["N"], H, bwd, f16=defs["B16" if bwd else "F16"])
                                                 for bwd in (False, True)]},  # fmt: skip
    }  # fmt: skip
    print(f"{res['device']}: {B} centres x {n} slots (nnei {args.nnei}), E {E}, H {H}, {nl} layers; "
          f"us per centre and layer (median of {args.reps})")  # fmt: skip
    print(f"{'':18s} {'us':>8s} {'fwd TFLOP/s':>11s}")
    for k in t:
        tf = flop / (us[k] * 1e-6) / 1e12 if "fwd" in k else float("nan")
        print(f"{k:18s} {us[k]:8.4f} {tf:11.1f}")
    print("rel. errors vs FP64: " + ", ".join(f"{k} {v:.1e}" for k, v in err.items()))
    print(f"engine / fused: forward {us['engine_fwd_keep'] / us['fused_fwd_keep']:.2f}x, backward "
          f"{us['engine_bwd'] / us['fused_bwd']:.2f}x, both {res['engine_over_fused_fwd_bwd']:.2f}x; kernels: "
          f"{fns['attn_layer_fwd'].num_regs} / {fns['attn_layer_bwd'].num_regs} registers, "
          f"{fns['attn_layer_fwd'].local_size_bytes} / {fns['attn_layer_bwd'].local_size_bytes} bytes local "
          f"(spills), {res['kernel']['smem_bytes']} bytes shared (dynamic)")  # fmt: skip
    write_results(pathlib.Path(args.out) if args.out else None, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
