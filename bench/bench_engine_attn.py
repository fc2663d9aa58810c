"""Per-size engine benchmark for se_atten_v2 (issue 21), side by side with DeePMD-kit's PyTorch
``DeepPot.eval`` in the same run: us per atom per force call and peak GPU memory per atom.

Models: MODELS/{KIND}_s{0..3}/ of ``bench_explore_deepmd.py data`` (trained and frozen by DeePMD-kit:
model.pth, model.dp made from it by ``dp convert-backend``, model_c.pth by ``dp --pt compress`` where
DeePMD-kit can compress: attn_layer 0). KINDS: se_atten_v2 (DeePMD-kit's example size: sel 120, neuron
[25,50,100], axis 16, attn 128, attn_layer 2) and se_atten_v2_l0 (the same with attn_layer 0).

Cases (per kind): one fcc Cu system (a = 3.634 A; CuNi with random half Ni if the models know Ni) of
each --sizes (rounded to whole cubic cells: 6,912 / 55,296 / 1,000,188 atoms); a batch of 256 x 108
atoms in one call; the 4-model deviation on that batch. Codes: ``dpsnake`` (the built-in engine,
FP64 "double" and "mixed" = FP32 nets on the FP64 model), ``dpsnake-tab`` (--compress: tabulated
embedding net; "n/a" while the engine refuses it), ``deepmd-pt`` (DeepPot(model.pth).eval, FP64),
``deepmd-pt-c`` (DeepPot(model_c.pth).eval, compressed). A case that runs out of memory is "OOM";
one whose estimated time (from the previous size) exceeds the time left (--budget) is "skipped (time)".
Also an analytic FLOP count per atom per force call (forward + the backward forces need: :func:`flops`)
and the time it needs at the H200's FP64 peak (67 TFLOP/s tensor cores, 34 without). Prints Markdown
tables and writes JSON after every case (default bench/results/engine_attn_<device>.json; --json FILE elsewhere, --json "" nowhere).

    python bench/bench_engine_attn.py MODELS [--kinds se_atten_v2 se_atten_v2_l0] [--sizes 6912 55296 1000000]
        [--batch 256x108] [--deepmd] [--compress 2.0] [--precisions double mixed] [--budget 300] [--device gpu|cpu]

CPU smoke test (NumPy; models from bench_explore_deepmd.py data --frames 4 --steps 3 + dp train/freeze):
    python bench/bench_engine_attn.py /tmp/xv --sizes 108 --batch 4x108 --deepmd --device cpu --json ""
On CPUs (docs/benchmarks.md "The engine on CPUs": bench/results/engine_attn_cpu.json), both codes on the
same threads (OMP_NUM_THREADS) and with the engine's allocator setting (EngineSettings keep_heap):
    OMP_NUM_THREADS=2 python bench/bench_engine_attn.py MODELS --device cpu --deepmd --compress 2.0
        --sizes 864 --batch 8x108 --precisions double mixed
On the device machine: bench/bench_engine_attn_gpu.sh (installs, trains, compresses, runs this).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from benchutil import device_tag, results_path, timeit, write_results

from dpsnake.fsio import write_json_atomic

RESULTS: list[dict] = []
OUT: list = [None]  # the results file (written after every case)
T_END = [float("inf")]
T0 = time.perf_counter()
PEAK = {"tensor": 67e12, "plain": 34e12}  # H200 FP64 FLOP/s (tensor cores / CUDA cores)


def emit(**kw):
    if "bench" in kw:
        kw["t_s"] = round(time.perf_counter() - T0, 1)  # seconds since the start (where the time went)
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)
    if OUT[0] is not None and "bench" in kw:  # after every case, quietly (a killed run keeps its cases)
        write_json_atomic(OUT[0], RESULTS)


def left() -> float:
    return T_END[0] - time.perf_counter()


def size_of(natoms: int) -> int:
    """Atoms of the fcc system of about ``natoms`` atoms (whole cubic cells of 4 atoms)."""
    return 4 * max(1, round((natoms / 4) ** (1 / 3))) ** 3


def skip_all(args, tags):
    """Past the time budget: every case of this code skipped at once (nothing loaded or built)."""
    if left() > 0:
        return False
    nf, nat = args.batch
    for bench, n in [("batch", nf * nat), ("model_devi", nf * nat)] + [("single", size_of(x)) for x in args.sizes]:
        emit(**tags, bench=bench, natoms=n, error="skipped (time)")
    return True


@functools.lru_cache(maxsize=8)
def _cu_cached(natoms: int, type_map: tuple, seed: int):
    return _cu_system(natoms, list(type_map), seed)


def cu_system(natoms: int, type_map, seed=0):
    return _cu_cached(natoms, tuple(type_map), seed)


def _cu_system(natoms: int, type_map, seed=0):
    """fcc Cu of about ``natoms`` atoms (whole cubic cells); random half Ni if the models know Ni."""
    from ase.build import bulk

    n = max(1, round((natoms / 4) ** (1 / 3)))
    a = bulk("Cu", "fcc", a=3.634, cubic=True).repeat((n, n, n))
    t = np.full(len(a), type_map.index("Cu") if "Cu" in type_map else 0)
    if "Ni" in type_map:
        rng = np.random.default_rng(seed)
        t[rng.permutation(len(a))[: len(a) // 2]] = type_map.index("Ni")
    return a, t


def batch_frames(nf, nat, type_map, seed=0):
    a, t = cu_system(nat, type_map, seed)
    rng = np.random.default_rng(seed)
    c = a.positions[None] + 0.05 * rng.standard_normal((nf, len(a), 3))
    return c, np.tile(a.cell.array.reshape(1, 9), (nf, 1)), t


def err_tag(err) -> str:
    s = repr(err)
    return "OOM" if "out of memory" in s.lower() or "OutOfMemory" in s or isinstance(err, MemoryError) else s[:300]


class Mem:
    """Peak GPU memory of one case: the CuPy pool's size after a case started from an empty pool
    (the pool keeps its blocks, so that is its high-water mark) + torch's max allocated."""

    def __init__(self, cp, torch):
        self.cp, self.torch = cp, torch

    def reset(self):
        if self.cp is not None:
            self.cp.get_default_memory_pool().free_all_blocks()
        if self.torch is not None:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        b = 0 if self.cp is None else int(self.cp.get_default_memory_pool().total_bytes())
        return b + (0 if self.torch is None else int(self.torch.cuda.max_memory_allocated()))


