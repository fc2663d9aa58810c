"""``dpsnake status [--results-dir results]``: the per-iteration summary as a terminal table.

Reads only small files (stats.json, collect/summary.json, and the iteration report's JSON when it
exists for the RMSE columns), so it is instant while a run is going. For each iteration it also says
which stage the iteration has reached, its decision, and how many candidates were not picked again
because their label failed in an earlier iteration (``failed_before``, when there are any).
"""

from __future__ import annotations

import json
import pathlib

import pandas as pd

from dpsnake.errors import UserError
from dpsnake.report import readers

COLUMNS = [
    "iter",
    "system",
    "accurate",
    "candidate",
    "failed",
    "acc_ratio",
    "cand_ratio",
    "fail_ratio",
    "trust_lo",
    "trust_hi",
    "selected",
    "stopped",
    "labelled",
    "label_failed",
    "rmse_e_atom",
    "rmse_f",
]


def add_arguments(parser) -> None:
    parser.add_argument("--results-dir", default="results", help="the run's results folder (default: results)")


def stage(results: pathlib.Path, it: int) -> str:
    """The furthest stage iteration ``it`` has reached, from the files present."""
    d = results / readers.iter_name(it)
    if (results / "reports" / f"{readers.iter_name(it)}.json").is_file():
        return "reported"
    if (d / "collect" / "summary.json").is_file():
        return "collected"
    if any((d / "label").glob("task.*")) if (d / "label").is_dir() else False:
        return "labelling"
    if (d / "select" / "stats.json").is_file():
        return "selected"
    if (d / "explore" / "summary.json").is_file():
        return "explored"
    models = list((d / "train").glob("model.*/model.dp"))
    return f"training ({len(models)} models done)" if (d / "train").is_dir() else "started"


def _config(results: pathlib.Path) -> dict:
    """results/config.json (the threshold and the plan for the decision; structures for stale data)."""
    try:
        return json.loads((results / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def failed_before_words(stats: dict) -> str:
    """'; failed_before N (...)' when the selection left out N candidates (summed over systems) because
    their label failed in an earlier iteration (the iteration report's column of that name); else ''."""
    n = sum(int(s.get("failed_before") or 0) for s in (stats.get("systems") or {}).values())
    return f"; failed_before {n} (candidates not picked again: their label failed in an earlier iteration)" if n else ""


def summary(results: pathlib.Path) -> tuple[pd.DataFrame, list[str]]:
    """The table (one row per iteration and system) and one status line per iteration."""
    from dpsnake.report import decision, sources
    from dpsnake.report.iteration import Context

    rows, lines, history = [], [], []
    config = _config(results)
    threshold = Context(config, results, results, results.parent).threshold
    for it in readers.iterations(results):
        stats = readers.read_stats(results, it)
        coll = readers.read_collect(results, it) or {}
        rep = results / "reports" / f"{readers.iter_name(it)}.json"
        rmse = {}
        if rep.is_file():
            try:
                rmse = {r["system"]: r for r in json.loads(rep.read_text()).get("systems", [])}
            except json.JSONDecodeError:
                rmse = {}
        walkers = (stats or {}).get("walkers") or {}
        for name, s in ((stats or {}).get("systems") or {}).items():
            c = (coll.get("systems") or {}).get(name, {})
            stopped = sum(1 for w in walkers.values() if w.get("system") == name and w.get("status") != "finished")
            rows.append(
                {
                    "iter": it,
                    "system": name,
                    "accurate": s.get("accurate"),
                    "candidate": s.get("candidate"),
                    "failed": s.get("failed"),
                    "acc_ratio": s.get("accurate_ratio"),
                    "cand_ratio": s.get("candidate_ratio"),
                    "fail_ratio": s.get("failed_ratio"),
                    "trust_lo": s.get("trust_lo"),
                    "trust_hi": s.get("trust_hi"),
                    "selected": s.get("selected"),
                    "stopped": stopped,
                    "labelled": c.get("added"),
                    "label_failed": c.get("failed"),
                    "rmse_e_atom": rmse.get(name, {}).get("rmse_e_atom"),
                    "rmse_f": rmse.get(name, {}).get("rmse_f"),
                }
            )
        line = f"iteration {it}: {stage(results, it)}"
        if stats:  # the stats read so far are the history (status must stay instant at 100 iterations)
            history.append(stats)
            line += "; " + decision.line(decision.for_iteration(results, it, stats, threshold, config, history))
            line += failed_before_words(stats)
        lines.append(line)
    for r in sources.stale_data(config, results, results.parent).itertuples():
        lines.append(f"note: {r.data}: {r.note}")
    return pd.DataFrame(rows, columns=COLUMNS), lines


def format_table(df: pd.DataFrame) -> str:
    """Fixed-width text table (ratios 3 decimals, RMSE 3 significant digits, blanks for unknown)."""
    fmt = {c: "{:.3f}".format for c in ("acc_ratio", "cand_ratio", "fail_ratio")}
    fmt |= {c: "{:.3g}".format for c in ("trust_lo", "trust_hi", "rmse_e_atom", "rmse_f")}
    shown = df.copy()
    for c in shown.columns:
        f = fmt.get(c, "{}".format)
        shown[c] = [("" if v is None or (isinstance(v, float) and v != v) else f(v)) for v in shown[c]]
    return shown.to_string(index=False)


def run(args) -> int:
    results = pathlib.Path(args.results_dir)
    if not results.is_dir():
        raise UserError(f"--results-dir: {results}: no such folder (has the run started?)")
    df, lines = summary(results)
    if not lines:
        print(f"{results}: no iterations yet")
        return 0
    if len(df):
        print(format_table(df))
        print()
    print("\n".join(lines))
    return 0
