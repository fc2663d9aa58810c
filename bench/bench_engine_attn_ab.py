"""A/B of the se_atten engine's GPU options on one force call (issue 21): an untrained se_atten_v2 FP64
model of DeePMD-kit's example size (bench_explore_deepmd.SE_ATTEN_V2, attn_layer from the command line) on
W walkers x 108 fcc CuNi atoms (a = 3.634 A, 0.05 A noise, half Ni), median of ``--reps`` calls, one
process. Variants (docs/benchmarks.md, "Left-out empty slots and cuBLAS op flags"):

    base        every slot (settings compact=False), products with transposes by cupy.matmul
    bmm         every slot, cuda/bmm.py (cuBLAS op flags)
    trim        the default: left-out empty slots + cuda/bmm.py
    core        trim with the fused FP64 attention core (family "attn_core", cuda/attn_core.py)
    trim_nobmm  left-out slots, cupy.matmul
    array       the default without the attention's row kernels (family "attn" off)
    mixed       the default in mixed precision (FP32 nets and attention, FP64 geometry)
    tf32        mixed with settings tf32 (the FP32 GEMMs on TF32 tensor cores), the attention through cuBLAS
                (family "attn_layer" off)
    layer       the same with each attention layer as one TF32 kernel per direction (family "attn_layer",
                cuda/attn_layer.py; the default with tf32)
    layer_nonet layer with the strip-mode geometric net through cuBLAS and the gate kernels (settings fused "off";
                the default: net and gate as two kernels, cuda/strip_net.py)
    layer_noenv layer with the env matrix and its chain rule as array code (family "env" off; the default: one
                kernel each way, attn/env.py)
    layer_tc    layer with the strip-mode net and gate on TF32 tensor cores (settings strip_tc, cuda/strip_net_tc.py)
    layer_chunk layer in one chunk per centre type (settings chunk_mb 1e5; the default sizes chunks from a third of
                the free device memory and the array code's work memory per centre)

The force / energy differences of mixed and tf32 to base (FP64) are their accuracy.

Prints one JSON line (us per atom, CuPy pool MB per atom, the slot counts run, centres per chunk, max |F - F_base|,
max relative |E - E_base|) and writes it to ``--out``/bench_engine_attn_ab_l{L}_w{W}.json; ``--profile [VARIANT]``
adds the torch profiler table of one call of VARIANT (default trim); ``--deepmd`` times DeePMD-kit's ``DeepPot.eval`` of the
same model (``dp convert-backend`` to .pth) on the same batch in the same process (``deepmd``, us per atom;
``deepmd_force_diff``: max |F - F_trim|; each walker's own types through ``mixed_type``); ``--deepmd-fp32``
the same for the model built in float32 (``deepmd_fp32``, timing only). Needs CuPy,
DeePMD-kit (to make the model) and ase.

    python3 bench/bench_engine_attn_ab.py --out /tmp/ab --attn-layer 2 --walkers 256
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from benchutil import timeit  # noqa: E402
from explore_models import SE_ATTEN_V2  # noqa: E402


def make_model(path: pathlib.Path, attn_layer: int, precision: str = "float64") -> None:
    """An untrained se_atten_v2 of DeePMD-kit's example size as a .dp file (weights from seed 1), its
    descriptor and fitting net in ``precision``."""
    from deepmd.dpmodel.utils.serialization import save_dp_model
    from deepmd.pt.model.model import get_model

    mp = copy.deepcopy(SE_ATTEN_V2)
    mp["type_map"] = ["Cu", "Ni"]
    mp["descriptor"].update(attn_layer=attn_layer, seed=1, precision=precision)
    mp["fitting_net"].update(seed=1, precision=precision)
    m = get_model(copy.deepcopy(mp))
    save_dp_model(str(path), {"backend": "PyTorch", "model": m.serialize(), "model_def_script": mp})


def batch(xp, walkers: int):
    """(coords, atype, system, cells, pbc) of ``walkers`` 108-atom fcc CuNi cells, on ``xp``."""
    from ase.build import bulk

    a = bulk("Cu", "fcc", a=3.634, cubic=True).repeat((3, 3, 3))
    rng = np.random.default_rng(0)
    n = len(a)
    coords = [a.positions + rng.normal(scale=0.05, size=a.positions.shape) for _ in range(walkers)]
    atype = []
    for _ in range(walkers):
        t = np.zeros(n, int)
        t[rng.permutation(n)[: n // 2]] = 1
        atype.append(t)
    system = np.repeat(np.arange(walkers), n)
    cells = np.stack([a.cell.array] * walkers)
    host = (np.concatenate(coords), np.concatenate(atype), system, cells, np.ones((walkers, 3), bool))
    return tuple(xp.asarray(x) for x in host)


def deepmd_case(path: pathlib.Path, data, ours, reps: int, key: str = "deepmd") -> dict:
    """DeePMD-kit's DeepPot.eval (PyTorch backend) of the model at ``path`` on the batch ``data`` (every
    walker with its own types: mixed_type): ``key`` us per atom, and the largest force difference to
    ``ours`` (unless None)."""
    import subprocess

    import torch
    from deepmd.infer import DeepPot

    pth = path.with_suffix(".pth")
    cmd = [sys.executable, "-m", "deepmd", "convert-backend", str(path), str(pth)]
    subprocess.run(cmd, check=True, capture_output=True)
    coords, atype, _, cells, _ = (x.get() for x in data)
    W = cells.shape[0]
    dp, box = DeepPot(str(pth)), {}
    args = (coords.reshape(W, -1), cells.reshape(W, 9), atype.reshape(W, -1))

    def call():
        box["r"] = dp.eval(*args, mixed_type=True)

    res = {key: 1e6 * timeit(call, torch.cuda.synchronize, n=reps) / coords.shape[0]}
    if ours is not None:
        f = box["r"][1].reshape(-1, 3)
        res[key + "_force_diff"] = float(abs(f - ours["force"].get()).max())
        e = ours["energy"].get().ravel()
        res[key + "_energy_rel_diff"] = float(abs(box["r"][0].ravel() - e).max() / abs(e).max())
    return res


def _matmul_bmm(xp):
    """cuda/bmm.py's contract on cupy.matmul (transposed operands copied): the code before it."""

    def mm(a, b, ta=False, tb=False, alpha=1.0, out=None, beta=0.0):
        r = xp.matmul(a.swapaxes(1, 2) if ta else a, b.swapaxes(1, 2) if tb else b)
        if alpha != 1.0:
            r *= alpha
        if out is None:
            return r
        if beta:
            out *= beta
            out += r
        else:
            out[...] = r
        return out

    return mm


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/bench_engine_attn_ab")
    ap.add_argument("--attn-layer", type=int, default=2)
    ap.add_argument("--walkers", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--profile",
        nargs="?",
        const="trim",
        default=None,
        metavar="VARIANT",
        help="torch profiler table of one call of VARIANT (default trim)",
    )
    ap.add_argument("--deepmd", action="store_true", help="also DeePMD-kit's DeepPot.eval on the same batch")
    ap.add_argument(
        "--deepmd-fp32",
        action="store_true",
        help="also DeePMD-kit's DeepPot.eval of the same model built in float32 (timing only; the reference "
        "for the mixed and tf32 variants, as the se_e2_a table's DeePMD-kit FP32 column)",
    )
    ap.add_argument("--variants", nargs="+", default=None, help="run only these (default: all; base is the reference)")
    args = ap.parse_args()
    import cupy as xp

    from dpsnake.engine.attn import attention as att
    from dpsnake.engine.dispatch import make_ensemble
    from dpsnake.engine.settings import DEFAULT_FAST, FAMILIES, EngineSettings

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"m{args.attn_layer}.dp"
    make_model(path, args.attn_layer)
    data = batch(xp, args.walkers)
    N = int(data[0].shape[0])
    sync = xp.cuda.Stream.null.synchronize
    pool = xp.get_default_memory_pool()
    init, mm, no_bmm = att._Rows.__init__, _matmul_bmm(xp), [False]

    def rows_init(self, *a, **k):  # the bmm-off variants swap cupy.matmul back in
        init(self, *a, **k)
        if no_bmm[0]:
            self.bmm = mm

    att._Rows.__init__ = rows_init
    # (label, EngineSettings, cupy.matmul instead of cuda/bmm.py, precision)
    variants = [
        ("base", {"compact": False}, True, "double"),
        ("bmm", {"compact": False}, False, "double"),
        ("trim", {}, False, "double"),
        ("core", {"fast": frozenset(FAMILIES)}, False, "double"),
        ("trim_nobmm", {}, True, "double"),
        ("array", {"fast": DEFAULT_FAST - {"attn"}}, False, "double"),
        ("mixed", {}, False, "mixed"),
        ("tf32", {"tf32": True, "fast": DEFAULT_FAST - {"attn_layer"}}, False, "mixed"),
        ("layer", {"tf32": True}, False, "mixed"),
        ("layer_nonet", {"tf32": True, "fused": "off"}, False, "mixed"),
        ("layer_noenv", {"tf32": True, "fast": DEFAULT_FAST - {"env"}}, False, "mixed"),
        ("layer_tc", {"tf32": True, "strip_tc": True}, False, "mixed"),
        # one chunk per centre type: the default sizing takes the array code's work memory per centre (3.8 MB
        # for this model), far above the layer kernels' (session 38's profile: 12 launches per layer, one call)
        ("layer_chunk", {"tf32": True, "chunk_mb": 1e5}, False, "mixed"),
        # compressed (explore.compress): Gs from the table (cuda/strip_tab.py), min_nbor_dist 2.0 A
        ("layer_tab", {"tf32": True, "compress": {"min_nbor_dist": 2.0}}, False, "mixed"),
        # centres in the layout's order, not in the order of the slots they filled last call (fill_order, the
        # default since session 43: called layer_fill / layer_tab_fill then, against layer / layer_tab)
        ("layer_nofill", {"tf32": True, "fill_order": False}, False, "mixed"),
        ("layer_tab_nofill", {"tf32": True, "fill_order": False, "compress": {"min_nbor_dist": 2.0}}, False, "mixed"),
        # the layer kernels' softmax on expf, not ex2.approx (attn_ex2, the default since session 44: measured then
        # as layer_ex2 / layer_tab_ex2 against layer / layer_tab)
        ("layer_noex2", {"tf32": True, "attn_ex2": False}, False, "mixed"),
        ("layer_tab_noex2", {"tf32": True, "attn_ex2": False, "compress": {"min_nbor_dist": 2.0}}, False, "mixed"),
        # the LayerNorm's xhat kept in FP16 (attn_xhat16, off)
        ("layer_xh", {"tf32": True, "attn_xhat16": True}, False, "mixed"),
        ("layer_tab_xh", {"tf32": True, "attn_xhat16": True, "compress": {"min_nbor_dist": 2.0}}, False, "mixed"),
        # the forward's prefetch of the next centre's x toward L2 (attn_prefetch, off: the default in session 45 only,
        # measured then as layer_nopref / layer_tab_nopref against layer / layer_tab; layer_pref / layer_tab_pref of
        # session 45's call 1 prefetched in the backward too, which was removed)
        ("layer_pref", {"tf32": True, "attn_prefetch": True}, False, "mixed"),
        ("layer_tab_pref", {"tf32": True, "attn_prefetch": True, "compress": {"min_nbor_dist": 2.0}}, False, "mixed"),
    ]
    variants_all = list(variants)

    def ensemble(kw, prec):
        kw = dict(kw)
        cmp = kw.pop("compress", None)
        return make_ensemble([str(path)], precision=prec, xp=xp, compress=cmp, settings=EngineSettings(**kw))

    if args.variants:
        variants = [v for v in variants if v[0] in set(args.variants) | {"base"}]
    res, outs = {"atoms": N, "attn_layer": args.attn_layer, "walkers": args.walkers}, {}
    for label, kw, nb, prec in variants:
        no_bmm[0] = nb
        ens = ensemble(kw, prec)
        box = {}

        def call(ens=ens, box=box):
            box["r"] = ens.evaluate(*data)

        res[label] = 1e6 * timeit(call, sync, n=args.reps) / N
        res[label + "_pool_MB_per_atom"] = pool.total_bytes() / N / 1e6
        res[label + "_slots"] = sorted({s for _, s in getattr(ens, "last_chunks", [])})  # the last call's chunks
        res[label + "_chunks"] = getattr(ens, "last_chunks", [])  # (centres, slots) each
        res[label + "_chunk_atoms"] = ens.chunk_size(xp)
        outs[label] = box["r"]
        pool.free_all_blocks()
        print(label, f"{res[label]:.3f} us/atom", flush=True)
    ref = outs["base"]
    res["base_force_rms"] = float(xp.sqrt((ref["force"] ** 2).mean()))  # the scale of the force diffs
    for label, r in outs.items():
        res[label + "_force_diff"] = float(abs(r["force"] - ref["force"]).max())
        res[label + "_energy_rel_diff"] = float((abs(r["energy"] - ref["energy"]) / abs(ref["energy"])).max())
    if args.deepmd:
        res.update(deepmd_case(path, data, outs.get("trim"), args.reps))
        print("deepmd", f"{res['deepmd']:.3f} us/atom", flush=True)
    if args.deepmd_fp32:
        path32 = out / f"m{args.attn_layer}_fp32.dp"
        make_model(path32, args.attn_layer, "float32")
        res.update(deepmd_case(path32, data, None, args.reps, key="deepmd_fp32"))
        print("deepmd_fp32", f"{res['deepmd_fp32']:.3f} us/atom", flush=True)
    line = json.dumps(res)
    print(line)
    (out / f"bench_engine_attn_ab_l{args.attn_layer}_w{args.walkers}.json").write_text(line + "\n")
    if args.profile:
        import torch

        label, kw, no_bmm[0], prec = next(v for v in variants_all if v[0] == args.profile)
        ens = ensemble(kw, prec)
        ens.evaluate(*data)
        sync()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            ens.evaluate(*data)
            sync()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))


if __name__ == "__main__":
    main()
