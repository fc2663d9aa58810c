"""Exploration MD benchmark: atom-steps per second of the batched explorer, and its overhead over
pure force evaluation.

Case (the issue's): W walkers of fcc Cu (3x3x3 cubic cells, 108 atoms) in one batch, NPT (Bussi +
stochastic cell rescaling) at 300 K / 1 bar, dt 1 fs, all M models evaluated every ``trj_freq``
(10) steps for the deviation, frames and model_devi.out written. Three timings, same batch:

- force:      the engine alone, per 10 steps: 9 calls with model 0 + 1 call with all models;
- integrator: the step with the forces replaced by a cached result (what MD adds per step), as the
              explorer runs it (CUDA graphs on GPUs) and, on GPUs, eagerly (every launch from Python);
- explore:    Explorer.loop(), the real thing (integrator, deviation, stop checks, file writes).

overhead = explore / force - 1 (goal <= 15%), medians of alternating rounds. Prints a Markdown
table, writes JSON: bench/results/md[_tab][_nvt][_double]_<device>.json (tab: --compress; --json FILE
elsewhere, --json "" nowhere).

    python bench/bench_md.py m0.dp m1.dp m2.dp m3.dp [--walkers 256] [--rep 3] [--steps 100]
           [--device auto|cpu|gpu] [--precision mixed|double] [--set NAME=VALUE ...] [--json out.json]
CPU smoke test:  python bench/bench_md.py M.dp M2.dp --walkers 4 --rep 1 --steps 20 --device cpu --json ""
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "src"))

from benchutil import add_settings_arg, engine_settings, results_path, write_results, xp_tag


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help=".dp models (the first drives MD)")
    ap.add_argument("--walkers", type=int, default=256)
    ap.add_argument("--rep", type=int, default=3, help="cubic fcc cells per side (3 -> 108 atoms)")
    ap.add_argument("--steps", type=int, default=100, help="timed MD steps (a multiple of --trj-freq)")
    ap.add_argument("--trj-freq", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="alternating explore/force timing rounds")
    ap.add_argument("--ensemble", default="npt")
    ap.add_argument("--device", choices=("cpu", "gpu", "auto"), default="auto")
    ap.add_argument("--precision", choices=("double", "mixed"), default="mixed")
    ap.add_argument(
        "--compress", type=float, default=None, metavar="MIN_NBOR_DIST", help="tabulated embedding nets (e.g. 2.0)"
    )
    add_settings_arg(ap)
    ap.add_argument("--json", default=None, help="results file (default: bench/results/md..._<device>.json)")
    args = ap.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)

    from ase.build import bulk

    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.md import integrators
    from dpsnake.md.explore import make_provider, pick_xp
    from dpsnake.md.explorer import Explorer
    from dpsnake.md.graphs import make_stepper
    from dpsnake.md.walkers import parse_walkers

    xp = pick_xp(args.device)
    if xp is np:
        sync = lambda: None  # noqa: E731
    else:
        sync = xp.cuda.Device().synchronize
    provider, type_map = make_provider(args.models, args.precision, xp, args.compress)
    # engine settings: --set on top of the DPSNAKE_* variables (the command lines of earlier runs)
    settings = engine_settings(args.set)
    if settings != provider.ensemble.settings:  # the same models in an ensemble with these settings
        e0 = provider.ensemble
        provider.ensemble = Ensemble(e0.models, precision=e0.precision, xp=xp, compress=e0.compress, settings=settings)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_md_"))
    atoms = bulk("Cu", "fcc", a=3.634, cubic=True).repeat(args.rep)
    atoms.write(tmp / "cu.extxyz", format="extxyz")
    nat = len(atoms)
    f = args.trj_freq
    nsteps = (args.steps // f) * f

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

    ntot = args.walkers * nat
    rows = {}

    # explore: warm-up run (kernel compilation, caches), then the timed one
    warm = Explorer(
        walkers(args.walkers, 3 * f),
        provider,
        type_map,
        tmp / "warm",
        xp=xp,
        progress=False,
        checkpoint_every=1e9,
        stop_after=2 * f,
    )
    warm._md_step = make_stepper(xp, settings)  # (the explorer's own has the default settings)
    warm.prepare()
    warm.loop()
    # explore and force are timed in alternating rounds (--rounds; medians reported): the host's
    # speed drifts by 10-20% within a run on the lent machines, and both are host-launch bound.
    # Walkers run longer than the timed steps (closing files at the end is not part of the rate);
    # the first f steps are not timed (the integrator's CUDA graphs are captured there, once per
    # batch of walkers)
    ex = Explorer(
        walkers(args.walkers, args.rounds * nsteps + 2 * f),
        provider,
        type_map,
        tmp / "run",
        xp=xp,
        progress=False,
        checkpoint_every=1e9,
        stop_after=f,
    )
    ex._md_step = make_stepper(xp, settings)
    ex.prepare()
    ex.loop()
    ex.stop_after = nsteps
    stamps = []  # host time at each step's return (the device may still be busy): where time goes
    stepper = ex._md_step

    def stamped(*a, **k):
        out = stepper(*a, **k)
        stamps.append(time.perf_counter())
        return out

    ex._md_step = stamped
    st = warm.st  # force: the same batch (state of the warm-up run), the same call pattern

    fstamps = []

    def forces(n):
        for k in range(1, n + 1):
            provider(st, k % f == 0)
            fstamps.append(time.perf_counter())

    forces(f)
    t_ex, t_fo, step_ms, force_ms = [], [], [], []
    import gc

    gc_log = []  # (generation, seconds) of the garbage collector's passes in the timed rounds
    gc_t = {}

    def on_gc(phase, info):
        if phase == "start":
            gc_t["t"] = time.perf_counter()
        else:
            gc_log.append((info["generation"], time.perf_counter() - gc_t.get("t", time.perf_counter())))

    gc.callbacks.append(on_gc)
    for _ in range(args.rounds):
        sync()
        stamps.clear()
        t = time.perf_counter()
        ex.loop()
        sync()
        t_end = time.perf_counter()
        t_ex.append((t_end - t) / nsteps)
        step_ms.append([round(float(x), 3) for x in np.diff([t] + stamps + [t_end]) * 1e3])
        fstamps.clear()
        t = time.perf_counter()
        forces(nsteps)
        sync()
        t_end = time.perf_counter()
        t_fo.append((t_end - t) / nsteps)
        force_ms.append([round(float(x), 3) for x in np.diff([t] + fstamps + [t_end]) * 1e3])
    gc.callbacks.remove(on_gc)
    rows["explore"] = t_explore = float(np.median(t_ex))
    rows["force"] = t_force = float(np.median(t_fo))

    # integrator alone: forces replaced by a cached result; as the explorer runs it (CUDA graphs
    # on GPUs) and eagerly (every launch from Python)
    cached = provider(st, False)
    flags = st.flags()
    steppers = {"integrator": make_stepper(xp, settings)}
    if steppers["integrator"] is not integrators.md_step:
        steppers["integrator (eager)"] = integrators.md_step
    for name, stepper in steppers.items():
        for k in range(3):
            stepper(st, lambda s, a: cached, k, flags)
        sync()
        t = time.perf_counter()
        for k in range(nsteps):
            stepper(st, lambda s, a: cached, k, flags)
        sync()
        rows[name] = (time.perf_counter() - t) / nsteps

    broken = set(provider.ensemble.ctx.broken)
    for s in (warm._md_step, ex._md_step, *steppers.values()):
        broken |= getattr(s, "ctx", None) and s.ctx.broken or set()
    dev = "cpu (NumPy)" if xp is np else f"gpu (CuPy, {xp.cuda.runtime.getDeviceProperties(0)['name'].decode()})"
    res = {
        "walkers": args.walkers,
        "atoms_per_walker": nat,
        "atoms": ntot,
        "models": len(args.models),
        "trj_freq": f,
        "steps": nsteps,
        "ensemble": args.ensemble,
        "precision": args.precision,
        "compress": args.compress,
        "device": dev,
        "seconds_per_step": rows,
        "atom_steps_per_s": {k: ntot / v for k, v in rows.items()},
        "us_per_atom_step": {k: 1e6 * v / ntot for k, v in rows.items()},
        "md_overhead_over_force": t_explore / t_force - 1.0,
        "rounds": {
            "explore_s_per_step": t_ex,
            "force_s_per_step": t_fo,
            "overhead": [e / f_ - 1 for e, f_ in zip(t_ex, t_fo)],
        },
        "explore_step_ms": step_ms,  # per round; the last entry of each: the wait after the loop
        "force_call_ms": force_ms,  # the same for the force loop
        "gc_passes": {
            g: [sum(1 for x in gc_log if x[0] == g), round(sum(x[1] for x in gc_log if x[0] == g) * 1e3, 2)]
            for g in (0, 1, 2)
        },  # generation: [passes, ms] in the timed rounds
        "settings": settings.to_dict(),
        "fused_families_off": sorted(broken),  # kernels that failed and fell back
        # force calls redone because a chunk outgrew the last call's compaction widths
        "width_misses": getattr(provider.ensemble, "width_misses", None),
        "force_calls": provider.calls,
        "width_changes": getattr(provider.ensemble, "width_changes", None),
        # calls redone because the cells moved beyond the bin grid kept from the last host grid
        "grid_misses": getattr(provider.ensemble, "grid_misses", None),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(
        f"\n{args.walkers} walkers x {nat} atoms = {ntot} atoms, {len(args.models)} models, deviation every {f} "
        f"steps, {args.ensemble}, {args.precision}, {dev}\n"
    )
    print("| part | ms per step | us per atom-step | atom-steps/s |")
    print("|---|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {1e3 * v:.2f} | {1e6 * v / ntot:.3f} | {ntot / v:.3e} |")
    if broken:
        print(f"fused kernel families switched off after an error: {sorted(broken)}")
    print(
        f"force calls: {provider.calls}, redone for wider compaction: {res['width_misses']}, "
        f"compaction widths changed: {res['width_changes']}, redone for a new bin grid: {res['grid_misses']}; "
        f"garbage collector passes in the timed rounds (generation: [passes, ms]): {res['gc_passes']}"
    )
    # where the explorer's time goes: host time between returns per step of the deviation cycle
    # (the deviation step is the last of each cycle; the next one waits for its device work)
    phase = lambda rounds: [
        float(np.median([r[k] for r in rounds for k in range(p, len(r) - 1, f)]))  # noqa: E731
        for p in range(f)
    ]
    res["phase_ms"] = {"explore": phase(step_ms), "force": phase(force_ms)}
    print("| step of the cycle | " + " | ".join(str(p + 1) for p in range(f)) + " |")
    print("|---" * (f + 1) + "|")
    for k, v in res["phase_ms"].items():
        print(f"| {k} ms | " + " | ".join(f"{x:.2f}" for x in v) + " |")
    ov = res["rounds"]["overhead"]
    print(
        f"\nMD overhead over pure force evaluation: {100 * res['md_overhead_over_force']:.1f}% (goal <= 15%; "
        f"rounds {100 * min(ov):.1f} to {100 * max(ov):.1f}%)"
    )
    case = "md" + ("_tab" if args.compress else "") + ("" if args.ensemble == "npt" else f"_{args.ensemble}")
    case += "" if args.precision == "mixed" else f"_{args.precision}"
    write_results(results_path(args.json, case, xp_tag(xp)), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
