"""Does the workflow's selection beat random frames? A learning-curve benchmark (issue 18 item 2), CPU.

One command runs a whole campaign and judges its choice of frames:

1. The campaign: ``snakemake`` on ``bench/science/campaign.yaml`` (Cu bulk, Cu compressed 3 %, CuNi,
   a Cu vacancy and a Cu(100) slab; 300 -> 800 K, then 1200 -> 1600 K; labels from EMT), with the
   ``select`` section of the chosen ``--variant``.
2. The pool: every frame the campaign's exploration wrote (iterations 0..k for the point after
   iteration k), minus frames the workflow's structure filter drops.
3. A test set the benchmark makes itself: EMT Langevin MD of every start structure at 300, 800, 1200
   and 1600 K (its own seeds), a frame every 50 steps after 300 steps of equilibration.
4. For each iteration k, with n_k = labels the workflow had picked up to k, training sets of init data +
   (a) the workflow's picks, (b) n_k random pool frames, (c) n_k pool frames at even time intervals,
   (d) 2 n_k random pool frames (does random need twice the labels?). Every set is trained from scratch
   (``dpsnake train``, the campaign's network, ``--steps`` steps, several seeds) and scored by force RMSE
   on the test set, overall and per system and temperature.

Prints a table (mean +- std per arm and point, its ratio to the workflow's error and a one-sided t-test
p-value, paired by training seed, that the workflow's is the lower), writes
``bench/results/science_selection_cpu.json`` (runs accumulate in it, keyed ``<variant>@<steps>``) and
``docs/img/science_learning_curve.png``. Work files live under ``--work``; a rerun reuses finished
campaigns, labels and trained models (only missing pieces run).

    python bench/science/bench_selection.py [--variant diverse] [--seeds 2] [--draws 2] [--steps 6000]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
TEST_TEMPS = (300, 800, 1200, 1600)
# labels per iteration shared by uncertain frames (max_candidates x systems as one budget), trust hi adaptive
BUDGET_HI = {
    "pick": "diverse",
    "quota": "condition",
    "fill_from_failed": True,
    "budget": "same",
    "adaptive_hi": {"ratio": 0.1},
}
# the select section of each campaign variant (everything else: campaign.yaml)
VARIANTS = {
    "random": {"pick": "random"},
    "highest": {"pick": "highest"},
    "diverse": {"pick": "diverse", "quota": "condition"},
    "diverse_dedup": {"pick": "diverse", "quota": "condition", "dedup_tol": 0.5},
    "diverse_fill": {"pick": "diverse", "quota": "condition", "fill_from_failed": True},
    "highest_fill": {"pick": "highest", "quota": "condition", "fill_from_failed": True},
    # the same labels per iteration (max_candidates x systems) as one budget shared by uncertain frames
    "diverse_budget": {"pick": "diverse", "quota": "condition", "fill_from_failed": True, "budget": "same"},
    "diverse_budget_hi": BUDGET_HI,
    # the same shares and trust levels, k-means++ seeding (D^2 sampling) in descriptor space
    "kmeanspp_budget_hi": dict(BUDGET_HI, pick="kmeanspp"),
    # the same shares and trust levels, DP-GEN's random pick inside each condition's candidates
    "random_budget_hi": dict(BUDGET_HI, pick="random"),
    # k-means++ for half the picks, uniform draws for the other half (select.random_fraction 0.5)
    "kmeanspp_half_random": dict(BUDGET_HI, pick="kmeanspp", random_fraction=0.5),
    # k-means++ with each system's share split over its conditions by their uncertain frames, not evenly
    "kmeanspp_budget_cond": dict(BUDGET_HI, pick="kmeanspp", quota="condition_weighted"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def campaign_config(work: pathlib.Path, variant: str) -> dict:
    from ase.build import bulk

    cfg = yaml.safe_load((ROOT / "bench" / "science" / "campaign.yaml").read_text())
    vac = work / "Cu_vac.extxyz"
    if not vac.exists():
        a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
        del a[13]
        a.write(vac)
    cfg["systems"]["Cu_vac"]["structure"]["file"] = str(vac)
    cfg["select"] = dict(cfg.get("select", {}), **VARIANTS[variant])
    if cfg["select"].get("budget") == "same":  # as many labels per iteration as max_candidates per system
        cfg["select"]["budget"] = cfg["select"]["max_candidates"] * len(cfg["systems"])
        cfg["select"]["max_candidates"] = cfg["select"]["budget"]
    return cfg


def run_campaign(work: pathlib.Path, variant: str) -> pathlib.Path:
    """The workflow on the campaign config, in work/campaign.<variant>; returns its results folder."""
    wd = work / f"campaign.{variant}"
    if (wd / "results" / "models" / "final").is_dir():
        log(f"campaign {variant}: done earlier ({wd})")
        return wd / "results"
    wd.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "workflow", "config", "profiles", "envs"):
        dst = wd / name
        if not dst.exists():
            (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, dst)
    (wd / "campaign.yaml").write_text(yaml.safe_dump(campaign_config(work, variant), sort_keys=False))
    log(f"campaign {variant}: snakemake in {wd} (log: {wd / 'snakemake.log'})")
    t0 = time.time()
    with open(wd / "snakemake.log", "w") as fh:
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "snakemake",
                "--profile",
                "profiles/local",
                "--configfile",
                "campaign.yaml",
                "--cores",
                "2",
            ],
            cwd=wd,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    if p.returncode:
        raise SystemExit(f"campaign {variant} failed: see {wd / 'snakemake.log'}")
    (wd / "wall.json").write_text(json.dumps({"wall_s": time.time() - t0}))
    log(f"campaign {variant}: {time.time() - t0:.0f} s")
    return wd / "results"


def _label(atoms):
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    a = atoms.copy()
    a.calc = EMT()
    e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress(voigt=False)
    a.calc = SinglePointCalculator(a, energy=e, forces=f, stress=s)
    return a


def emt_md_frames(atoms, t: float, rng, equil: int, every: int, n: int) -> list:
    """EMT Langevin MD of ``atoms`` at ``t`` K (2 fs, friction 0.02, Maxwell-Boltzmann start from ``rng``):
    ``n`` EMT-labelled frames, one every ``every`` steps after ``equil`` steps (the test and floor sets)."""
    from ase import units
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms.calc = EMT()
    MaxwellBoltzmannDistribution(atoms, temperature_K=t, rng=rng)
    md = Langevin(atoms, 2 * units.fs, temperature_K=t, friction=0.02, rng=rng)
    md.run(equil)
    frames = []
    for _ in range(n):
        md.run(every)
        frames.append(_label(atoms))
    return frames


def test_set(work: pathlib.Path, cfg: dict) -> dict[str, pathlib.Path]:
    """EMT Langevin MD of every start structure at TEST_TEMPS -> {"<system>@<T>": deepmd/npy folder}."""
    from dpsnake.workflow.dataset import write_system
    from dpsnake.workflow.structures import build_structure

    out = {}
    for si, (name, sysd) in enumerate(cfg["systems"].items()):
        for t in TEST_TEMPS:
            folder = work / "test" / f"{name}@{t}"
            out[f"{name}@{t}"] = folder
            if (folder / "type.raw").exists():
                continue
            rng = np.random.default_rng(1000 + 10 * si + TEST_TEMPS.index(t))
            frames = emt_md_frames(build_structure(sysd["structure"]), t, rng, equil=300, every=50, n=12)
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            write_system(tmp, frames, [], cfg["type_map"])
            tmp.rename(folder)
    log(f"test set: {len(out)} (system, temperature) groups x 12 frames")
    return out


def pool(results: pathlib.Path, k: int, min_dist: float) -> list[tuple]:
    """(iteration, walker, step, system) of every explored frame of iterations 0..k that passes the
    workflow's min_dist filter, in time order per walker."""
    from dpsnake.md.trajectory import read_frames
    from dpsnake.workflow.candidates import structure_problem

    cache = results.parent.parent / f"pool.{results.parent.name}.json"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    rows = []
    for it in range(k + 1):
        key = str(it)
        if key not in known:
            explore = results / f"iter.{it:06d}" / "explore"
            walkers = json.loads((explore / "walkers.json").read_text())
            known[key] = []
            for w in walkers:
                traj = explore / w["name"] / "traj.extxyz"
                if not traj.exists():
                    continue
                for a in read_frames(traj):
                    if structure_problem(a, min_dist, 0.0, (0, 1e9), None) is None:
                        known[key].append([it, w["name"], int(a.info["step"]), w["system"]])
            cache.write_text(json.dumps(known))
        rows += [tuple(r) for r in known[key]]
    return rows


