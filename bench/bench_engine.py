"""Engine benchmark on a GPU, side by side with DeePMD-kit's PyTorch ``DeepPot.eval`` in the same run.

Model: the DeePMD-kit v2 paper's Cu se_e2_a (rcut 6, rcut_smth 0.5, sel [152], embedding [25,50,100],
axis 16, fitting [240,240,240]); tiny copies trained by DeePMD-kit (20 steps: the speed does not
depend on training). MODELS holds cu_float64_1/model.dp and cu_float32_{1..4}/model.dp (and .pth
made from them with ``dp convert-backend`` when --deepmd is given).

Cases: us per atom per force call for fcc Cu of 6,912 / 55,296 / 186,624 / 1,000,188 atoms;
256 systems of 108 atoms in one call; 4-model deviation on that batch. FP64 ("double": FP64 model,
FP64 everywhere) and mixed (FP32 model, FP64 geometry + FP32 nets). Prints a Markdown table and
writes JSON (default bench/results/engine_<device>.json; --json FILE elsewhere, --json "" nowhere).

    python bench/bench_engine.py MODELS [--deepmd] [--variants] [--check [extra.dp ...]]
                                 [--compress 2.0] [--set NAME=VALUE ...] [--json out.json] [--reps 4 8 12 21]

The models come from bench/make_models.py; on the device machine bench/bench_engine_gpu.sh installs
DeePMD-kit from the wheels carried in the git-ignored .whl/ and runs every case (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE / "profiling"))  # profile_engine: check_cells

from benchutil import add_settings_arg, device_tag, engine_settings, results_path, timeit, write_results

from dpsnake.engine.settings import EngineSettings

RESULTS = []


def emit(**kw):
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)


def cu_cell(rep, a=3.634):
    from ase.build import bulk

    return bulk("Cu", "fcc", a=a, cubic=True).repeat((3 * rep, 3 * rep, 3 * rep))


def batch_frames(nf=256, seed=0):
    a = cu_cell(1)
    rng = np.random.default_rng(seed)
    c = a.positions[None] + 0.05 * rng.standard_normal((nf, len(a), 3))
    return c, np.tile(a.cell.array.reshape(1, 9), (nf, 1)), np.zeros(len(a), dtype=int)


# the engine's settings of every case: --set NAME=VALUE on top of the DPSNAKE_* variables of the
# environment (EngineSettings.from_env: the command lines of earlier runs still mean what they did)
SETTINGS = EngineSettings()


def _variant(kern: str, fused: str) -> EngineSettings:
    """Settings of a variant (kernels, fused) = ("0"/"1", "0"/"1"/"auto"), as DPSNAKE_KERNELS and
    DPSNAKE_FUSED meant them (FUSED=0 also turned the tabulated kernels off)."""
    return SETTINGS.replace(
        kernels=kern != "0", fused={"0": "off", "1": "on"}.get(fused, "auto"), tab_kernels=fused != "0"
    )


def _use(best, prec, tf32: bool = False) -> EngineSettings:
    """Settings of the main cases: the fastest variant of ``prec`` if measured, else SETTINGS."""
    base = _variant(*best[prec]) if best and prec in best else SETTINGS
    return base.replace(tf32=tf32)


def ours_cases(
    models,
    reps,
    cp,
    sync,
    best=None,
    code="dpsnake",
    compress=None,
    precs=("mixed", "double"),
    parts=("batch", "single"),
    tf32=False,
):
    """The cases of one engine mode: ``code`` labels it; ``compress`` (dict) tabulates the nets;
    ``parts``: "batch" (256 x 108 batch, 4-model deviation), "single" (one system per size)."""
    from dpsnake.engine.deeppot import frames_to_flat
    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.engine.model_devi import deviation_columns

    pairs = (("mixed", models["float32"][0]), ("double", models["float64"]))
    for prec, mfile in [p for p in pairs if p[0] in precs and "batch" in parts]:
        ens = Ensemble([mfile], precision=prec, compress=compress, settings=_use(best, prec, tf32))
        c, b, t = batch_frames()
        args = frames_to_flat(cp, cp.asarray(c), cp.asarray(b), cp.asarray(t))[:5]
        nat = c.shape[0] * c.shape[1]
        cp.get_default_memory_pool().free_all_blocks()
        s = timeit(lambda: ens.evaluate(*args), sync, n=10)
        emit(bench="batched", code=code, prec=prec, natoms=108, nframes=256, sec_per_eval=s, us_per_atom=s / nat * 1e6)
    # 4-model deviation on the batch (mixed, FP32 models) and (double, the FP64 model 4 times)
    devs = (("mixed", models["float32"]), ("double", [models["float64"]] * 4))
    for prec, mlist in [p for p in devs if p[0] in precs and "batch" in parts]:
        ens = Ensemble(mlist, precision=prec, compress=compress, settings=_use(best, prec, tf32))
        c, b, t = batch_frames(seed=1)
        args = frames_to_flat(cp, cp.asarray(c), cp.asarray(b), cp.asarray(t))[:5]
        natoms = cp.full(c.shape[0], c.shape[1])

        def devi():
            out = ens.evaluate(*args)
            return deviation_columns(out, args[2], natoms)

        cp.get_default_memory_pool().free_all_blocks()
        s = timeit(devi, sync, n=5)
        emit(
            bench="model_devi",
            code=code,
            prec=prec,
            natoms=108,
            nframes=256,
            nmodels=4,
            sec=s,
            us_per_frame_atom=s / (c.shape[0] * c.shape[1]) * 1e6,
        )
    for prec, mfile in [p for p in pairs if p[0] in precs and "single" in parts]:
        ens = Ensemble([mfile], precision=prec, compress=compress, settings=_use(best, prec, tf32))
        for rep in reps:
            a = cu_cell(rep)
            n = len(a)
            pos = cp.asarray(a.positions)
            atype = cp.zeros(n, dtype=cp.int64)
            system = cp.zeros(n, dtype=cp.int64)
            cell = cp.asarray(a.cell.array[None])
            pbc = cp.ones(1, dtype=bool)
            try:
                cp.get_default_memory_pool().free_all_blocks()
                s = timeit(
                    lambda: ens.evaluate(pos, atype, system, cell, pbc),
                    sync,
                    n=5 if n < 300_000 else 2,
                    warm=1 if n > 300_000 else 2,
                )
                peak = cp.get_default_memory_pool().total_bytes() / 2**30
                emit(
                    bench="single",
                    code=code,
                    prec=prec,
                    natoms=n,
                    sec_per_eval=s,
                    us_per_atom=s / n * 1e6,
                    pool_gib=round(peak, 2),
                )
            except Exception as err:  # report and go on (e.g. out of memory)
                emit(bench="single", code=code, prec=prec, natoms=n, error=repr(err)[:300])
            pos = atype = system = cell = None  # free device memory before the next size
        ens = None
        cp.get_default_memory_pool().free_all_blocks()


def variant_cases(models, cp, sync):
    """The batched case with parts of the CUDA code switched off (array code only, + neighbour
    kernel, + fused embedding kernels), to show what each part buys."""
    from dpsnake.engine.deeppot import frames_to_flat
    from dpsnake.engine.ensemble import Ensemble

    c, b, t = batch_frames()
    args = frames_to_flat(cp, cp.asarray(c), cp.asarray(b), cp.asarray(t))[:5]
    nat = c.shape[0] * c.shape[1]
    for kern, fused in (("0", "0"), ("1", "0"), ("1", "1")):
        for prec, mfile in (("mixed", models["float32"][0]), ("double", models["float64"])):
            try:
                ens = Ensemble([mfile], precision=prec, settings=_variant(kern, fused))
                s = timeit(lambda: ens.evaluate(*args), sync, n=5)
                emit(
                    bench="variant",
                    kernels=kern,
                    fused=fused,
                    prec=prec,
                    natoms=108,
                    nframes=256,
                    us_per_atom=s / nat * 1e6,
                )
            except Exception as err:
                emit(bench="variant", kernels=kern, fused=fused, prec=prec, error=repr(err)[:300])
    # the main cases run with the fastest variant of each precision
    best = {}
    for r in RESULTS:
        if r.get("bench") == "variant" and "us_per_atom" in r:
            if r["prec"] not in best or r["us_per_atom"] < best[r["prec"]][0]:
                best[r["prec"]] = (r["us_per_atom"], r["kernels"], r["fused"])
    emit(best_variant={k: v[1:] for k, v in best.items()})
    return {k: v[1:] for k, v in best.items()}


def deepmd_cases(models, reps, sync):
    from deepmd.infer import DeepPot
    from deepmd.infer.model_devi import calc_model_devi

    for prec, mfile in (("float32", models["float32"][0]), ("float64", models["float64"])):
        dp = DeepPot(mfile.replace(".dp", ".pth"))
        for rep in reps:
            a = cu_cell(rep)
            n = len(a)
            c, b, t = a.positions.reshape(1, -1), a.cell.array.reshape(1, -1), np.zeros(n, dtype=int)
            try:
                s = timeit(lambda: dp.eval(c, b, t), sync, n=3)
                emit(bench="single", code="deepmd-pt", prec=prec, natoms=n, sec_per_eval=s, us_per_atom=s / n * 1e6)
            except Exception as err:
                emit(bench="single", code="deepmd-pt", prec=prec, natoms=n, error=repr(err)[:200])
                break
        c, b, t = batch_frames()
        s = timeit(lambda: dp.eval(c.reshape(len(c), -1), b, t), sync, n=5)
        emit(
            bench="batched",
            code="deepmd-pt",
            prec=prec,
            natoms=108,
            nframes=256,
            sec_per_eval=s,
            us_per_atom=s / (c.shape[0] * c.shape[1]) * 1e6,
        )
        dp = None
    dps = [DeepPot(m.replace(".dp", ".pth")) for m in models["float32"]]
    c, b, t = batch_frames(seed=1)
    s = timeit(lambda: calc_model_devi(c.reshape(len(c), -1), b, t, dps), sync, n=3)
    emit(
        bench="model_devi",
        code="deepmd-pt",
        prec="float32",
        natoms=108,
        nframes=256,
        nmodels=4,
        sec=s,
        us_per_frame_atom=s / (c.shape[0] * c.shape[1]) * 1e6,
    )


def agreement(models, extra, cp):
    """NumPy vs CuPy (FP64) and dpsnake vs DeePMD-kit on the device, max relative differences."""
    from profile_engine import check_cells

    from dpsnake.engine.deeppot import DeepPot

    rng = np.random.default_rng(5)
    systems = check_cells(rng)
    paths = [models["float64"], models["float32"][0]] + list(extra)
    for path, fused in [(p, f) for p in paths for f in ("auto", "1")]:
        dpn = DeepPot(path, settings=_variant("1", fused))
        tm = dpn.get_type_map()
        for k, at in enumerate(systems):
            t = rng.integers(0, len(tm), len(at))
            for pbc in (True, False):
                c = at.positions[None]
                cell = at.cell.array.reshape(1, 9) if pbc else None
                rn = dpn.eval(c, cell, t, atomic=True)
                rc = dpn.eval(cp.asarray(c), None if cell is None else cp.asarray(cell), cp.asarray(t), atomic=True)
                errs = [
                    float(np.abs(np.asarray(x) - y.get()).max() / max(np.abs(x).max(), 1e-300)) for x, y in zip(rn, rc)
                ]
                emit(
                    check="numpy_vs_cupy_fp64",
                    fused=fused,
                    model=pathlib.Path(path).parent.name,
                    system=k,
                    pbc=pbc,
                    natoms=len(at),
                    max_rel=max(errs),
                )
                mixed = DeepPot(path, precision="mixed").eval(
                    cp.asarray(c), None if cell is None else cp.asarray(cell), cp.asarray(t)
                )
                emit(
                    check="mixed_vs_double",
                    fused=fused,
                    model=pathlib.Path(path).parent.name,
                    system=k,
                    pbc=pbc,
                    e_rel=float(abs(mixed[0].get() - rn[0]).max() / abs(rn[0]).max()),
                    f_rel=float(abs(mixed[1].get() - rn[1]).max() / abs(rn[1]).max()),
                )


def deepmd_agreement(models, cp):
    from deepmd.infer import DeepPot as RefPot

    from dpsnake.engine.deeppot import DeepPot

    c, b, t = batch_frames(nf=4, seed=3)
    for prec, m in (("float64", models["float64"]), ("float32", models["float32"][0])):
        ref = RefPot(m.replace(".dp", ".pth")).eval(c.reshape(4, -1), b, t)
        ours = DeepPot(m, precision="double").eval(cp.asarray(c), cp.asarray(b), cp.asarray(t))
        errs = [
            float(np.abs(np.asarray(x).reshape(y.shape) - y.get()).max() / np.abs(x).max()) for x, y in zip(ref, ours)
        ]
        emit(check="dpsnake_vs_deepmd_pt", prec=prec, e_rel=errs[0], f_rel=errs[1], v_rel=errs[2])


def accuracy(models, cp, comp):
    """Tabulation, mixed precision and TF32 against the FP64 nets (FP64 model, 32 x 108 rattled Cu):
    max |dE| per atom (eV), max and RMS |dF| (eV/A), max |dV| per atom (eV); and the tabulated
    kernels against the tabulated NumPy array code (both FP64)."""
    from dpsnake.engine.deeppot import DeepPot

    c, b, t = batch_frames(nf=32, seed=7)
    nat = c.shape[1]
    args = (cp.asarray(c), cp.asarray(b), cp.asarray(t))
    ref = [x.get() for x in DeepPot(models["float64"]).eval(*args)[:3]]
    modes = [
        ("mixed", "mixed", None, "0"),
        ("double+tab", "double", comp, "0"),
        ("mixed+tab", "mixed", comp, "0"),
        ("mixed+tf32", "mixed", None, "1"),
        ("mixed+tab+tf32", "mixed", comp, "1"),
    ]
    for name, prec, cmp, tf32 in modes:
        st = SETTINGS.replace(tf32=tf32 == "1")
        e, f, v = [
            x.get() for x in DeepPot(models["float64"], precision=prec, compress=cmp, settings=st).eval(*args)[:3]
        ]
        df = np.linalg.norm((f - ref[1]).reshape(-1, 3), axis=1)
        emit(
            check="accuracy_vs_fp64_nets",
            mode=name,
            stride=(cmp or {}).get("stride", 0.01) if cmp else None,
            e_per_atom_max=float(np.abs(e - ref[0]).max() / nat),
            f_max=float(df.max()),
            f_rms=float(np.sqrt((df**2).mean())),
            v_per_atom_max=float(np.abs(v - ref[2]).max() / nat),
            f_scale_rms=float(np.sqrt((ref[1] ** 2).sum(-1).mean())),
        )
    st = SETTINGS.replace(tf32=False)
    gpu = [x.get() for x in DeepPot(models["float64"], compress=comp, settings=st).eval(*args)[:3]]
    cpu = DeepPot(models["float64"], compress=comp, settings=st).eval(c[:4], b[:4], t)[:3]
    errs = [float(np.abs(x[:4].reshape(y.shape) - y).max() / np.abs(y).max()) for x, y in zip(gpu, cpu)]
    emit(check="tab_kernels_vs_numpy_fp64", e_rel=errs[0], f_rel=errs[1], v_rel=errs[2])


def table():
    rows = {}
    for r in RESULTS:
        if "bench" not in r or "code" not in r:
            continue
        key = (r["bench"], r.get("natoms"), r.get("nframes", 1))
        prec = {"float64": "double", "float32": "mixed"}.get(r["prec"], r["prec"])
        val = r.get("us_per_atom", r.get("us_per_frame_atom"))
        rows.setdefault(key, {})[(r["code"], prec)] = "OOM/err" if val is None else f"{val:.3f}"
    cols = [
        ("dpsnake", "double"),
        ("dpsnake-tab", "double"),
        ("deepmd-pt", "double"),
        ("dpsnake", "mixed"),
        ("dpsnake-tab", "mixed"),
        ("dpsnake-tab-tf32", "mixed"),
        ("deepmd-pt", "mixed"),
    ]
    print("| case | atoms | " + " | ".join(f"{c} {p}" for c, p in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for (bench, nat, nf), v in rows.items():
        print(f"| {bench} | {nat * nf:,} | " + " | ".join(v.get(c, "-") for c in cols) + " |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", help="folder with cu_float64_1/ and cu_float32_{1..4}/ model.dp")
    ap.add_argument("--reps", type=int, nargs="+", default=[4, 8, 12, 21])
    ap.add_argument("--deepmd", action="store_true", help="also time DeePMD-kit (PyTorch) DeepPot")
    ap.add_argument("--deepmd-reps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--check", nargs="*", default=None, help="agreement checks (+ extra .dp files)")
    ap.add_argument("--variants", action="store_true", help="batched case with kernels switched off")
    ap.add_argument(
        "--compress",
        type=float,
        default=None,
        metavar="MIN_NBOR_DIST",
        help="also every case with tabulated embedding nets (and mixed + TF32 fitting GEMMs)",
    )
    add_settings_arg(ap)
    ap.add_argument("--json", default=None, help="results file (default bench/results/engine_<device>.json)")
    args = ap.parse_args()
    global SETTINGS
    SETTINGS = engine_settings(args.set)
    import cupy as cp

    def sync():
        cp.cuda.Device().synchronize()

    root = pathlib.Path(args.models)
    models = {
        "float64": str(root / "cu_float64_1/model.dp"),
        "float32": [str(root / f"cu_float32_{s}/model.dp") for s in (1, 2, 3, 4)],
    }
    device = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    emit(
        device=device,
        settings=SETTINGS.to_dict(),
        cupy=cp.__version__,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    if args.check is not None:
        agreement(models, args.check, cp)
    if args.deepmd:
        for m in [models["float64"], *models["float32"]]:
            if not os.path.exists(m.replace(".dp", ".pth")):
                subprocess.run(
                    [sys.executable, "-m", "deepmd", "convert-backend", m, m.replace(".dp", ".pth")],
                    check=True,
                    capture_output=True,
                )
        deepmd_agreement(models, cp)
    best = variant_cases(models, cp, sync) if args.variants else None
    comp = {"min_nbor_dist": args.compress} if args.compress else None
    modes = [("dpsnake", None, ("mixed", "double"), "0")]
    if comp:
        accuracy(models, cp, comp)
        modes += [("dpsnake-tab", comp, ("mixed", "double"), "0"), ("dpsnake-tab-tf32", comp, ("mixed",), "1")]
    # every mode's batched cases before any large system: run after the 4.2 M-atom ones (the GPU at
    # full power for minutes, a pool of tens of GB) they measured 10-20% slower (docs/benchmarks.md)
    for parts in (("batch",), ("single",)):
        for code, cmp, precs, tf32 in modes:
            ours_cases(
                models, args.reps, cp, sync, best, code=code, compress=cmp, precs=precs, parts=parts, tf32=tf32 == "1"
            )
    if args.deepmd:
        import torch

        deepmd_cases(models, args.deepmd_reps, torch.cuda.synchronize)
    table()
    write_results(results_path(args.json, "engine", device_tag(device)), RESULTS)


if __name__ == "__main__":
    main()
