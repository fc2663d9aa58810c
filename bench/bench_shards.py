"""Balance of sharded exploration (explore.shards): does the cost model split a mixed-size walker set
into shards that take the same time?

Walkers: fcc Cu cells of 32, 108, 256 and 500 atoms (2x2x2 .. 5x5x5 cubic, a = 3.634 A), equally many
of each, in the order `dpsnake plan` writes them (by system); NPT 300 K / 1 bar, dt 1 fs, deviation of
all models every ``trj_freq`` steps, frames and model_devi.out written. The walkers are split into
``--shards`` shards two ways: by cost (dpsnake.workflow.shards: atoms x steps x (1 + (M-1)/trj_freq),
longest first into the least-loaded shard) and by count (consecutive equal-count chunks, what a split
that ignores sizes gives). Each shard runs alone on the device, as its own job would (Explorer.run():
structures, step 0, the MD loop, files), one after another; balance = slowest shard / mean shard time
(1.0 = ideal). One batch of all walkers is timed too (the unsharded job), for the cost of splitting.

Prints a Markdown table, writes JSON: bench/results/shards_<device>.json (--json FILE elsewhere, "" nowhere).

    python bench/bench_shards.py m0.dp m1.dp m2.dp m3.dp [--walkers 256] [--shards 4] [--steps 100]
           [--device auto|cpu|gpu] [--precision mixed|double] [--compress MIN_NBOR_DIST]
CPU smoke test:  python bench/bench_shards.py M.dp M2.dp --walkers 8 --shards 2 --steps 20 --device cpu --json ""
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "src"))

from benchutil import results_path, write_results, xp_tag

REPS = (2, 3, 4, 5)  # cubic fcc cells per side: 32, 108, 256, 500 atoms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help=".dp models (the first drives MD)")
    ap.add_argument("--walkers", type=int, default=256, help="walkers in all (a multiple of 4)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--trj-freq", type=int, default=10)
    ap.add_argument("--device", choices=("cpu", "gpu", "auto"), default="auto")
    ap.add_argument("--precision", choices=("double", "mixed"), default="mixed")
    ap.add_argument("--compress", type=float, default=None, metavar="MIN_NBOR_DIST")
    ap.add_argument("--json", default=None, help="results file (default: bench/results/shards_<device>.json)")
    args = ap.parse_args()

    from ase.build import bulk

    from dpsnake.md.explore import make_provider, pick_xp
    from dpsnake.md.explorer import Explorer
    from dpsnake.md.walkers import parse_walkers
    from dpsnake.workflow import shards

    xp = pick_xp(args.device)
    sync = (lambda: None) if xp.__name__ == "numpy" else xp.cuda.Device().synchronize
    provider, type_map = make_provider(args.models, args.precision, xp, args.compress)
    nmodels = len(args.models)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_shards_"))
    natoms = {}
    for r in REPS:
        at = bulk("Cu", "fcc", a=3.634, cubic=True).repeat((r, r, r))
        at.write(tmp / f"cu{r}.extxyz", format="extxyz")
        natoms[f"cu{r}.extxyz"] = len(at)
    per = args.walkers // len(REPS)
    specs = [
        dict(name=f"cu{r}.w{k}", structure=f"cu{r}.extxyz", ensemble="npt", temperature=300.0, pressure=1.0,
             nsteps=args.steps, dt=0.001, trj_freq=args.trj_freq, seed=1 + i * per + k)
        for i, r in enumerate(REPS) for k in range(per)
    ]  # fmt: skip

    def run(names, label):
        """Seconds of one shard's exploration (Explorer.run(), device synchronised)."""
        ws = parse_walkers([s for s in specs if s["name"] in names], base=tmp)
        out = tmp / label
        sync()
        t = time.perf_counter()
        Explorer(ws, provider, type_map, out, xp=xp, progress=False, checkpoint_every=1e9).run()
        sync()
        dt = time.perf_counter() - t
        shutil.rmtree(out)
        return dt

    run({s["name"] for s in specs[:: max(1, per // 2)]}, "warm")  # kernel compilation, caches
    cost = [shards.walker_cost(natoms[s["structure"]], s["nsteps"], s["trj_freq"], nmodels) for s in specs]
    n = args.shards
    chunk = -(-len(specs) // n)
    splits = {
        "cost": shards.split(cost, n),
        "count": [list(range(k * chunk, min(len(specs), (k + 1) * chunk))) for k in range(n)],
    }
    rows, result = [], {"walkers": len(specs), "atoms": {k: v for k, v in natoms.items()}, "shards": n}
    t_all = run({s["name"] for s in specs}, "all")
    atom_steps = sum(natoms[s["structure"]] for s in specs) * args.steps
    result["one_batch"] = {"seconds": t_all, "us_per_atom_step": 1e6 * t_all / atom_steps}
    for how, parts in splits.items():
        times, loads = [], []
        for k, part in enumerate(parts):
            names = {specs[i]["name"] for i in part}
            times.append(run(names, f"{how}{k}"))
            loads.append(sum(cost[i] for i in part))
            atoms = sum(natoms[specs[i]["structure"]] for i in part)
            rows.append((how, k, len(part), atoms, loads[-1], times[-1], 1e6 * times[-1] / (atoms * args.steps)))
        result[how] = {
            "shard_seconds": times,
            "shard_cost": loads,
            "shard_walkers": [len(p) for p in parts],
            "balance_predicted": shards.balance(loads),
            "balance_measured": max(times) / (sum(times) / len(times)),
            "sum_seconds": sum(times),
        }
    dev = xp_tag(xp)
    result.update(
        device=dev,
        models=[str(m) for m in args.models],
        precision=args.precision,
        compress=args.compress,
        steps=args.steps,
        trj_freq=args.trj_freq,
        command="python " + " ".join(sys.argv),
    )
    print(f"\n{len(specs)} walkers ({', '.join(f'{per} x {v}' for v in natoms.values())} atoms), {n} shards, "
          f"{nmodels} models, {args.steps} NPT steps, deviation every {args.trj_freq}, {dev}")  # fmt: skip
    print("\n| split | shard | walkers | atoms | cost (atom-steps) | s | us/atom-step |\n|---|---|---|---|---|---|---|")
    for how, k, nw, na, c, t, us in rows:
        print(f"| {how} | {k} | {nw} | {na} | {c:.3g} | {t:.2f} | {us:.3f} |")
    print("\n| split | balance predicted | balance measured | sum of shards, s | one batch, s |\n|---|---|---|---|---|")
    for how in splits:
        r = result[how]
        print(
            f"| {how} | {r['balance_predicted']:.3f} | {r['balance_measured']:.3f} | {r['sum_seconds']:.2f} "
            f"| {t_all:.2f} |"
        )
    write_results(results_path(args.json, "shards", dev), result)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