def run_case(mem, sync, fn, natoms, n, warm, est_s=None, **tags):
    """Time ``fn`` (one force call on ``natoms`` atoms in all) and emit the row."""
    if left() <= 0 or (est_s is not None and est_s * (n + warm) > left()):
        emit(**tags, natoms=natoms, error="skipped (time)", est_s_per_call=est_s)
        return None
    try:
        mem.reset()
        s = timeit(fn, sync, n=n, warm=warm, budget=20.0)
        peak = mem.peak()
        emit(
            **tags,
            natoms=natoms,
            sec_per_call=s,
            us_per_atom=s / natoms * 1e6,
            peak_gpu_bytes=peak,
            kib_per_atom=peak / natoms / 1024,
        )
        return s / natoms
    except Exception as err:  # report and go on (out of memory, a refused option)
        emit(**tags, natoms=natoms, error=err_tag(err))
        mem.reset()
        return None


def reps(natoms):
    return (5, 2) if natoms < 300_000 else (1, 1)


def ours_cases(kind, files, xp, mem, sync, args, code, prec, compress):
    from dpsnake.engine.deeppot import frames_to_flat
    from dpsnake.engine.dispatch import make_ensemble
    from dpsnake.engine.model_devi import deviation_columns

    tags = dict(kind=kind, code=code, prec=prec)
    if skip_all(args, tags):
        return
    try:
        ens = make_ensemble([files[0]], precision=prec, compress=compress)
        ens4 = make_ensemble(files, precision=prec, compress=compress)
    except Exception as err:  # e.g. compress refused: UserError
        nf, nat = args.batch
        cases = [("batch", nf * nat), ("model_devi", nf * nat)] + [("single", size_of(n)) for n in args.sizes]
        for bench, n in cases:
            emit(**tags, bench=bench, natoms=n, error=f"n/a: {str(err)[:200]}")
        return
    tm = ens.type_map
    nf, nat = args.batch
    c, b, t = batch_frames(nf, nat, tm)
    flat = frames_to_flat(xp, xp.asarray(c), xp.asarray(b), xp.asarray(t))[:5]
    ntot = c.shape[0] * c.shape[1]
    lay = ens.layout(*flat[1:3], flat[4])  # made once, as the explorer's provider does
    run_case(mem, sync, lambda: ens.evaluate(*flat, layout=lay), ntot, 5, 2, bench="batch", nframes=nf, **tags)
    natoms = xp.full(nf, c.shape[1])
    lay4 = ens4.layout(*flat[1:3], flat[4])

    def devi():
        return deviation_columns(ens4.evaluate(*flat, layout=lay4), flat[2], natoms)

    run_case(mem, sync, devi, ntot, 3, 1, bench="model_devi", nframes=nf, nmodels=len(files), **tags)
    ens4 = flat = None
    per_atom = None
    for size in args.sizes:
        a, t = cu_system(size, tm)
        n = len(a)
        pos, at = xp.asarray(a.positions), xp.asarray(t)
        system, cell, pbc = xp.zeros(n, dtype=xp.int64), xp.asarray(a.cell.array[None]), xp.ones(1, dtype=bool)
        k, w = reps(n)
        est = None if per_atom is None else per_atom * n
        lay = ens.layout(at, system, pbc)
        r = run_case(
            mem,
            sync,
            lambda: ens.evaluate(pos, at, system, cell, pbc, layout=lay),
            n,
            k,
            w,
            est,
            bench="single",
            **tags,
        )
        per_atom = r if r is not None else per_atom
        pos = at = system = cell = lay = None
    ens = None
    mem.reset()


