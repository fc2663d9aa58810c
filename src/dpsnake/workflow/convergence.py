"""The run's convergence decision, honest across the stages of the exploration plan.

``select`` decides per stage (``candidates.decide``): a stage is done when every system *it explores*
reaches the accurate-ratio threshold, and the run stops after the last stage. A last stage that explores
only some systems says nothing about the others, so here **converged** means: the plan ran to its end
with its last stage done, *and* every system's latest accurate ratio (from the last iteration that
explored it) reaches the threshold. Whether the run stops is unchanged; only the verdict and its words
are: no reason says "stage N converged" (a stage is "done"), so no status line reads "not converged:
stage 1 converged".

``run_decision(history, threshold, cfg)`` takes the ``stats.json`` dicts of iterations 0..N (oldest
first) and returns the decision of iteration N; ``history_upto(results, it)`` reads them.
"""

from __future__ import annotations

import json
import math
import pathlib
import re


def _ratio(v) -> float:
    """An accurate ratio as a float (NaN when unknown, e.g. no frames explored)."""
    try:
        r = float(v)
    except (TypeError, ValueError):
        return math.nan
    return r


def _reached(r: float, threshold: float) -> bool:
    return not math.isnan(r) and r >= threshold


def latest_ratios(history: list[dict]) -> dict[str, dict]:
    """{system: {"iteration", "stage", "accurate_ratio"}} from the last iteration that explored each
    system (systems in stats.json's ``systems``), in order of first exploration."""
    out: dict[str, dict] = {}
    for st in history:
        for name, s in (st.get("systems") or {}).items():
            out[name] = {
                "iteration": int(st.get("iteration", -1)),
                "stage": st.get("stage"),
                "accurate_ratio": _ratio(s.get("accurate_ratio")),
            }
    return out


def _words(items: dict[str, dict]) -> str:
    """'CuNi 0.435 (iteration 2)' for each system."""
    return ", ".join(f"{n} {v['accurate_ratio']:.3f} (iteration {v['iteration']})" for n, v in sorted(items.items()))


def _base(history: list[dict], cfg: dict | None) -> dict:
    """The per-stage decision of the last iteration: re-evaluated with ``cfg`` when it holds the
    exploration plan (as the workflow does), else the one stats.json recorded (``stage_decision`` when
    select wrote one)."""
    cur = history[-1]
    if cfg and (cfg.get("explore") or {}).get("stages") and (cfg.get("convergence") or {}).get("max_iterations"):
        from dpsnake.workflow.candidates import decide_from_stats

        d = decide_from_stats(cfg, cur)
        d["max_iterations"] = int(cfg["convergence"]["max_iterations"])
        return d
    # select records its per-stage decision as stage_decision (its converged/reason are this module's)
    rec = cur.get("stage_decision") or cur
    d = {k: rec.get(k) for k in ("converged", "stop", "next_stage", "reason")}
    m = re.search(r"max_iterations (\d+) reached", str(rec.get("reason") or ""))
    d["max_iterations"] = int(m.group(1)) if m else None
    return d


def run_decision(history: list[dict], threshold: float, cfg: dict | None = None) -> dict:
    """The decision after the last iteration of ``history`` (stats.json dicts, oldest first):
    {"converged", "stop", "next_stage", "stage", "stage_iteration", "reason", "threshold", "latest"
    (latest_ratios), "below" (systems whose latest ratio is below the threshold)}."""
    cur = history[-1]
    base = _base(history, cfg)
    latest = latest_ratios(history)
    below = {n: v for n, v in latest.items() if not _reached(v["accurate_ratio"], threshold)}
    here = {n: latest[n] for n in (cur.get("systems") or {})}
    here_below = {n: v for n, v in here.items() if n in below}
    stage, it = cur.get("stage"), int(cur.get("iteration", len(history) - 1))
    t = f"{threshold:g}"
    stop, nxt = bool(base.get("stop")), base.get("next_stage")
    converged = bool(base.get("converged")) and not below
    if converged:
        reason = f"every system's latest accurate ratio >= {t}: {_words(latest)}"
    elif stop:
        if base.get("converged"):  # the last stage is done, but it does not explore every system
            why = (
                f"exploration plan exhausted: the last stage (stage {stage}) reached the threshold for "
                f"{', '.join(sorted(here))} only"
            )
        elif base.get("max_iterations") is not None and it + 1 >= base["max_iterations"]:
            why = f"max_iterations {base['max_iterations']} reached"
        else:
            why = f"exploration plan exhausted (the last stage, stage {stage}, used its iterations)"
        if below:  # no "stopped:" in front: the verdict ("stopped, not converged") says it
            reason = f"{why}; latest accurate ratio below {t}: {_words(below)}"
        else:
            reason = f"{why} before the last stage of the plan ran (every system's latest accurate ratio >= {t})"
    elif nxt is not None and nxt == stage:
        reason = f"accurate ratio below {t}: {_words(here_below) or 'no frames explored'}; repeating stage {stage}"
    elif here and not here_below:
        reason = f"stage {stage} done (its systems' accurate ratio >= {t}); next: stage {nxt}"
    else:
        reason = (
            f"stage {stage} used its iterations with accurate ratio below {t}: "
            f"{_words(here_below) or 'no frames explored'}; next: stage {nxt}"
        )
    return {
        "converged": converged,
        "stop": stop,
        "next_stage": nxt,
        "stage": stage,
        "stage_iteration": cur.get("stage_iteration"),
        "reason": reason,
        "threshold": threshold,
        "latest": latest,
        "below": sorted(below),
    }


def verdict(decision: dict) -> str:
    """'converged' / 'stopped, not converged' / 'not converged' (the run goes on)."""
    if decision.get("converged"):
        return "converged"
    return "stopped, not converged" if decision.get("stop") else "not converged"


def history_upto(results, it: int) -> list[dict]:
    """stats.json of iterations 0..it that exist (oldest first)."""
    out = []
    for k in range(int(it) + 1):
        p = pathlib.Path(results) / f"iter.{k:06d}" / "select" / "stats.json"
        if p.is_file():
            out.append(json.loads(p.read_text()))
    return out
