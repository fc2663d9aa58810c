"""``dpsnake finalize``: copy the last iteration's models to ``results/models/final/`` (+ final.json
with the run's decision: converged, and why).

The folder is filled under a temporary name and renamed, so it is complete or absent.
"""

from __future__ import annotations

import json
import pathlib
import shutil

from dpsnake.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--iter", type=int, required=True, help="the last iteration")
    parser.add_argument("--stats", required=True, help="select/stats.json of the last iteration")
    parser.add_argument("--models", nargs="+", required=True, help="model folders (holding model.dp)")
    parser.add_argument("--outdir", required=True, help="results/models/final")


def decision(stats_path: pathlib.Path) -> dict:
    """The run's decision at the iteration of ``stats_path`` (results/iter.N/select/stats.json): converged
    only when every system's latest accurate ratio reaches the threshold (workflow.convergence), with the
    threshold of results/config.json; the stats.json's own decision when that config is not there."""
    from dpsnake.workflow.convergence import history_upto, run_decision

    stats = json.loads(stats_path.read_text())
    results = stats_path.resolve().parents[2]
    cfg_path = results / "config.json"
    if not cfg_path.is_file():
        return stats
    cfg = json.loads(cfg_path.read_text())
    history = history_upto(results, int(stats["iteration"]))
    if not history or history[-1].get("iteration") != stats.get("iteration"):
        return stats
    return run_decision(history, float(cfg["convergence"]["accurate_ratio"]), cfg)


def run(args) -> int:
    from dpsnake.fsio import atomic_dir, write_json_atomic

    out = pathlib.Path(args.outdir)
    with atomic_dir(out) as tmp:
        names = []
        for k, m in enumerate(args.models):
            m = pathlib.Path(m)
            if not (m / "model.dp").is_file():
                raise UserError(f"--models: {m / 'model.dp'}: no such file")
            shutil.copy2(m / "model.dp", tmp / f"model.{k}.dp")
            for frozen in ("frozen_model.pb", "frozen_model.pth"):
                if (m / frozen).is_file():
                    shutil.copy2(m / frozen, tmp / f"{pathlib.Path(frozen).stem}.{k}{pathlib.Path(frozen).suffix}")
            names.append(f"model.{k}.dp")
        dec = decision(pathlib.Path(args.stats))
        write_json_atomic(
            tmp / "final.json",
            {
                "iteration": args.iter,
                "models": names,
                "converged": dec.get("converged"),
                "reason": dec.get("reason"),
                "sources": [str(m) for m in args.models],
            },
        )
    print(f"finalize: {len(names)} models of iteration {args.iter} in {out} ({dec.get('reason')})")
    return 0