def _frame(results: pathlib.Path, it: int, walker: str, step: int, cache: dict):
    from dpsnake.md.trajectory import read_frames

    path = results / f"iter.{it:06d}" / "explore" / walker / "traj.extxyz"
    if path not in cache:
        cache[path] = {int(a.info["step"]): a for a in read_frames(path)}
    return cache[path][step]


def write_set(
    results: pathlib.Path, picks: list[tuple], folder: pathlib.Path, type_map: list[str], frames_cache: dict
) -> pathlib.Path:
    """Label the picked pool frames with EMT and write them as deepmd/npy systems under ``folder``."""
    from dpsnake.workflow.dataset import write_system

    if folder.exists():
        return folder
    by_sys: dict[str, list] = {}
    for it, walker, step, system in picks:
        by_sys.setdefault(system, []).append(_label(_frame(results, it, walker, step, frames_cache)))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for system, frames in by_sys.items():
        write_system(tmp / system, frames, [], type_map)
    tmp.rename(folder)
    return folder


def even_picks(rows: list[tuple], n: int) -> list[tuple]:
    """n frames at even intervals through the pool in time order (walker by walker)."""
    if n >= len(rows):
        return list(rows)
    return [rows[i] for i in np.linspace(0, len(rows) - 1, n).round().astype(int)]


