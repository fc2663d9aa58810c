"""Continued training vs training from scratch (issue 18 item 1), on the CPU with the demo's network.

Three iterations of growing EMT Cu data, as the loop makes them: ``init`` (scaled + perturbed fcc cells,
the demo's init data), then frames of EMT molecular dynamics at 300-600 K (``iter.000000``) and
900-1200 K (``iter.000001``). Each model is trained by ``dpsnake train`` with the demo's ``train``
section (``numb_steps`` 1500, ``init_numb_steps`` 1000, learning rate 3e-3 -> 1e-4):

- ``reset`` / ``continue``: 1500 steps on init, +1000 on init + iter.0, +1000 on all three
  (``train.init_lr_schedule``), 3500 steps in all;
- ``scratch``: 3500 steps from random weights on all three datasets (the same final data and total steps).

``--scale N`` multiplies the steps (N x 1500, N x 1000). Trained models are kept under ``--work`` and
reused by a rerun (only the table is recomputed). Results: bench/results/continuation_<backend>[_xN]_cpu.json
(--out elsewhere), docs/benchmarks.md "Continued training".

The final models are compared by their force and energy RMSE on a held-out set (EMT MD frames at
300-1200 K, other seeds), per seed (the ensemble's model index k gives other seeds) and on average.

``reset`` runs without a warm-up (``train.init_lr_warmup: 0``, DeePMD-kit's plain restart); ``reset_warm``
is ``reset`` whose continuations ramp the learning rate up from 0 over their first fraction R of steps
(``train.init_lr_warmup`` R, ``--continuation-warmup``, default 0.1 as the schema's; 0: not run), from the
same ``it0`` models.

    python bench/bench_continuation.py [--backend tf|pt] [--seeds 3] [--scale 1] [--continuation-warmup 0.1]
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
from benchutil import results_path, write_results

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's start-up chatter in the table's output
ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = {
    "numb_models": 1,
    "numb_steps": 1500,
    "init_numb_steps": 1000,
    "init_from_previous": True,
    "seed": 1,
    "threads": 1,
    "input": {
        "model": {
            "descriptor": {
                "type": "se_e2_a",
                "rcut": 4.5,
                "rcut_smth": 1.0,
                "sel": [48, 48],
                "neuron": [8, 16],
                "axis_neuron": 4,
            },
            "fitting_net": {"neuron": [24, 24], "resnet_dt": True},
        },
        "learning_rate": {"type": "exp", "start_lr": 0.003, "stop_lr": 0.0001, "decay_steps": 100},
        "loss": {
            "type": "ener",
            "start_pref_e": 0.02,
            "limit_pref_e": 1,
            "start_pref_f": 1000,
            "limit_pref_f": 1,
            "start_pref_v": 0.02,
            "limit_pref_v": 1,
        },
        "training": {"training_data": {"batch_size": 1}, "disp_freq": 100, "save_freq": 1500},
    },
}


def _cell():
    from ase.build import bulk

    return bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))


def _write(frames, folder: pathlib.Path) -> None:
    import dpdata

    ms = None
    for a in frames:
        s = dpdata.LabeledSystem(a, fmt="ase/structure")
        ms = s if ms is None else ms + s
    ms.to_deepmd_npy(str(folder), type_map=["Cu", "Ni"])


def _label(a):
    from ase.calculators.emt import EMT

    a.calc = EMT()
    a.get_potential_energy()
    return a


def init_frames(seed: int) -> list:
    """The demo's init data: 3 scales x 4 perturbed copies (cell 2 %, atoms 0.08 A)."""
    rng = np.random.default_rng(seed)
    out = []
    for scale in (0.97, 1.0, 1.03):
        for _ in range(4):
            a = _cell()
            strain = np.eye(3) * scale + rng.uniform(-0.02, 0.02, (3, 3))
            a.set_cell(a.cell.array @ strain, scale_atoms=True)
            a.positions += rng.uniform(-0.08, 0.08, a.positions.shape)
            out.append(_label(a))
    return out


