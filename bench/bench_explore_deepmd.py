"""Exploration with DeePMD-kit's own PyTorch models (issue 17): us per atom-step of the batched
explorer (``Explorer`` + ``DeepmdProvider``), beside DeePMD-kit's ``DeepPot.eval`` on the same batch.

Case (the issue's): W walkers of fcc Cu (3x3x3 cubic cells, a = 3.634 A, 108 atoms) in one batch, NPT
(Bussi + stochastic cell rescaling) at 300 K / 1 bar, dt 1 fs, model 0 drives the MD and all M models
are evaluated every ``trj_freq`` (10) steps for the deviation; frames and model_devi.out written.

Subcommands:

  data DIR [--frames 40] [--steps 300] [--seeds 4]
      EMT-labelled fcc Cu frames (deepmd/npy, rattled and scaled 108-atom cells) and DeePMD-kit
      inputs DIR/{se_atten_v2,dpa3}_s{k}/input.json with the sizes of DeePMD-kit's examples
      (examples/water/se_atten/input_torch.json with type se_atten_v2; examples/water/dpa3/input_torch.json).
  bench MODEL... [--walkers 256] [--rep 3] [--steps 200] [--device auto|cpu|gpu] [--label NAME] [--json OUT]
      [--provider deepmd|builtin] [--precision double|mixed|tf32|tf32layer] [--compress MIN_NBOR_DIST]
      [--skin 1.0|none] [--dynamic-sel on|off]
      timings: explore (Explorer.loop, the real thing), force (the provider alone with the explorer's
      call pattern: 9 calls model 0 + 1 call all models per 10 steps), integrator (md step with cached
      forces), DeePMD-kit's DeepPot.eval on the whole batch (one model, and all models), peak GPU
      memory (torch + CuPy pools) per atom, and (--profile) a torch profiler table of one ordinary and
      one deviation call. Results go under --label into bench/results/explore_deepmd_<device>.json
      (a dict by label, updated in place; --json FILE elsewhere, --json "" nowhere).
      --provider builtin: dpsnake's built-in engine (se_atten / se_atten_v2 .dp files, made from the
      .pth by `dp convert-backend` when missing) instead of DeePMD-kit's models; DeepPot.eval always
      runs the .pth files beside it.

CPU smoke test:
  python bench/bench_explore_deepmd.py data /tmp/x --frames 4 --steps 2 --seeds 2
  (train + freeze), then python bench/bench_explore_deepmd.py bench m0.pth m1.pth --walkers 2 --steps 20 --device cpu --json ""
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "src"))

from benchutil import results_path, write_results, xp_tag
from explore_models import A_CU, cmd_data

from dpsnake.errors import UserError


def gpu_mem(xp):
    """(torch peak allocated, CuPy pool bytes in use) in bytes; zeros on the CPU."""
    import torch

    if xp is np or not torch.cuda.is_available():
        return 0, 0
    return int(torch.cuda.max_memory_allocated()), int(xp.get_default_memory_pool().total_bytes())


def cmd_bench(args) -> int:
    warnings.simplefilter("ignore", RuntimeWarning)
    import torch
    from ase.build import bulk

    from dpsnake.md import integrators
    from dpsnake.md.deepmd_provider import DeepmdProvider
    from dpsnake.md.explore import pick_xp
    from dpsnake.md.explorer import Explorer
    from dpsnake.md.graphs import make_stepper
    from dpsnake.md.walkers import parse_walkers

    xp = pick_xp(args.device)
    on_gpu = xp is not np
    sync = xp.cuda.Device().synchronize if on_gpu else (lambda: None)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if args.provider == "builtin":
        try:
            provider = builtin_provider(args.models, xp, args.precision, args.compress, args.chunk_mb, args.set)
        except UserError as err:  # e.g. --compress while the engine refuses it: recorded, not fatal
            out = results_path(args.json, "explore_deepmd", xp_tag(xp))
            old = json.loads(out.read_text()) if out is not None and out.is_file() else {}
            old[args.label] = {"label": args.label, "error": f"n/a: {err}", "compress": args.compress}
            write_results(out, old)
            print(f"[{args.label}] n/a: {err}", flush=True)
            return 0
    else:
        max_atoms = {"auto": "auto", "none": None}.get(args.max_atoms) or int(args.max_atoms)
        skin = None if args.skin.lower() == "none" else float(args.skin)
        # "auto": its own memory probe; skin / dynamic_sel: the provider's defaults unless asked otherwise
        provider = DeepmdProvider(
            args.models,
            xp,
            max_atoms=max_atoms,
            skin=skin,
            dynamic_sel=args.dynamic_sel == "on",
            compile=args.compile == "on",
        )
    t_load = time.perf_counter() - t0
    type_map = provider.type_map
    ref_models = [str(pathlib.Path(m).with_suffix(".pth")) for m in args.models]  # DeePMD-kit's own files
    if args.provider == "builtin" and args.compress:  # tabulated: beside DeePMD-kit's compressed models
        comp = [pathlib.Path(m).with_name("model_c.pth") for m in ref_models]
        ref_models = [str(c) for c in comp] if all(c.is_file() for c in comp) else ref_models
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_xdp_"))
    atoms = bulk("Cu", "fcc", a=A_CU, cubic=True).repeat(args.rep)
    atoms.write(tmp / "cu.extxyz", format="extxyz")
    nat, f = len(atoms), args.trj_freq
    nsteps = max(f, (args.steps // f) * f)
    ntot = args.walkers * nat

    def walkers(n, steps):
        return parse_walkers(
            [
                dict(
                    name=f"w{k}",
                    structure=str(tmp / "cu.extxyz"),
                    ensemble=args.ensemble,
                    temperature=300.0,
                    pressure=1.0,
                    nsteps=steps,
                    dt=0.001,
                    trj_freq=f,
                    seed=k,
                )
                for k in range(n)
            ]
        )

    rows, notes = {}, {}
    # warm-up (TorchScript profiling runs, cuBLAS handles, CUDA graphs of the integrator), then timed
    ex = Explorer(
        walkers(args.walkers, args.explore_rounds * nsteps + args.warmup_steps + f),
        provider,
        type_map,
        tmp / "run",
        xp=xp,
        progress=False,
        checkpoint_every=1e9,
        stop_after=args.warmup_steps,
    )
    t0 = time.perf_counter()
    ex.prepare()  # the first provider calls: memory probe, TorchScript's first runs, torch.compile
    sync()
    notes["prepare_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ex.loop()
    sync()
    notes["warmup_s"] = time.perf_counter() - t0
    ex.stop_after = nsteps
    # rounds of nsteps, the median kept: a round may compile the layer kernels for a neighbour width
    # first met there (a compile-time constant, cuda/attn_layer.py; a fresh machine's kernel cache
    # is empty), which a long exploration pays once
    from dpsnake.engine.cuda.attn_layer import compiled_modules

    rounds, modules = [], [compiled_modules()]
    for _ in range(args.explore_rounds):
        sync()
        t0 = time.perf_counter()
        ex.loop()
        sync()
        rounds.append((time.perf_counter() - t0) / nsteps)
        modules.append(compiled_modules())
    rows["explore"] = float(np.median(rounds))
    notes["explore_rounds_us_per_atom_step"] = [round(1e6 * r / ntot, 4) for r in rounds]
    notes["attn_layer_modules_after_warmup_and_rounds"] = modules  # one per width and KEEP, compiled on first use
    mem_explore = gpu_mem(xp)

    out = results_path(args.json, "explore_deepmd", xp_tag(xp))

    def save(res):
        if out is not None:
            old = json.loads(out.read_text()) if out.is_file() else {}
            old[args.label] = res
            write_results(out, old)

    save(
        {
            "label": args.label,
            "partial": True,
            "walkers": args.walkers,
            "atoms": ntot,
            "steps": nsteps,
            "us_per_atom_step": {"explore": 1e6 * rows["explore"] / ntot},
            "prepare_s": notes["prepare_s"],
            "warmup_s": notes["warmup_s"],
            "explore_rounds_us_per_atom_step": notes["explore_rounds_us_per_atom_step"],
            "peak_gpu_bytes_per_atom_explore": (mem_explore[0] + mem_explore[1]) / ntot,
        }
    )
    print(
        f"[{args.label}] explore {1e3 * rows['explore']:.2f} ms per step, {1e6 * rows['explore'] / ntot:.3f} us per "
        f"atom-step (median of rounds {notes['explore_rounds_us_per_atom_step']}); peak GPU "
        f"{(mem_explore[0] + mem_explore[1]) / ntot / 1024:.1f} KiB per atom",
        flush=True,
    )

    st = ex.st
    provider(st, False)  # the provider alone, the explorer's call pattern (warm already)
    provider(st, True)
    sync()
    t0 = time.perf_counter()
    nforce = min(nsteps, args.force_steps)
    for k in range(1, nforce + 1):
        provider(st, k % f == 0)
    sync()
    rows["force"] = (time.perf_counter() - t0) / nforce
    t_one, t_all = [], []
    for _ in range(args.reps):
        sync()
        t0 = time.perf_counter()
        provider(st, False)
        sync()
        t_one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        provider(st, True)
        sync()
        t_all.append(time.perf_counter() - t0)
    notes["provider_call_model0_s"] = float(np.median(t_one))
    notes["provider_call_all_models_s"] = float(np.median(t_all))

    cached = provider(st, False)
    flags = st.flags()
    steppers = {"integrator": make_stepper(xp)}
    for name, stepper in steppers.items():
        for k in range(3):
            stepper(st, lambda s, a: cached, k, flags)
        sync()
        t0 = time.perf_counter()
        for k in range(nsteps):
            stepper(st, lambda s, a: cached, k, flags)
        sync()
        rows[name] = (time.perf_counter() - t0) / nsteps
    del integrators

    # DeePMD-kit's own DeepPot.eval on the same batch (host numpy in and out, its own batching)
    from deepmd.infer import DeepPot

    from dpsnake.engine.xp import to_numpy

    S = int(st.cells.shape[0])
    coords = to_numpy(st.pos).reshape(S, nat * 3)
    cells = to_numpy(st.cells).reshape(S, 9)
    atype = np.zeros(nat, dtype=int)
    dps = [DeepPot(p) for p in ref_models]
    ref = {}
    for name, models in (("deeppot_eval_model0", dps[:1]), ("deeppot_eval_all_models", dps)):
        for _ in range(2):  # TorchScript's profiling executor optimises at the second call
            for dp in models:
                dp.eval(coords, cells, atype)
        ts = []
        for _ in range(args.reps):
            sync()
            t0 = time.perf_counter()
            for dp in models:
                dp.eval(coords, cells, atype)
            if on_gpu:
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        ref[name] = float(np.median(ts))
    # DeePMD-kit's call pattern per explorer step: 0.9 x one model + 0.1 x all models
    rows["deeppot_eval (same pattern)"] = ((f - 1) * ref["deeppot_eval_model0"] + ref["deeppot_eval_all_models"]) / f
    # check: the provider's forces equal DeePMD-kit's on this batch
    e_dp, f_dp, _ = dps[0].eval(coords, cells, atype)
    fo = to_numpy(provider(st, False)["force"][0]).reshape(S, nat, 3)
    notes["max_abs_force_diff_vs_deeppot"] = float(np.abs(fo - f_dp.reshape(S, nat, 3)).max())
    # what selection reads: each walker's max force deviation, ours vs DeePMD-kit's 4 models (FP64 files)
    from dpsnake.engine.model_devi import force_deviation

    f_all = np.stack([f.reshape(S * nat, 3) for f in [f_dp] + [dp.eval(coords, cells, atype)[1] for dp in dps[1:]]])
    system = np.repeat(np.arange(S), nat)
    dev_ref = force_deviation(f_all, system, S)[0]
    dev_ours = to_numpy(force_deviation(provider(st, True)["force"], st.system, S)[0])
    notes["max_devi_f_vs_deeppot"] = {
        "max_abs_diff": float(np.abs(dev_ours - dev_ref).max()),
        "ref_min": float(dev_ref.min()),
        "ref_max": float(dev_ref.max()),
    }
    mem_all = gpu_mem(xp)
    del dps

    # where a deviation cycle's time goes (torch profiler, CUDA + CPU), top ops
    prof_table = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        with profile(activities=acts) as prof:
            provider(st, False)  # one ordinary step and one deviation step
            provider(st, True)
            sync()
        for key in (["self_device_time_total", "self_cuda_time_total"] if on_gpu else []) + ["self_cpu_time_total"]:
            try:
                prof_table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)
                break
            except Exception:
                continue

    dev = "cpu (NumPy)" if not on_gpu else f"gpu ({torch.cuda.get_device_name()})"
    prec = model_dtypes(provider)
    res = {
        "label": args.label,
        "models": args.models,
        "model_param_dtypes": sorted(prec),
        "provider": args.provider,
        "model_params": None
        if args.provider == "builtin"
        else int(sum(p.numel() for p in provider.models[0].parameters())),
        "precision": args.precision if args.provider == "builtin" else None,
        "compress": args.compress if args.provider == "builtin" else None,
        "deeppot_models": ref_models,
        "walkers": args.walkers,
        "atoms_per_walker": nat,
        "atoms": ntot,
        "nmodels": len(args.models),
        "trj_freq": f,
        "steps": nsteps,
        "ensemble": args.ensemble,
        "device": dev,
        "seconds_per_step": rows,
        "us_per_atom_step": {k: 1e6 * v / ntot for k, v in rows.items()},
        "deeppot_eval_s": ref,
        "load_s": t_load,
        **notes,
        "peak_gpu_bytes": {
            "torch_max_allocated_explore": mem_explore[0],
            "cupy_pool_explore": mem_explore[1],
            "torch_max_allocated_all": mem_all[0],
            "cupy_pool_all": mem_all[1],
        },
        "peak_gpu_bytes_per_atom_explore": (mem_explore[0] + mem_explore[1]) / ntot,
        "force_calls": provider.calls,
        # centres per chunk of the built-in engine's calls (sized at its first call)
        "chunk_atoms": provider.ensemble.chunk_size(xp) if hasattr(provider, "ensemble") else None,
        # se_atten: (centres, slots) of each chunk of the last call; calls redone as a chunk filled more slots
        "last_chunks": getattr(getattr(provider, "ensemble", None), "last_chunks", None),
        "width_misses": getattr(getattr(provider, "ensemble", None), "width_misses", None),
        "max_atoms": getattr(provider, "max_atoms", None),
        "skin": getattr(provider, "skin", None),
        "dynamic_sel": None if args.provider == "builtin" else args.dynamic_sel,
        "compile": None if args.provider == "builtin" else args.compile,
        "compiled_models": getattr(provider, "compiled", None),
        "neighbour_list_builds": [g.ghosts.builds for g in provider._groups if g.ghosts is not None]
        if getattr(provider, "_groups", None)
        else None,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if prof_table:
        res["profile_deviation_cycle"] = prof_table
    print(
        f"\n[{args.label}] {args.walkers} walkers x {nat} atoms = {ntot} atoms, {len(args.models)} models "
        f"({'/'.join(sorted(prec))}), deviation every {f} steps, {args.ensemble}, {nsteps} steps, {dev}\n"
    )
    print("| part | ms per step | us per atom-step |")
    print("|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {1e3 * v:.2f} | {1e6 * v / ntot:.3f} |")
    print(
        f"peak GPU memory per atom (torch max allocated + CuPy pool, explore): "
        f"{res['peak_gpu_bytes_per_atom_explore'] / 1024:.1f} KiB; provider call: model 0 "
        f"{1e3 * notes['provider_call_model0_s']:.1f} ms, all models {1e3 * notes['provider_call_all_models_s']:.1f} ms;"
        f" DeepPot.eval model 0 {1e3 * ref['deeppot_eval_model0']:.1f} ms; |F - F_DeepPot| max "
        f"{notes['max_abs_force_diff_vs_deeppot']:.2e}; walkers' max_devi_f - DeePMD-kit's max "
        f"{notes['max_devi_f_vs_deeppot']['max_abs_diff']:.2e} (DeePMD-kit's "
        f"{notes['max_devi_f_vs_deeppot']['ref_min']:.3g}..{notes['max_devi_f_vs_deeppot']['ref_max']:.3g} eV/A)"
    )
    if prof_table:
        print(prof_table)
    save(res)
    return 0


def builtin_provider(models, xp, precision, compress=None, chunk_mb=None, sets=()):
    """dpsnake's built-in engine on the ``.dp`` of each model (made from the ``.pth`` by DeePMD-kit's
    ``dp convert-backend`` when missing), as the explorer drives it; ``compress``: min_nbor_dist (A)
    of tabulated embedding nets; ``chunk_mb``: EngineSettings.chunk_mb (None: the engine's sizing);
    ``sets``: NAME=VALUE engine settings on top."""
    import subprocess

    from dpsnake.engine.dispatch import make_ensemble
    from dpsnake.engine.settings import DEFAULT_FAST, EngineSettings
    from dpsnake.engine.tabulate import Compression
    from dpsnake.md.providers import EnsembleProvider

    dp_files = []
    for m in models:
        dp = pathlib.Path(m).with_suffix(".dp")
        if not dp.is_file():
            subprocess.run(
                [sys.executable, "-m", "deepmd", "convert-backend", str(pathlib.Path(m).with_suffix(".pth")), str(dp)],
                check=True,
                capture_output=True,
            )
        dp_files.append(dp)
    cmp = Compression(min_nbor_dist=compress) if compress else None
    # tf32layer: tf32 with the whole-layer attention kernels (family attn_layer, cuda/attn_layer.py, the default);
    # tf32: the attention through cuBLAS
    fast = DEFAULT_FAST if precision == "tf32layer" else DEFAULT_FAST - {"attn_layer"}
    settings = EngineSettings(tf32=precision in ("tf32", "tf32layer"), fast=fast, chunk_mb=chunk_mb)
    settings = EngineSettings.parse(sets, base=settings)
    prec = "mixed" if precision in ("tf32", "tf32layer") else precision
    prov = EnsembleProvider(make_ensemble(dp_files, precision=prec, xp=xp, compress=cmp, settings=settings))
    prov.type_map = prov.ensemble.type_map
    return prov


def model_dtypes(provider) -> set:
    if hasattr(provider, "ensemble"):  # the built-in engine: the precision it computes the nets in
        ens = provider.ensemble
        tf32 = " (TF32 GEMMs)" if ens.settings.tf32 and ens.precision != "double" else ""
        return {"float64" if ens.precision == "double" else "float32 nets" + tf32}
    return {str(p.dtype) for m in provider.models for p in m.parameters()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("dir")
    d.add_argument("--frames", type=int, default=40)
    d.add_argument("--steps", type=int, default=300)
    d.add_argument("--seeds", type=int, default=4)
    b = sub.add_parser("bench")
    b.add_argument("models", nargs="+", help="frozen .pth (or .dp) models; the first drives MD")
    b.add_argument("--walkers", type=int, default=256)
    b.add_argument("--rep", type=int, default=3)
    b.add_argument("--steps", type=int, default=200)
    b.add_argument("--trj-freq", type=int, default=10)
    b.add_argument("--force-steps", type=int, default=50, help="steps of the provider-alone timing")
    b.add_argument("--warmup-steps", type=int, default=20, help="untimed explorer steps first")
    b.add_argument(
        "--explore-rounds", type=int, default=3, help="timed explorer rounds of --steps each (the median kept)"
    )
    b.add_argument("--reps", type=int, default=3, help="repeats of the single-call timings (median)")
    b.add_argument(
        "--max-atoms",
        default="auto",
        help="atoms per model call: auto (the provider measures its memory on a GPU), none, or N",
    )
    b.add_argument(
        "--skin",
        default="1.0",
        help="DeepmdProvider: A of the kept neighbour list (forward_lower), or none (DeePMD-kit's forward every call)",
    )
    b.add_argument(
        "--dynamic-sel",
        choices=("on", "off"),
        default="on",
        help="DeepmdProvider: DPA-3 through DeePMD-kit's dynamic neighbour selection (no padding) or as saved",
    )
    b.add_argument(
        "--compile",
        choices=("on", "off"),
        default="off",
        help="DeepmdProvider: DPA-3's repflow layers through torch.compile (the first call compiles: warm-up)",
    )
    b.add_argument("--ensemble", default="npt")
    b.add_argument(
        "--provider",
        choices=("deepmd", "builtin"),
        default="deepmd",
        help="deepmd: DeePMD-kit's PyTorch models (DeepmdProvider); builtin: dpsnake's engine on the .dp files",
    )
    b.add_argument(
        "--precision",
        choices=("double", "mixed", "tf32", "tf32layer"),
        default="double",
        help="builtin engine precision (tf32: mixed with settings tf32, the attention through cuBLAS; tf32layer: "
        "with the whole-layer attention kernels, the engine's default with tf32)",
    )
    b.add_argument(
        "--compress",
        type=float,
        default=None,
        metavar="MIN_NBOR_DIST",
        help="builtin: tabulated embedding nets (DeepPot.eval then runs model_c.pth beside, if present)",
    )
    b.add_argument(
        "--chunk-mb",
        type=float,
        default=None,
        help="builtin: work memory per chunk of centres (EngineSettings.chunk_mb; default: the engine's sizing)",
    )
    b.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="builtin: more engine settings (EngineSettings.parse, docs/engine.md), e.g. fill_order=1",
    )
    b.add_argument("--device", choices=("cpu", "gpu", "auto"), default="auto")
    b.add_argument("--label", default="case")
    b.add_argument("--profile", action="store_true", help="torch profiler table of one deviation cycle")
    b.add_argument(
        "--json", default=None, help="results file (a dict by label, updated in place; default bench/results/...)"
    )
    args = ap.parse_args()
    return cmd_data(args) if args.cmd == "data" else cmd_bench(args)


if __name__ == "__main__":
    sys.exit(main())