def random_picks(rows: list[tuple], n: int, seed: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(rows), size=min(n, len(rows)), replace=False))
    return [rows[i] for i in idx]


def train_config(work: pathlib.Path, cfg: dict, steps: int) -> pathlib.Path:
    from dpsnake.workflow.config import validate_schema

    raw = {
        "type_map": cfg["type_map"],
        "systems": {"Cu": cfg["systems"]["Cu"]},
        "explore": {"stages": [{"temperatures": [300]}]},
        "train": dict(cfg["train"], numb_models=1, numb_steps=steps, init_from_previous=False),
    }
    raw["train"]["input"] = json.loads(json.dumps(cfg["train"]["input"]))
    raw["train"]["input"]["training"]["save_freq"] = steps
    path = work / f"train.{steps}.json"
    path.write_text(json.dumps(validate_schema(raw)))
    return path


def train(tcfg: pathlib.Path, out: pathlib.Path, data: list, seed: int) -> pathlib.Path:
    """``dpsnake train`` from scratch (model index = seed); skipped when out/model.dp exists."""
    if (out / "model.dp").exists():
        return out / "model.dp"
    cmd = [
        sys.executable,
        "-m",
        "dpsnake.cli",
        "train",
        "--config",
        str(tcfg),
        "--iter",
        "0",
        "--model",
        str(seed),
        "--outdir",
        str(out),
        "--threads",
        "1",
        "--on-cpu",
        "1",
        "--data",
        *map(str, data),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), CUDA_VISIBLE_DEVICES="")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(f"training {out} failed:\n" + (p.stdout + p.stderr)[-3000:])
    return out / "model.dp"


def score(model: pathlib.Path, test: dict[str, pathlib.Path]) -> dict:
    """Force RMSE (eV/A) over all test atoms, and per test group; with the built-in engine (exact)."""
    from dpsnake import DeepPot

    dp = DeepPot(str(model))
    sq, n, groups = 0.0, 0, {}
    for name, folder in test.items():
        coord = np.load(folder / "set.000" / "coord.npy")
        box = np.load(folder / "set.000" / "box.npy")
        f_ref = np.load(folder / "set.000" / "force.npy")
        atype = np.loadtxt(folder / "type.raw", dtype=int, ndmin=1)
        _, f, _ = dp.eval(coord, box, atype)
        d2 = (np.asarray(f).reshape(len(coord), -1) - f_ref) ** 2
        groups[name] = float(np.sqrt(d2.mean()))
        sq += float(d2.sum())
        n += d2.size
    return {"force_rmse": float(np.sqrt(sq / n)), "groups": groups}


