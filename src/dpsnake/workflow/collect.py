"""``dpsnake collect``: this iteration's labelled frames -> ``results/data/iter.N/<system>`` (deepmd/npy).

Failed labels are counted and listed in ``collect/summary.json``, never added. When the failed
fraction exceeds ``label.max_failed_fraction`` the step stops with a message (and writes nothing), so a
broken labeler cannot silently starve the dataset. The dataset folder is built under a temporary name
and renamed, then the summary is written: a kill leaves either nothing or the complete iteration.
A stats file or label that cannot be read is one line naming it and what to do (delete it, rerun).
"""

from __future__ import annotations

import collections
import json
import pathlib

from dpsnake.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="results/config.json")
    parser.add_argument("--iter", type=int, required=True)
    parser.add_argument("--stats", required=True, help="select/stats.json of this iteration")
    parser.add_argument("--labels", nargs="*", default=[], help="labelled frames (label/task.N.extxyz)")
    parser.add_argument("--data-out", required=True, help="results/data/iter.N")
    parser.add_argument("--summary", required=True, help="collect/summary.json to write")


def _read_stats(path: pathlib.Path) -> dict:
    """select/stats.json, or one line naming it: a damaged file is rebuilt by rerunning the selection."""
    try:
        stats = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        stats = err
    if not isinstance(stats, dict):
        why = f"not valid JSON ({stats})" if isinstance(stats, Exception) else "not a JSON object"
        raise UserError(f"--stats: {path}: {why}; delete it and rerun: Snakemake redoes the selection")
    return stats


def run(args) -> int:
    from dpsnake.fsio import atomic_dir, write_json_atomic
    from dpsnake.labelers.io import read_labeled
    from dpsnake.workflow import dataset
    from dpsnake.workflow.config import read_resolved

    cfg = read_resolved(args.config)
    stats = _read_stats(pathlib.Path(args.stats))
    expected = set(stats.get("tasks", []))
    ok = collections.defaultdict(list)
    rows = collections.defaultdict(list)
    failures, seen = [], set()
    nfail = collections.Counter()
    for path in sorted(args.labels):
        try:
            atoms, good, reason = read_labeled(path)
        except (ValueError, KeyError, IndexError, StopIteration, OSError) as err:  # cut short, not a label
            if isinstance(err, OSError) and err.errno is not None:
                raise  # permission denied...: the command line names the path and what to do
            why = f"{type(err).__name__}: {err}" if str(err) else "empty file"
            raise UserError(
                f"{path}: not a readable label ({why}); delete it and rerun: Snakemake labels that frame again"
            ) from None
        task = pathlib.Path(path).name.split(".")[1]  # task.NNNNNN.extxyz (extxyz info turns "000001" into 1)
        if task in seen:
            raise UserError(f"--labels: task {task} given twice ({path})")
        seen.add(task)
        system = str(atoms.info.get("system"))
        if system not in cfg["systems"]:
            raise UserError(f"{path}: system {system!r} is not in the config")
        if not good:
            failures.append({"task": task, "system": system, "reason": reason})
            nfail[system] += 1
            continue
        ok[system].append(atoms)
        rows[system].append(
            {
                "iteration": args.iter,
                "system": system,
                "walker": atoms.info.get("walker"),
                "step": atoms.info.get("step"),
                "max_devi_f": atoms.info.get("max_devi_f"),
                "task": task,
            }
        )
    missing = sorted(expected - seen)
    if missing:
        raise UserError(f"--labels: {len(missing)} selected task(s) have no label, e.g. task.{missing[0]}")
    n = len(seen)
    ratio = len(failures) / n if n else 0.0
    limit = cfg["label"].get("max_failed_fraction", 0.2)
    if ratio > limit:
        raise UserError(
            f"label.max_failed_fraction: {len(failures)} of {n} labels failed ({ratio:.0%} > "
            f"{limit:.0%}) in iteration {args.iter}; first reason: {failures[0]['reason']} "
            f"(see results/iter.{args.iter:06d}/label/*.failed.json)"
        )
    out = pathlib.Path(args.data_out)
    allrows = [r for s in sorted(rows) for r in rows[s]]
    with atomic_dir(out) as tmp:
        for system in sorted(ok):
            dataset.write_system(tmp / system, ok[system], rows[system], cfg["type_map"])
        (tmp / "provenance.csv").write_text(dataset.provenance_text(allrows))
    systems = {s: {"added": len(ok.get(s, [])), "failed": nfail.get(s, 0)} for s in stats.get("systems", {})}
    summary = {
        "iteration": args.iter,
        "labelled": len(allrows),
        "failed": len(failures),
        "failed_ratio": ratio,
        "failures": failures,
        "systems": systems,
    }
    write_json_atomic(args.summary, summary)
    print(
        f"collect iteration {args.iter}: {len(allrows)} frames added, {len(failures)} failed labels; "
        + ", ".join(f"{s}: +{v['added']}" for s, v in systems.items())
    )
    return 0
