"""Builds a small results/ tree the real way, for the report tests (imported by test_report*.py).

Two iterations, systems Cu and CuNi, an ensemble of two real DeePMD-kit models (type_map Cu, Ni),
EMT-labelled deepmd/npy data written by dpdata, model deviations computed by DeePMD-kit's
``calc_model_devi`` on rattled "walker" frames and written as model_devi.out, stats.json classified
from those deviations with the documented trust rule, new labels from EMT for the selected
candidates, real Snakemake benchmark files. No numbers are typed in: each file is derived from the
previous stage, as the workflow would.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
from dpmodels import SEED2  # noqa: F401 (report tests use tree.SEED2)

SYSTEMS = {"Cu": "Cu", "CuNi": "CuNi"}
TEMPS = [300.0, 900.0]


def emt_frames(kind: str, nframes: int, seed: int, amp: float = 0.08):
    """Rattled fcc 2x2x2 cells (32 atoms) as ase.Atoms with EMT energies/forces attached."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(nframes):
        a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
        if kind == "CuNi":
            a.symbols[rng.permutation(len(a))[: len(a) // 2]] = "Ni"
        a.set_cell(a.cell.array * (1 + 0.02 * rng.uniform(-1, 1)), scale_atoms=True)
        a.rattle(amp, seed=int(rng.integers(1 << 30)))
        a.calc = EMT()
        a.get_potential_energy()
        out.append(a)
    return out


def write_npy(frames, out: pathlib.Path) -> pathlib.Path:
    """Labelled ase.Atoms -> deepmd/npy via dpdata (type_map sorted as the models': Cu, Ni)."""
    import dpdata

    ms = None
    for a in frames:
        s = dpdata.LabeledSystem(a, fmt="ase/structure")
        ms = s if ms is None else ms + s
    names = [n for n in ("Cu", "Ni") if n in ms["atom_names"]]
    ms.to_deepmd_npy(str(out), type_map=names)
    return out


def write_model_devi(path: pathlib.Path, devi: np.ndarray) -> None:
    """devi: (nframes, 7) [step, max_v, min_v, avg_v, max_f, min_f, avg_f]; the engine's writer when it
    exists, else DeePMD-kit's (same plugin format)."""
    try:
        from dpsnake.engine.model_devi import COLUMNS
        from dpsnake.engine.model_devi import write_model_devi as w
    except ImportError:
        from deepmd.infer.model_devi import write_model_devi_out

        write_model_devi_out(devi, str(path))
        return
    w(path, devi[:, 0].astype(int), {n: devi[:, i] for i, n in enumerate(COLUMNS) if i})


def build(root: pathlib.Path, models: list[dict]) -> dict:
    """Write root/results/... and root/benchmarks/...; returns facts the tests check against."""
    from ase.io import write as ase_write
    from deepmd.infer import DeepPot
    from deepmd.infer.model_devi import calc_model_devi

    from dpsnake.workflow.candidates import decide

    res = root / "results"
    dps = [DeepPot(str(m["pb"])) for m in models]
    type_map = ["Cu", "Ni"]
    facts = {"selected": {}, "trust": {}}
    for name, kind in SYSTEMS.items():
        write_npy(emt_frames(kind, 4, seed=10 + len(name)), res / "data" / "init" / name)
    (root / "tests_data").mkdir(parents=True)
    write_npy(emt_frames("CuNi", 3, seed=99, amp=0.15), root / "tests_data" / "CuNi_hot")

    for it in range(2):
        idir = res / f"iter.{it:06d}"
        for k, m in enumerate(models):
            mdir = idir / "train" / f"model.{k}"
            mdir.mkdir(parents=True)
            for f in ("model.dp", "lcurve.out", "input.json"):
                (mdir / f).write_bytes((m["dir"] / f).read_bytes())
        walkers, summ, stats_w = [], {}, {}
        devi_all: dict[str, list[float]] = {n: [] for n in SYSTEMS}
        frames_by_walker = {}
        for name, kind in SYSTEMS.items():
            for ti, temp in enumerate(TEMPS):
                wname = f"{name}.T{int(temp)}"
                nsteps, trj = 40, 10
                # hotter walkers rattle more, as MD at higher T explores further
                frames = emt_frames(
                    kind, nsteps // trj + 1, seed=100 * it + 10 * ti + len(name), amp=0.02 + 0.1 * temp / 900 / (1 + it)
                )
                failed = name == "CuNi" and temp == 900 and it == 0  # stopped early: only 3 frames kept
                if failed:
                    frames = frames[:3]
                wdir = idir / "explore" / wname
                wdir.mkdir(parents=True)
                coord = np.array([a.positions.reshape(-1) for a in frames])
                box = np.array([a.cell.array.reshape(-1) for a in frames])
                atype = np.array([type_map.index(s) for s in frames[0].get_chemical_symbols()])
                devi = calc_model_devi(coord, box, atype, dps)
                devi[:, 0] = np.arange(len(frames)) * trj
                write_model_devi(wdir / "model_devi.out", devi)
                for a, st in zip(frames, devi[:, 0]):
                    a.info["step"] = int(st)
                ase_write(wdir / "traj.extxyz", frames, format="extxyz")
                walkers.append(
                    {
                        "name": wname,
                        "system": name,
                        "structure": "POSCAR",
                        "temperature": temp,
                        "ensemble": "nvt",
                        "nsteps": nsteps,
                        "dt": 0.002,
                        "trj_freq": trj,
                        "seed": ti,
                    }
                )
                summ[wname] = {
                    "status": "failed" if failed else "finished",
                    "reason": "max_devi_f above max_devi_f_cap" if failed else None,
                    "steps": int(devi[-1, 0]) if failed else nsteps,
                }
                stats_w[wname] = {
                    "system": name,
                    "temperature": temp,
                    "pressure": None,
                    "status": summ[wname]["status"],
                    "reason": summ[wname]["reason"],
                }
                devi_all[name] += list(devi[:, 4])
                frames_by_walker[wname] = (frames, devi[:, 4])
        (idir / "explore" / "walkers.json").write_text(json.dumps(walkers))
        (idir / "explore" / "summary.json").write_text(json.dumps({"walkers": summ}))

        # selection with the documented rule: accurate < lo <= candidate < hi <= failed
        systems, new_labels = {}, {}
        for name in SYSTEMS:
            v = np.array(devi_all[name])
            # CuNi starts below the accurate-ratio threshold (0.3), so iteration 0 does not converge
            q_lo = 0.1 if (name == "CuNi" and it == 0) else 0.3
            lo, hi = (float(x) for x in np.quantile(v, [q_lo, 0.7]))
            acc, cand, fail = int((v < lo).sum()), int(((v >= lo) & (v < hi)).sum()), int((v >= hi).sum())
            sel = min(cand, 2)
            systems[name] = {
                "accurate": acc,
                "candidate": cand,
                "failed": fail,
                "total": len(v),
                "accurate_ratio": acc / len(v),
                "candidate_ratio": cand / len(v),
                "failed_ratio": fail / len(v),
                "trust_lo": lo,
                "trust_hi": hi,
                "selected": sel,
            }
            picks = [
                (w, a, d)
                for w, (fr, dv) in frames_by_walker.items()
                if w.startswith(name + ".T")
                for a, d in zip(fr, dv)
                if lo <= d < hi
            ][:sel]
            new_labels[name] = picks
        # the decision as select takes it: one stage of up to 2 iterations, threshold 0.3
        dec = decide(systems, 0.3, it, 0, it, 1, 2, 2)
        stats = {"iteration": it, "systems": systems, "walkers": stats_w, **dec, "stage": 0, "stage_iteration": it}
        (idir / "select").mkdir(parents=True)
        (idir / "select" / "stats.json").write_text(json.dumps(stats, indent=1))

        # label (EMT again, fresh calculator) and collect with provenance; the last pick "fails"
        # (recorded, not added) so the failed-label path is exercised
        added, failures, task = {}, [], 0
        for name, picks in new_labels.items():
            ok = picks[:-1] if (name == "CuNi" and len(picks) > 1) else picks
            for _w, _a, _d in picks[len(ok) :]:
                failures.append({"task": f"task.{task + len(ok):06d}", "system": name, "reason": "SCF not converged"})
            if ok:
                from ase.calculators.emt import EMT

                labelled = []
                for _w, a, _d in ok:
                    b = a.copy()
                    b.calc = EMT()
                    b.get_potential_energy()
                    labelled.append(b)
                out = write_npy(labelled, res / "data" / f"iter.{it:06d}" / name)
                rows = ["iteration,system,walker,step,max_devi_f,task"]
                rows += [
                    f"{it},{name},{w},{a.info['step']},{float(d)!r},task.{task + i:06d}"
                    for i, (w, a, d) in enumerate(ok)
                ]
                (out / "provenance.csv").write_text("\n".join(rows) + "\n")
            task += len(picks)
            added[name] = {"added": len(ok), "failed": len(picks) - len(ok)}
        nlab = sum(v["added"] for v in added.values())
        nfail = len(failures)
        (idir / "collect").mkdir(parents=True)
        (idir / "collect" / "summary.json").write_text(
            json.dumps(
                {
                    "iteration": it,
                    "labelled": nlab,
                    "failed": nfail,
                    "failed_ratio": nfail / max(1, nlab + nfail),
                    "failures": failures,
                    "systems": added,
                }
            )
        )
        facts["selected"][it] = {n: s["selected"] for n, s in systems.items()}

    config = {
        "results_dir": str(res),
        "test_data": [str(root / "tests_data" / "CuNi_hot")],
        "convergence": {"accurate_ratio": 0.3, "max_iterations": 2},
    }
    (res / "config.json").write_text(json.dumps(config, indent=1))
    snakemake_benchmarks(root)
    return {"root": root, "results": res, "config": res / "config.json", "models": models, **facts}


BENCH_SNAKEFILE = """
rule all:
    input: expand("done/{name}.{k}", name=["train"], k=[0, 1]), "done/explore.0", "done/select.0"

rule work:
    output: "done/{name}.{k}"
    benchmark: "benchmarks/iter.000000/{name}.{k}.tsv"
    shell: "python -c 'import time; time.sleep(0.3)'; touch {output}"
"""


def snakemake_benchmarks(root: pathlib.Path) -> None:
    """Real Snakemake benchmark files for iteration 0: train.0, train.1, explore.0, select.0."""
    (root / "Snakefile").write_text(BENCH_SNAKEFILE)
    p = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "1", "--quiet"], cwd=root, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr[-3000:]