def deepmd_cases(kind, files, mem, sync, args, code):
    from deepmd.infer import DeepPot
    from deepmd.infer.model_devi import calc_model_devi

    tags = dict(kind=kind, code=code, prec="double")
    if skip_all(args, tags):
        return
    if not all(pathlib.Path(f).is_file() for f in files):
        emit(**tags, bench="batch", error=f"n/a: no {pathlib.Path(files[0]).name}")
        return
    dp = DeepPot(files[0])
    tm = dp.get_type_map()
    nf, nat = args.batch
    c, b, t = batch_frames(nf, nat, tm)
    ntot = c.shape[0] * c.shape[1]
    cf = c.reshape(nf, -1)
    run_case(mem, sync, lambda: dp.eval(cf, b, t), ntot, 5, 2, bench="batch", nframes=nf, **tags)
    dps = [DeepPot(f) for f in files]
    run_case(mem, sync, lambda: calc_model_devi(cf, b, t, dps), ntot, 3, 1, bench="model_devi", nframes=nf, **tags)
    dps = None
    per_atom = None
    for size in args.sizes:
        a, t = cu_system(size, tm)
        n = len(a)
        cs, bs = a.positions.reshape(1, -1), a.cell.array.reshape(1, -1)
        k, w = reps(n)
        est = None if per_atom is None else per_atom * n
        if n > args.deepmd_max_atoms:
            emit(**tags, bench="single", natoms=n, error=f"skipped (> --deepmd-max-atoms {args.deepmd_max_atoms})")
            continue
        r = run_case(mem, sync, lambda: dp.eval(cs, bs, t), n, k, w, est, bench="single", **tags)
        per_atom = r if r is not None else per_atom
    dp = None
    mem.reset()