def md_frames(temps, n_per_temp: int, seed: int) -> list:
    """EMT Langevin MD frames (2 fs, every 40 steps after 200 steps of equilibration; the science
    benchmark's :func:`emt_md_frames`), cell scaled by -2..+3 % per run (what NPT exploration at 0-10 kbar
    and high T visits)."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "science"))
    from bench_selection import emt_md_frames

    rng = np.random.default_rng(seed)
    out = []
    for t in temps:
        a = _cell()
        a.set_cell(a.cell.array * (1 + rng.uniform(-0.02, 0.03)), scale_atoms=True)
        out += emt_md_frames(a, t, rng, equil=200, every=40, n=n_per_temp)
    return out


def make_data(work: pathlib.Path) -> dict:
    d = {
        "init": work / "data" / "init",
        "it0": work / "data" / "iter.000000",
        "it1": work / "data" / "iter.000001",
        "test": work / "data" / "test",
    }
    if not (d["test"] / "Cu" / "type.raw").exists():
        _write(init_frames(0), d["init"] / "Cu")
        _write(md_frames([300, 450, 600], 8, 1), d["it0"] / "Cu")
        _write(md_frames([900, 1050, 1200], 8, 2), d["it1"] / "Cu")
        _write(md_frames([300, 600, 900, 1200], 10, 99), d["test"] / "Cu")
    return d


def config(
    work: pathlib.Path, backend: str, schedule: str, scale: int = 1, numb_steps: int | None = None, warmup=None
) -> pathlib.Path:
    """The resolved dpsnake config of one variant (``schedule``: scratch, continue, reset; ``warmup``:
    ``train.init_lr_warmup``), written under ``work``; returns its path."""
    sys.path.insert(0, str(ROOT / "src"))
    from dpsnake.workflow.config import validate_schema

    raw = {
        "type_map": ["Cu", "Ni"],
        "systems": {"Cu": {"structure": {"builder": "bulk", "kwargs": {"name": "Cu", "cubic": True}}}},
        "explore": {"stages": [{"temperatures": [300]}]},
        "train": dict(
            TRAIN,
            backend=backend,
            numb_steps=numb_steps or TRAIN["numb_steps"] * scale,
            init_numb_steps=TRAIN["init_numb_steps"] * scale,
            init_lr_schedule="continue" if schedule == "scratch" else schedule,
        ),
    }
    raw["train"]["init_lr_warmup"] = warmup or 0.0
    path = work / f"config.{backend}.{schedule}.x{scale}{f'.warm{warmup:g}' if warmup else ''}.json"
    path.write_text(json.dumps(validate_schema(raw)))
    return path


def train(cfg, it: int, k: int, out: pathlib.Path, data: list, init_from=None) -> float:
    """`dpsnake train`; returns the wall time (s). Skipped when out/model.dp exists (rerun to resume)."""
    if (out / "model.dp").exists():
        return json.loads((out / "wall.json").read_text())["wall_s"]
    cmd = [
        sys.executable,
        "-m",
        "dpsnake.cli",
        "train",
        "--config",
        str(cfg),
        "--iter",
        str(it),
        "--model",
        str(k),
        "--outdir",
        str(out),
        "--threads",
        "1",
        "--on-cpu",
        "1",
        "--data",
        *map(str, data),
    ]
    if init_from:
        cmd += ["--init-from", str(init_from)]
    t0 = time.time()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), CUDA_VISIBLE_DEVICES="")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit((p.stdout + p.stderr)[-3000:])
    wall = time.time() - t0
    (out / "wall.json").write_text(json.dumps({"wall_s": wall}))
    return wall


def rmse(model: pathlib.Path, test: pathlib.Path) -> dict:
    """Force RMSE (eV/A) and energy RMSE per atom (meV/atom) of a frozen model on a deepmd/npy system."""
    from deepmd.infer import DeepPot

    dp = DeepPot(str(model))
    coord = np.load(test / "set.000" / "coord.npy")
    box = np.load(test / "set.000" / "box.npy")
    f_ref = np.load(test / "set.000" / "force.npy")
    e_ref = np.load(test / "set.000" / "energy.npy").ravel()
    atype = np.loadtxt(test / "type.raw", dtype=int)
    e, f, _ = dp.eval(coord, box, atype)
    nat = len(atype)
    return {
        "force_rmse": float(np.sqrt(np.mean((f.reshape(len(coord), -1) - f_ref) ** 2))),
        "energy_rmse_meV_atom": float(1000 * np.sqrt(np.mean(((e.ravel() - e_ref) / nat) ** 2))),
    }


def lr_trace(folder: pathlib.Path) -> list:
    """(first step, first lr, last step, last lr) of an lcurve.out."""
    rows = np.loadtxt(folder / "lcurve.out", ndmin=2)
    return [int(rows[0, 0]), float(rows[0, -1]), int(rows[-1, 0]), float(rows[-1, -1])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("tf", "pt"), default="tf")
    ap.add_argument("--seeds", type=int, default=3, help="models (seeds) per variant")
    ap.add_argument(
        "--first-seed",
        type=int,
        default=None,
        help="seeds first-seed .. first-seed + seeds - 1; the result file's other seeds are kept and summarised "
        "with them (more seeds for an earlier run of the same steps and network). Without it: seeds 0.., the "
        "file replaced",
    )
    ap.add_argument("--work", default="/tmp/bench_continuation")
    ap.add_argument("--scale", type=int, default=1, help="steps x this (1: the demo's 1500 + 1000 + 1000)")
    ap.add_argument(
        "--continuation-warmup",
        type=float,
        default=0.1,
        help="reset_warm: reset with this train.init_lr_warmup (0: not run; reset itself has none)",
    )
    ap.add_argument("--schedules", default=None, help="continuation variants to run (default: all)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    warm = args.continuation_warmup
    schedules = ["continue", "reset"] + (["reset_warm"] if warm else [])
    if args.schedules:
        schedules = [s for s in args.schedules.split(",") if s]
        if not set(schedules) <= {"continue", "reset", "reset_warm"} or ("reset_warm" in schedules and not warm):
            raise SystemExit(f"--schedules {args.schedules}: continue, reset, reset_warm (with --continuation-warmup)")
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    d = make_data(work)
    chunks = [[d["init"]], [d["init"], d["it0"]], [d["init"], d["it0"], d["it1"]]]
    frozen = "frozen_model.pb" if args.backend == "tf" else "frozen_model.pth"
    tag = args.backend + (f"_x{args.scale}" if args.scale > 1 else "")
    # from scratch: the final data, 1500 + 1000 + 1000 steps (x scale) in one run
    total = sum(TRAIN["numb_steps" if it == 0 else "init_numb_steps"] for it in range(3)) * args.scale
    rows = []
    first = args.first_seed or 0
    for k in range(first, first + args.seeds):
        base = work / tag / f"seed{k}"
        res = {"seed": k}
        cfg_s = config(work, args.backend, "scratch", args.scale, numb_steps=total)
        wall = train(cfg_s, 0, k, base / "scratch", chunks[2])
        res["scratch"] = dict(
            rmse(base / "scratch" / frozen, d["test"] / "Cu"), wall_s=wall, lcurve=[lr_trace(base / "scratch")]
        )
        it0 = base / "it0"
        w0 = train(config(work, args.backend, "continue", args.scale), 0, k, it0, chunks[0])
        for schedule in schedules:
            kind = "reset" if schedule == "reset_warm" else schedule
            cfg = config(work, args.backend, kind, args.scale, warmup=warm if schedule == "reset_warm" else None)
            prev, walls, traces = it0, [w0], [lr_trace(it0)]
            for it in (1, 2):
                out = base / f"{schedule}{it}"
                walls.append(train(cfg, it, k, out, chunks[it], init_from=prev))
                traces.append(lr_trace(out))
                prev = out
            res[schedule] = dict(rmse(prev / frozen, d["test"] / "Cu"), wall_s=sum(walls), lcurve=traces)
        rows.append(res)
        print(json.dumps(res), flush=True)
    path = results_path(args.out, f"continuation_{tag}", "cpu")
    if args.first_seed is not None and path is not None and path.exists():  # the earlier run's other seeds
        old = json.loads(path.read_text())
        ow = old.get("continuation_warmup")
        if old["total_steps"] != total or old["train"] != TRAIN or (ow and warm and ow != warm):
            raise SystemExit(f"{path}: its seeds ran other steps, network or warm-up; --first-seed adds to it only")
        by_seed = {r["seed"]: r for r in old["per_seed"]}
        for r in rows:  # a seed's variants of this run replace the file's, its others stay
            by_seed[r["seed"]] = {**by_seed.get(r["seed"], {}), **r}
        rows = [by_seed[s] for s in sorted(by_seed)]
        warm = warm or ow
    summary = {}
    print(f"\n{args.backend}: {len(rows)} seeds, {total} steps in all, held-out EMT MD frames 300-1200 K")
    print(
        f"{'variant':10s} {'seeds':>5s} {'force RMSE eV/A':>18s} {'vs scratch':>11s} {'E RMSE meV/atom':>16s} {'wall s':>7s}"
    )
    for v in ("scratch", "continue", "reset", "reset_warm"):
        have = [r for r in rows if v in r]  # a variant run on some seeds only: against scratch on those
        if not have:
            continue
        f = [r[v]["force_rmse"] for r in have]
        s = summary[v] = {
            "seeds": len(have),
            "force_rmse_mean": float(np.mean(f)),
            "force_rmse_std": float(np.std(f)),
            "energy_rmse_mean": float(np.mean([r[v]["energy_rmse_meV_atom"] for r in have])),
            "wall_s_mean": float(np.mean([r[v]["wall_s"] for r in have])),
            "vs_scratch": float(np.mean(f) / np.mean([r["scratch"]["force_rmse"] for r in have]) - 1),
        }
        print(
            f"{v:10s} {len(have):5d} {s['force_rmse_mean']:10.4f} +- {s['force_rmse_std']:.4f} "
            f"{100 * s['vs_scratch']:+10.1f}% {s['energy_rmse_mean']:16.2f} {s['wall_s_mean']:7.0f}"
        )
    write_results(
        path,
        {
            "backend": args.backend,
            "scale": args.scale,
            "total_steps": total,
            "train": TRAIN,
            "continuation_warmup": warm,
            "per_seed": rows,
            "summary": summary,
        },
    )


if __name__ == "__main__":
    main()
