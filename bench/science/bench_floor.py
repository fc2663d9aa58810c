"""How low can the science benchmark's network go with plenty of data? (issue 18: is a learning curve of
``bench_selection.py`` limited by its labels or by its training?), CPU.

Trains the campaign's network (``bench/science/campaign.yaml``) from scratch on a large training set made
the way the benchmark's test set is made (EMT Langevin MD of every start structure at 300-1600 K, other
seeds: ``--frames`` frames per system and temperature, every 25 steps after 200 of equilibration), for
several training lengths, network sizes and batch sizes, and scores each on the benchmark's test set
(force RMSE, eV/A). If more steps lower the RMSE much more than more data would, the learning curves
are training-limited and cannot separate selection strategies: their ``--steps`` must be raised.

Prints a table and writes ``bench/results/science_floor_cpu.json``. Work files (the training set, the
models) live under ``--work`` (shared with ``bench_selection.py``: the same test set).

    python bench/science/bench_floor.py [--frames 20] [--cases small3k,small6k,mid3k,mid6k,small3k_b4,small2k_b8]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import pathlib
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_selection as bs  # noqa: E402

MID = ({"neuron": [16, 32], "axis_neuron": 8}, {"neuron": [48, 48]})
# case -> (training steps, descriptor overrides, fitting overrides, batch size)
CASES = {
    "small3k": (3000, None, None, 1),
    "small6k": (6000, None, None, 1),
    "mid3k": (3000, *MID, 1),
    "mid6k": (6000, *MID, 1),
    "small3k_b4": (3000, None, None, 4),
    "small2k_b8": (2000, None, None, 8),
}


def training_set(work: pathlib.Path, cfg: dict, frames: int) -> pathlib.Path:
    """EMT Langevin MD frames of every system at every test temperature (seeds apart from the test set's)."""
    from dpsnake.workflow.dataset import write_system
    from dpsnake.workflow.structures import build_structure

    out = work / f"floor_train.{frames}"
    if out.exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for si, (name, sysd) in enumerate(cfg["systems"].items()):
        labelled = []
        for ti, t in enumerate(bs.TEST_TEMPS):
            rng = np.random.default_rng(5000 + 10 * si + ti)
            labelled += bs.emt_md_frames(build_structure(sysd["structure"]), t, rng, equil=200, every=25, n=frames)
        write_system(tmp / name, labelled, [], cfg["type_map"])
    tmp.rename(out)
    bs.log(f"training set: {len(cfg['systems'])} systems x {len(bs.TEST_TEMPS)} temperatures x {frames} frames")
    return out


def case_config(work: pathlib.Path, cfg: dict, case: str) -> pathlib.Path:
    steps, desc, fit, batch = CASES[case]
    c = copy.deepcopy(cfg)
    c["train"]["input"]["model"]["descriptor"].update(desc or {})
    c["train"]["input"]["model"]["fitting_net"].update(fit or {})
    c["train"]["input"]["training"]["training_data"]["batch_size"] = batch
    folder = work / "floor" / case
    folder.mkdir(parents=True, exist_ok=True)
    return bs.train_config(folder, c, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20, help="training frames per system and temperature")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    ap.add_argument("--jobs", type=int, default=2, help="trainings at once")
    ap.add_argument("--work", default="/tmp/bench_science")
    ap.add_argument("--out", default=str(bs.ROOT / "bench" / "results" / "science_floor_cpu.json"))
    args = ap.parse_args()
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"--cases: unknown {', '.join(unknown)} (known: {', '.join(CASES)})")
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = bs.campaign_config(work, "diverse")
    test = bs.test_set(work, cfg)
    train_set = training_set(work, cfg, args.frames)

    def one(case):
        t0 = time.time()
        model = bs.train(case_config(work, cfg, case), work / "floor" / case / f"model.{args.frames}", [train_set], 0)
        return case, time.time() - t0, bs.score(model, test)["force_rmse"]

    rows = []
    with cf.ThreadPoolExecutor(args.jobs) as ex:
        for case, wall, rmse in ex.map(one, cases):
            steps, desc, fit, batch = CASES[case]
            rows.append(
                {
                    "case": case,
                    "steps": steps,
                    "batch_size": batch,
                    "descriptor": desc,
                    "fitting_net": fit,
                    "train_s": wall,
                    "force_rmse": rmse,
                }
            )
            bs.log(f"{case}: {steps} steps, batch {batch}: force RMSE {rmse:.4f} eV/A ({wall:.0f} s)")
    n = len(cfg["systems"]) * len(bs.TEST_TEMPS) * args.frames
    print(f"\ntraining set {n} EMT MD frames; test force RMSE (eV/A) on the benchmark's test set")
    print(f"{'case':12s} {'steps':>6s} {'batch':>5s} {'RMSE':>8s} {'train s':>8s}")
    for r in rows:
        print(f"{r['case']:12s} {r['steps']:6d} {r['batch_size']:5d} {r['force_rmse']:8.4f} {r['train_s']:8.0f}")
    from dpsnake.fsio import write_json_atomic

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, {"training_frames": n, "frames_per_group": args.frames, "rows": rows})
    bs.log(f"wrote {out}")


if __name__ == "__main__":
    main()