def agreement(kind, files, xp, args, compress):
    """Forces of ours (FP64; and tabulated) vs DeePMD-kit's (model.pth; model_c.pth) on 4 frames."""
    from deepmd.infer import DeepPot

    from dpsnake.engine.deeppot import frames_to_flat
    from dpsnake.engine.dispatch import make_ensemble
    from dpsnake.engine.xp import to_numpy

    pairs = [("dpsnake", None, "model.pth")]
    if compress is not None:
        pairs.append(("dpsnake-tab", compress, "model_c.pth"))
    for code, cmp, ref in pairs:
        rfile = pathlib.Path(files[0]).with_name(ref)
        if not rfile.is_file():
            continue
        try:
            ens = make_ensemble([files[0]], precision="double", compress=cmp)
            dp = DeepPot(str(rfile))
            c, b, t = batch_frames(4, args.batch[1], ens.type_map, seed=3)
            flat = frames_to_flat(xp, xp.asarray(c), xp.asarray(b), xp.asarray(t))[:5]
            f = to_numpy(ens.evaluate(*flat)["force"][0])
            fr = dp.eval(c.reshape(4, -1), b, t)[1].reshape(f.shape)
            emit(check="force_vs_deepmd", kind=kind, code=code, ref=ref, max_abs=float(np.abs(f - fr).max()))
        except Exception as err:
            emit(check="force_vs_deepmd", kind=kind, code=code, ref=ref, error=f"n/a: {str(err)[:200]}")


def flops(model, slots: int | None = None) -> dict:
    """Analytic FLOPs per atom of one force call (energy + its gradient) of an se_atten(_v2) model over
    ``slots`` neighbour slots (default sel; the engine runs fewer where the chunk's are empty), multiply-add
    = 2. Per part ``{name: (forward, backward)}``. Backward counts what forces need, no more: a product
    with a fixed weight matrix needs only the gradient of its input (one GEMM of the forward's size), a
    product of two activations (q k^T, A v) the gradients of both (two), the smooth softmax recomputes
    q k^T (one more: attention.py keeps no logits); bias / tanh / softmax / LayerNorm chains about as
    many FLOPs backward as forward."""
    nn, m1 = slots or model.nnei, model.neuron[-1]

    def net(n):  # (GEMM, elementwise) of a forward pass
        return sum(2 * lay.nin * lay.nout for lay in n.layers), sum(10 * lay.nout for lay in n.layers)

    def fixed(gemm, elem):  # fixed weights: backward = one GEMM (dX) + the elementwise chain
        return gemm + elem, gemm + elem

    eg, ee = net(model.embedding)
    f = {"embedding": fixed(nn * eg, nn * ee)}
    f["strip_gate"] = (3 * nn * m1, 4 * nn * m1) if model.tebd_mode == "strip" else (0, 0)
    att = model.attention
    if att is not None and att.layers:
        h, nl = att.hidden_dim, len(att.layers)
        proj = 2 * nn * m1 * 3 * h + 2 * nn * h * m1  # in_proj (q, k, v), out_proj: fixed weights
        pair = 2 * nn * nn * h  # one of q k^T, A v: activations on both sides
        elem = 8 * nn * nn + 10 * nn * m1  # softmax, dotr gating, smooth weights; layer norm, residual
        recompute = pair if att.smooth else 0
        f["attention"] = (nl * (proj + 2 * pair + elem), nl * (proj + 4 * pair + recompute + elem))
    env = 2 * 4 * nn * m1 + 2 * 4 * m1 * model.axis_neuron  # gr = Rn^T G / nnei, D = gr^T gr[:, :axis]
    f["env_contract"] = (env, 2 * env)  # activations on both sides: two gradient products each
    fg, fe = net(model.fittings[0])
    f["fitting"] = fixed(fg, fe)
    return f


def flops_rows(kind, model, compress: bool, slots: int | None = None):
    f = flops(model, slots)
    call = sum(a + b for a, b in f.values())
    out = {
        "kind": kind,
        "flop_per_atom": {k: {"forward": a, "backward": b} for k, (a, b) in f.items()},
        "force_call_flop_per_atom": call,
        "slots": slots or model.nnei,
    }
    if compress:  # the embedding net as a table: 5th-order polynomial value + derivative per output
        nn = slots or model.nnei
        out["force_call_flop_per_atom_tab"] = call - sum(f["embedding"]) + 2 * nn * model.neuron[-1] * 12
    for k, v in PEAK.items():
        out[f"us_per_atom_at_{k}_peak"] = call / v * 1e6
    emit(flops=True, **out)
    return out