def workflow_counts(results: pathlib.Path) -> list[int]:
    """Labels the workflow added per iteration (frames of results/data/iter.N)."""
    from dpsnake.workflow.dataset import system_folders

    out, it = [], 0
    while (results / "data" / f"iter.{it:06d}").is_dir():
        out.append(
            sum(
                np.load(b).shape[0]
                for f in system_folders([results / "data" / f"iter.{it:06d}"])
                for b in f.glob("set.*/box.npy")
            )
        )
        it += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="diverse")
    ap.add_argument("--seeds", type=int, default=2, help="trainings (seeds) per training set")
    ap.add_argument("--draws", type=int, default=2, help="random draws per point")
    ap.add_argument(
        "--steps", type=int, default=6000, help="training steps of every learning-curve model (3000: training-limited)"
    )
    ap.add_argument("--jobs", type=int, default=2, help="trainings at once")
    ap.add_argument("--work", default="/tmp/bench_science")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "science_selection_cpu.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "img" / "science_learning_curve.png"))
    args = ap.parse_args()
    t_start = time.time()
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = campaign_config(work, args.variant)
    results = run_campaign(work, args.variant)
    test = test_set(work, cfg)
    counts = workflow_counts(results)
    tcfg = train_config(work, cfg, args.steps)
    init = results / "data" / "init"
    sets = work / f"sets.{args.variant}"
    min_dist = cfg["select"].get("min_dist", 1.0)
    # every training job: (strategy, n labels, draw, seed, data roots)
    jobs, frames_cache = [], {}
    for s in range(args.seeds):
        jobs.append(("init only", 0, 0, s, [init]))
    for k in range(len(counts)):
        n = int(sum(counts[: k + 1]))
        rows = pool(results, k, min_dist)
        log(f"point {k}: {n} workflow labels, pool of {len(rows)} frames")
        wf = [init] + [results / "data" / f"iter.{j:06d}" for j in range(k + 1)]
        ev = write_set(results, even_picks(rows, n), sets / f"even.{k}", cfg["type_map"], frames_cache)
        for s in range(args.seeds):
            jobs.append(("workflow", n, 0, s, wf))
            jobs.append(("even interval", n, 0, s, [init, ev]))
        for d in range(args.draws):
            r1 = write_set(
                results, random_picks(rows, n, 100 * k + d), sets / f"random.{k}.{d}", cfg["type_map"], frames_cache
            )
            r2 = write_set(
                results,
                random_picks(rows, 2 * n, 100 * k + 50 + d),
                sets / f"random2x.{k}.{d}",
                cfg["type_map"],
                frames_cache,
            )
            for s in range(args.seeds):
                jobs.append(("random", n, d, s, [init, r1]))
                jobs.append(("random 2x", 2 * n, d, s, [init, r2]))
    log(f"{len(jobs)} trainings of {args.steps} steps, {args.jobs} at a time")
    models = work / f"models.{args.variant}.{args.steps}"

    def one(job):
        strat, n, d, s, data = job
        out = models / f"{strat.replace(' ', '_')}.{n}.{d}.{s}"
        return job, score(train(tcfg, out, data, s), test)

    rows_out = []
    with cf.ThreadPoolExecutor(args.jobs) as ex:
        for i, (job, sc) in enumerate(ex.map(one, jobs)):
            strat, n, d, s, _ = job
            rows_out.append({"strategy": strat, "labels": n, "draw": d, "seed": s, **sc})
            log(f"{i + 1}/{len(jobs)} {strat:14s} n={n:4d} draw {d} seed {s}: force RMSE {sc['force_rmse']:.4f}")
    summary = summarize(rows_out)
    print_table(summary, args)
    result = {
        "variant": args.variant,
        "select": cfg["select"],
        "steps": args.steps,
        "seeds": args.seeds,
        "draws": args.draws,
        "labels_per_iteration": counts,
        "test_temperatures": list(TEST_TEMPS),
        "campaign_wall_s": json.loads((results.parent / "wall.json").read_text())["wall_s"]
        if (results.parent / "wall.json").exists()
        else None,
        "wall_s": time.time() - t_start,
        "summary": summary,
        "runs": rows_out,
    }
    from dpsnake.fsio import write_json_atomic

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    allres = json.loads(out.read_text()) if out.exists() else {}
    allres[f"{args.variant}@{args.steps}"] = result  # one entry per variant and training length
    write_json_atomic(out, allres)
    plot(allres, pathlib.Path(args.plot))
    log(f"wrote {out} and {args.plot}")


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and spread (std over draws x seeds) of the force RMSE per (strategy, labels); for the other
    arms, ``p_workflow_lower``: one-sided t-test p-value, paired by training seed, that the workflow's
    mean error at the same point (random 2x: at half its labels) is lower than the arm's (scipy; None
    with fewer than 2 seeds in both). Paired, with an arm's draws averaged per seed: trainings of one
    seed share their initial weights and batch order, so their errors correlate (0.2-0.6 between the
    workflow and random here) and the draws of a seed are not independent samples."""
    from scipy.stats import ttest_rel

    def per_seed(rs: list[dict]) -> dict:
        by = {}
        for r in rs:
            by.setdefault(r["seed"], []).append(r["force_rmse"])
        return {s: float(np.mean(v)) for s, v in by.items()}

    out = {}
    for r in rows:
        out.setdefault((r["strategy"], r["labels"]), []).append(r)
    summ = []
    for (strat, n), rs in sorted(out.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        f = np.array([r["force_rmse"] for r in rs])
        groups = {g: float(np.mean([r["groups"][g] for r in rs])) for g in rs[0]["groups"]}
        wf = per_seed(out.get(("workflow", n // 2 if strat == "random 2x" else n), []))
        arm = per_seed(rs)
        seeds = sorted(set(wf) & set(arm))
        p = None
        if strat not in ("workflow", "init only") and len(seeds) > 1:
            p = float(ttest_rel([wf[s] for s in seeds], [arm[s] for s in seeds], alternative="less").pvalue)
        summ.append(
            {
                "strategy": strat,
                "labels": n,
                "force_rmse": float(f.mean()),
                "force_rmse_std": float(f.std()),
                "runs": len(rs),
                "p_workflow_lower": p,
                "groups": groups,
            }
        )
    return summ


def print_table(summary: list[dict], args) -> None:
    wf = {s["labels"]: s["force_rmse"] for s in summary if s["strategy"] == "workflow"}
    print(
        f"\nvariant {args.variant}: {args.steps} training steps, {args.seeds} seeds, {args.draws} random draws; "
        "test force RMSE (eV/A) on EMT MD at " + "/".join(map(str, TEST_TEMPS)) + " K"
    )
    print(f"{'strategy':14s} {'labels':>6s} {'force RMSE':>18s} {'vs workflow':>12s} {'p paired (wf lower)':>19s}")
    for s in summary:
        ref = wf.get(s["labels"] if s["strategy"] != "random 2x" else s["labels"] // 2)
        ratio = f"{s['force_rmse'] / ref:11.2f}x" if ref else ""
        p = f"{s['p_workflow_lower']:19.3f}" if s.get("p_workflow_lower") is not None else ""
        print(f"{s['strategy']:14s} {s['labels']:6d} {s['force_rmse']:9.4f} +- {s['force_rmse_std']:.4f} {ratio} {p}")


def plot(allres: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = min(4, len(allres))  # a grid of 4 panels a row: readable on a page
    nrow = -(-len(allres) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 4 * nrow), squeeze=False)
    for ax in axes.flat[len(allres) :]:
        ax.set_visible(False)
    for ax, (variant, res) in zip(axes.flat, sorted(allres.items())):
        by = {}
        for s in res["summary"]:
            by.setdefault(s["strategy"], []).append(s)
        for strat, ss in by.items():
            if strat == "init only":
                ax.axhline(ss[0]["force_rmse"], color="grey", ls=":", label="init data only")
                continue
            ss = sorted(ss, key=lambda s: s["labels"])
            ax.errorbar(
                [s["labels"] for s in ss],
                [s["force_rmse"] for s in ss],
                yerr=[s["force_rmse_std"] for s in ss],
                marker="o",
                capsize=3,
                label=strat,
            )
        ax.set_xlabel("labels picked from exploration")
        ax.set_ylabel("test force RMSE (eV/A)")
        ax.set_title(f"select: {variant} training steps")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
