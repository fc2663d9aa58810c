"""``dpsnake finalize``: copy the last iteration's models to ``results/models/final/`` (+ final.json).

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


def run(args) -> int:
    from dpsnake.workflow.fsutil import atomic_write_json, replace_dir, tmp_dir_for

    out = pathlib.Path(args.outdir)
    tmp = tmp_dir_for(out)
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
    stats = json.loads(pathlib.Path(args.stats).read_text())
    atomic_write_json(tmp / "final.json", {"iteration": args.iter, "models": names,
                                           "converged": stats.get("converged"), "reason": stats.get("reason"),
                                           "sources": [str(m) for m in args.models]})
    replace_dir(tmp, out)
    print(f"finalize: {len(names)} models of iteration {args.iter} in {out} ({stats.get('reason')})")
    return 0