def table(flop_rows):
    rows = {}
    for r in RESULTS:
        if "bench" not in r or "code" not in r:
            continue
        key = (r["kind"], r["bench"], r.get("natoms"))
        if "us_per_atom" in r:
            v = (
                f"{r['us_per_atom']:.3f} ({r['kib_per_atom']:.0f})"
                if r.get("kib_per_atom")
                else f"{r['us_per_atom']:.3f}"
            )
        else:
            v = r.get("error", "err")
            v = "n/a" if v.startswith("n/a") else v[:40]
        rows.setdefault(key, {})[(r["code"], r["prec"])] = v
    cols = [
        ("dpsnake", "double"),
        ("dpsnake", "mixed"),
        ("dpsnake-tab", "double"),
        ("deepmd-pt", "double"),
        ("deepmd-pt-c", "double"),
    ]
    print("\nus per atom per force call (peak GPU KiB per atom)\n")
    head = " | ".join(f"{c} {p}" for c, p in cols)
    print(f"| model | case | atoms | {head} | DeePMD-kit / ours FP64 | compressed / ours tab |")
    print("|---|---|---|" + "---|" * (len(cols) + 2))
    for (kind, bench, nat), v in rows.items():

        def num(col):
            try:
                return float(v.get(col, "").split()[0])
            except (ValueError, IndexError):
                return None

        ours, ref = num(("dpsnake", "double")), num(("deepmd-pt", "double"))
        sp = f"{ref / ours:.2f}x" if ours and ref else "-"
        tab, refc = num(("dpsnake-tab", "double")), num(("deepmd-pt-c", "double"))
        spc = f"{refc / tab:.2f}x" if tab and refc else "-"
        print(f"| {kind} | {bench} | {nat:,} | " + " | ".join(v.get(c, "-") for c in cols) + f" | {sp} | {spc} |")
    flop_table(flop_rows)


