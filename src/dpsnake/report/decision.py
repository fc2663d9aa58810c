"""The decision shown by the reports and ``dpsnake status``: honest across stages.

``dpsnake.workflow.convergence.run_decision`` on the stats.json files of iterations 0..N: converged only
when every system's latest accurate ratio reaches the threshold; per system, when it was last explored
and with what ratio.
"""

from __future__ import annotations

import math

import pandas as pd

from dpsnake.workflow.convergence import history_upto, run_decision, verdict

LATEST_COLUMNS = ["system", "last_explored", "stage", "accurate_ratio", "threshold", "reached"]


def _clean(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def for_iteration(
    results,
    it: int,
    stats: dict | None,
    threshold: float | None,
    config: dict | None,
    history: list[dict] | None = None,
) -> dict:
    """The decision after iteration ``it`` (JSON-ready): converged, stop, next_stage, stage,
    stage_iteration, reason, threshold, latest {system: {iteration, stage, accurate_ratio}}, below.
    ``history``: the stats.json of iterations 0..it when the caller has them (else they are read)."""
    keys = ("stop", "next_stage", "stage", "stage_iteration")
    if not stats:
        return {
            "converged": None,
            "reason": "selection has not run yet",
            "threshold": threshold,
            **{k: None for k in keys},
        }
    history = history_upto(results, it) if history is None else history
    if threshold is None or not history or history[-1].get("iteration") != stats.get("iteration"):
        # no threshold in the config: what select recorded
        return {
            "converged": bool(stats.get("converged")),
            "reason": stats.get("reason"),
            "threshold": threshold,
            **{k: stats.get(k) for k in keys},
        }
    d = run_decision(history, threshold, config)
    d["latest"] = {n: {k: _clean(v) for k, v in r.items()} for n, r in d["latest"].items()}
    return d


def line(d: dict) -> str:
    """'converged: ...' / 'stopped, not converged: ...' / 'not converged: ...' for a decided iteration."""
    return f"{verdict(d)}: {d.get('reason') or ''}"


def latest_table(d: dict) -> pd.DataFrame:
    """Per system: the last iteration that explored it, its stage and accurate ratio then, the threshold,
    and whether the ratio reached it."""
    t = d.get("threshold")
    rows = []
    for name, r in sorted((d.get("latest") or {}).items()):
        ratio = r.get("accurate_ratio")
        rows.append(
            {
                "system": name,
                "last_explored": r.get("iteration"),
                "stage": r.get("stage"),
                "accurate_ratio": ratio,
                "threshold": t,
                "reached": "yes" if ratio is not None and t is not None and ratio >= t else "no",
            }
        )
    return pd.DataFrame(rows, columns=LATEST_COLUMNS)


def link_word(d: dict) -> str:
    """What an iteration decided, for the run page's list of iteration pages."""
    if d.get("converged") is None:
        return "selection not run yet"
    if d.get("converged"):
        return "converged"
    if d.get("stop"):
        return "stopped, not converged"
    nxt, stage = d.get("next_stage"), d.get("stage")
    return f"stage {stage} again" if nxt is not None and nxt == stage else f"next: stage {nxt}"