def flop_table(flop_rows):
    print("\nanalytic MFLOP per atom per force call (forward + backward) and the FP64 lower bound on an H200\n")
    print(
        "| model | slots | embedding | attention | fitting | other | GFLOP/atom/call | us/atom at 67 TF/s | at 34 TF/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in flop_rows:
        f = {k: (v["forward"] + v["backward"]) / 1e6 for k, v in r["flop_per_atom"].items()}
        other = f["strip_gate"] + f["env_contract"]
        print(
            f"| {r['kind']} | {r['slots']} | {f['embedding']:.2f} | {f.get('attention', 0):.2f} | {f['fitting']:.2f} | "
            f"{other:.2f} | {r['force_call_flop_per_atom'] / 1e9:.4f} | "
            f"{r['us_per_atom_at_tensor_peak']:.3f} | {r['us_per_atom_at_plain_peak']:.3f} |"
        )


def convert(pth: pathlib.Path, dp: pathlib.Path):
    subprocess.run(
        [sys.executable, "-m", "deepmd", "convert-backend", str(pth), str(dp)], check=True, capture_output=True
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", help="folder with KIND_s{0..3}/model.pth (bench_explore_deepmd.py data + dp train)")
    ap.add_argument("--kinds", nargs="+", default=["se_atten_v2", "se_atten_v2_l0"])
    ap.add_argument("--nmodels", type=int, default=4)
    ap.add_argument("--sizes", type=int, nargs="+", default=[6912, 55296, 1000000], help="atoms of the single systems")
    ap.add_argument("--batch", default="256x108", help="FRAMESxATOMS of the batch")
    ap.add_argument("--precisions", nargs="+", default=["double", "mixed"])
    ap.add_argument("--deepmd", action="store_true", help="also DeePMD-kit's DeepPot.eval (model.pth, model_c.pth)")
    ap.add_argument("--deepmd-max-atoms", type=int, default=2_000_000)
    ap.add_argument("--compress", type=float, default=None, metavar="MIN_NBOR_DIST", help="also tabulated (ours)")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds; later cases skipped past it")
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument(
        "--flop-slots",
        type=int,
        default=88,
        help="also the FLOP count over this many slots (the engine's on fcc Cu at rcut 6: 78-82 filled, run as 88)",
    )
    ap.add_argument("--json", default=None, help="results file (default bench/results/engine_attn_<device>.json)")
    args = ap.parse_args()
    T_END[0] = time.perf_counter() + args.budget
    nf, nat = (int(x) for x in args.batch.lower().split("x"))
    args.batch = (nf, nat)
    if args.device == "gpu":
        import cupy as xp

        sync = xp.cuda.Device().synchronize
        name = xp.cuda.runtime.getDeviceProperties(0)["name"]
        device = name.decode() if isinstance(name, bytes) else name
    else:
        from dpsnake.engine.xp import keep_freed_memory

        # the engine sets glibc's allocator at its first NumPy call (EngineSettings keep_heap); set
        # here first, so that DeePMD-kit, in the same process, runs with it in every case too
        xp, sync, device = np, (lambda: None), None
        cpu_info = dict(cpus=os.cpu_count(), threads=os.environ.get("OMP_NUM_THREADS"), keep_heap=keep_freed_memory())
    torch, tsync = None, sync
    if args.deepmd:
        import torch as _torch

        if _torch.cuda.is_available() and args.device == "gpu":
            torch, tsync = _torch, _torch.cuda.synchronize
    mem = Mem(xp if xp is not np else None, torch)  # both pools emptied before each case
    OUT[0] = results_path(args.json, "engine_attn", device_tag(device))
    emit(device=device or "cpu", date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), argv=sys.argv[1:])
    if device is None:
        emit(**cpu_info)
    from dpsnake.engine.attn.model import load_attn_model
    from dpsnake.engine.tabulate import Compression

    compress = Compression(min_nbor_dist=args.compress) if args.compress else None
    root = pathlib.Path(args.models)
    flop_rows, tasks = [], []
    for kind in args.kinds:
        dirs = [root / f"{kind}_s{s}" for s in range(args.nmodels)]
        for d in dirs:
            if not (d / "model.dp").is_file():
                convert(d / "model.pth", d / "model.dp")
        files = [str(d / "model.dp") for d in dirs]
        model = load_attn_model(files[0])
        flop_rows.append(flops_rows(kind, model, compress is not None))
        if args.flop_slots and args.flop_slots < model.nnei:
            flop_rows.append(
                flops_rows(f"{kind} @{args.flop_slots} slots", model, compress is not None, args.flop_slots)
            )
        if args.deepmd:
            agreement(kind, files, xp, args, compress)
        # by priority (the time left may cut the last): ours FP64 vs DeePMD-kit, tabulated vs DeePMD-kit
        # compressed where it can compress, then the others
        pth, pthc = [str(d / "model.pth") for d in dirs], [str(d / "model_c.pth") for d in dirs]
        can_c = all(pathlib.Path(f).is_file() for f in pthc)
        first = [("ours", "dpsnake", "double", None)] + ([("deepmd", "deepmd-pt", pth)] if args.deepmd else [])
        if compress is not None and can_c:
            first += [("ours", "dpsnake-tab", "double", compress)] + ([("deepmd", "deepmd-pt-c", pthc)] * args.deepmd)
        later = [("ours", "dpsnake", p, None) for p in args.precisions if p != "double"]
        if compress is not None and not can_c:
            later.append(("ours", "dpsnake-tab", "double", compress))
        tasks.append([(kind, files, t) for t in first])
        tasks.append([(kind, files, t) for t in later])
    for kind, files, t in [x for k in (0, 1) for group in tasks[k::2] for x in group]:
        if t[0] == "ours":
            ours_cases(kind, files, xp, mem, sync, args, t[1], t[2], t[3])
        else:
            deepmd_cases(kind, t[2], mem, tsync, args, t[1])
    table(flop_rows)
    write_results(OUT[0], RESULTS)


if __name__ == "__main__":
    main()
