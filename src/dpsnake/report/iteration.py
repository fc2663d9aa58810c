"""The per-iteration report: gather the tables, draw the plots, write ``iter.NNNNNN.{html,csv,json}``.

``build(ctx, it)`` returns a JSON-ready dict (the content of ``iter.NNNNNN.json``) plus the figures;
``write(ctx, it)`` writes the three files atomically. The CSV holds the per-system summary, one row per
system (the same columns as the JSON's ``systems``).
"""

from __future__ import annotations

import json
import math
import pathlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dpsnake.errors import UserError
from dpsnake.fsio import write_text_atomic
from dpsnake.report import decision as decide
from dpsnake.report import html, plots, readers, sources
from dpsnake.report.accuracy import COLUMNS as ACC_COLUMNS
from dpsnake.report.accuracy import accuracy, read_labelled, test_sets_from_config

SUMMARY_COLUMNS = [
    "iteration",
    "system",
    "accurate",
    "candidate",
    "failed",
    "total",
    "accurate_ratio",
    "candidate_ratio",
    "failed_ratio",
    "trust_lo",
    "trust_hi",
    "trust_lo_virial",
    "trust_hi_virial",
    "filtered",
    "failed_before",
    "selected",
    "walkers",
    "walkers_stopped",
    "labelled",
    "label_failed",
    "data_frames",
    "rmse_e_atom",
    "rmse_f",
]


@dataclass
class Context:
    """Where a run's files are and what the config says. results: results/; bench: benchmarks/."""

    config: dict
    results: pathlib.Path
    bench: pathlib.Path
    workdir: pathlib.Path
    accuracy: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def reports(self) -> pathlib.Path:
        return self.results / "reports"

    @property
    def threshold(self) -> float | None:
        conv = self.config.get("convergence") or {}
        for k in ("accurate_ratio", "threshold", "conv_accuracy"):
            if isinstance(conv, dict) and isinstance(conv.get(k), (int, float)):
                return float(conv[k])
        return None


def context_from_config(
    config_path: pathlib.Path, results_dir: str | None = None, bench_dir: str | None = None, accuracy: bool = True
) -> Context:
    """Context from ``results/config.json``: results = its ``results_dir`` key, else the folder that
    holds config.json; benchmarks = ``benchmarks_dir`` key, else ``<workdir>/benchmarks``."""
    config_path = pathlib.Path(config_path)
    if not config_path.is_file():
        raise UserError(f"--config: {config_path}: no such file (the workflow writes results/config.json)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"--config: {config_path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"--config: {config_path}: expected a JSON object")
    results = pathlib.Path(results_dir or config.get("results_dir") or config_path.parent)
    workdir = results.parent if results.name else pathlib.Path.cwd()
    bench = pathlib.Path(bench_dir or config.get("benchmarks_dir") or workdir / "benchmarks")
    return Context(config, results, bench, workdir, accuracy)


def _deviation_summary(devi: pd.DataFrame, systems: pd.DataFrame) -> pd.DataFrame:
    """Per system and condition (temperature or schedule, relax, biased: readers.condition_label):
    walkers, frames, min/median/max of max_devi_f and the fraction of frames in each trust class (from
    model_devi.out with stats.json's trust levels); ``temperature`` is the start temperature (K)."""
    cols = [
        "system",
        "condition",
        "temperature",
        "walkers",
        "frames",
        "devi_f_min",
        "devi_f_median",
        "devi_f_max",
        "accurate_ratio",
        "candidate_ratio",
        "failed_ratio",
    ]
    if not len(devi):
        return pd.DataFrame(columns=cols)
    trust = systems.set_index("system") if len(systems) else pd.DataFrame()
    rows = []
    devi = devi.assign(
        _t=devi["temperature"].astype(float).fillna(-1),
        _c=devi["condition"].fillna("") if "condition" in devi else "",
    )
    for (sysname, temp, cond), g in devi.groupby(["system", "_t", "_c"], sort=True):
        v = g["max_devi_f"].to_numpy(float)
        row = {
            "system": sysname,
            "condition": cond or (None if temp == -1 else f"{temp:g} K"),
            "temperature": None if temp == -1 else temp,
            "walkers": g["walker"].nunique(),
            "frames": len(v),
            "devi_f_min": v.min(),
            "devi_f_median": float(np.median(v)),
            "devi_f_max": v.max(),
        }
        if sysname in trust.index:
            lo, hi = float(trust.at[sysname, "trust_lo"]), float(trust.at[sysname, "trust_hi"])
            row |= {
                "accurate_ratio": float(np.mean(v < lo)),
                "candidate_ratio": float(np.mean((v >= lo) & (v < hi))),
                "failed_ratio": float(np.mean(v >= hi)),
            }
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def _dataset_frames(datasets: list[dict]) -> pd.DataFrame:
    """Labelled frames per system and source (init, iter.K), counted by dpdata."""
    rows = [
        {"system": d["system"], "source": d["source"], "frames": read_labelled(d["path"]).get_nframes()}
        for d in datasets
    ]
    return pd.DataFrame(rows, columns=["system", "source", "frames"])


def _records(df: pd.DataFrame) -> list[dict]:
    """DataFrame rows as JSON-safe dicts (NaN -> None, numpy scalars -> Python)."""
    out = []
    for rec in df.to_dict(orient="records"):
        clean = {}
        for k, v in rec.items():
            if isinstance(v, np.generic):
                v = v.item()
            if isinstance(v, float) and math.isnan(v):
                v = None
            clean[k] = v
        out.append(clean)
    return out


def build(ctx: Context, it: int) -> tuple[dict, dict, dict]:
    """Tables (dict of DataFrames), JSON content and figures (dict of base64 PNG) of iteration ``it``."""
    it_dir = ctx.results / readers.iter_name(it)
    if not it_dir.is_dir():
        raise UserError(f"--iter {it}: {it_dir} does not exist (iterations here: {readers.iterations(ctx.results)})")
    test_sets = test_sets_from_config(ctx.config, ctx.workdir)  # bad entries fail before any work
    stats = readers.read_stats(ctx.results, it)
    systems = readers.stats_table(stats)
    coll = readers.read_collect(ctx.results, it) or {}
    walkers = readers.walkers_table(ctx.results, it, stats)
    devi = readers.deviations_table(ctx.results, it, walkers)
    curves = readers.lcurves(ctx.results, it)
    datasets = readers.datasets(ctx.results, it)
    frames = _dataset_frames(datasets)
    times = readers.rule_times(readers.benchmarks_table(ctx.bench, it))

    acc, preds = pd.DataFrame(columns=ACC_COLUMNS), []
    models = readers.model_files(ctx.results, it)
    if ctx.accuracy and models:
        acc, preds = accuracy(models, datasets, test_sets)

    # per-system summary: selection counts + labels + dataset size + ensemble-mean RMSE on labelled data
    names = sorted(set(systems["system"]) | set(frames["system"]) | set((coll.get("systems") or {}).keys()))
    explored = explored_systems(systems, walkers)
    summary = pd.DataFrame({"system": names})
    summary.insert(0, "iteration", int(it))
    summary = summary.merge(systems, on="system", how="left")
    if len(walkers):
        stopped_mask = walkers["status"].notna() & (walkers["status"] != "finished")
        summary["walkers"] = [int((walkers["system"] == n).sum()) for n in names]
        summary["walkers_stopped"] = [int(((walkers["system"] == n) & stopped_mask).sum()) for n in names]
    csys = coll.get("systems") or {}
    summary["labelled"] = [csys.get(n, {}).get("added") for n in names]
    summary["label_failed"] = [csys.get(n, {}).get("failed") for n in names]
    summary["data_frames"] = [int(frames.loc[frames["system"] == n, "frames"].sum()) for n in names]
    mean = (
        acc[(acc["set"] == "labelled") & (acc["model"] == "mean") & (acc["source"] == "all")].set_index("system")
        if len(acc)
        else None
    )
    for col in ("rmse_e_atom", "rmse_f"):
        summary[col] = [mean.at[n, col] if mean is not None and n in mean.index else np.nan for n in names]
    summary = summary.reindex(columns=SUMMARY_COLUMNS)  # same columns every iteration (blank if unknown)
    decision = decide.for_iteration(ctx.results, it, stats, ctx.threshold, ctx.config)
    # a system this iteration's stage did not explore gets no (blank) row: its data and RMSE are shown
    # apart, with when it was last explored
    others = not_explored_table(summary[~summary["system"].isin(explored)], decision)
    summary = summary[summary["system"].isin(explored)].reset_index(drop=True)
    stale = sources.stale_data(ctx.config, ctx.results, ctx.workdir, upto=it)

    stopped = walkers[walkers["status"].notna() & (walkers["status"] != "finished")] if len(walkers) else walkers
    devsum = _deviation_summary(devi, systems)
    final_lc = pd.DataFrame([{"model": k, **v.iloc[-1].to_dict()} for k, v in sorted(curves.items()) if len(v)])
    labelling = {k: coll.get(k) for k in ("labelled", "failed", "failed_ratio")}
    labelling["failures"] = coll.get("failures") or []
    prov = readers.read_provenance(ctx.results, it)
    prov = prov[prov["iteration"] == it] if len(prov) else prov
    new_by_walker = (
        prov.groupby(["system", "walker"], sort=True)
        .agg(frames=("step", "size"), devi_f_min=("max_devi_f", "min"), devi_f_max=("max_devi_f", "max"))
        .reset_index()
        if len(prov)
        else pd.DataFrame(columns=["system", "walker", "frames"])
    )
    engine = readers._read_json(it_dir / "explore" / "engine.json")  # which force provider explored, why
    tables = {
        "summary": summary,
        "accuracy": acc,
        "walkers": walkers,
        "stopped": stopped,
        "deviations": devsum,
        "frames": frames,
        "lcurve_final": final_lc,
        "rule_times": times,
        "failures": pd.DataFrame(labelling["failures"], columns=["task", "system", "reason"]),
        "new_labels": new_by_walker,
        "not_explored": others,
        "stale_data": stale,
    }
    content = {
        "iteration": int(it),
        "decision": decision,
        "systems": _records(summary),
        "accuracy": _records(acc),
        "labelling": labelling,
        "walkers": _records(walkers),
        "stopped_early": _records(stopped),
        "deviations": _records(devsum),
        "datasets": _records(frames),
        "new_labels": _records(new_by_walker),
        "learning_curves": _records(final_lc),
        "rule_times": _records(times),
        "models": [str(m) for m in models],
        "explore_engine": engine,
        "not_explored": _records(others),
        "stale_data": _records(stale),
    }
    figs = {
        "selection": plots.selection_bars(systems),
        "deviation": plots.deviation_hist(devi, systems),
        "lcurve": plots.learning_curves(curves),
        "parity": plots.parity(preds),
        "times": plots.rule_time_bars(times),
    }
    return tables, content, figs


def explored_systems(systems: pd.DataFrame, walkers: pd.DataFrame) -> list[str]:
    """Systems the iteration explored: those of stats.json, else (selection not run yet) those with walkers."""
    if len(systems):
        return list(systems["system"])
    return sorted(set(walkers["system"].dropna())) if len(walkers) else []


NOT_EXPLORED_COLUMNS = ["system", "data_frames", "rmse_e_atom", "rmse_f", "last_explored", "accurate_ratio"]


def not_explored_table(rows: pd.DataFrame, decision: dict) -> pd.DataFrame:
    """Systems with data but not explored in this iteration: dataset size, RMSE, and the iteration that
    last explored them with its accurate ratio (blank: never explored so far)."""
    latest = decision.get("latest") or {}
    out = rows.reindex(columns=["system", "data_frames", "rmse_e_atom", "rmse_f"]).copy()
    out["last_explored"] = [latest.get(n, {}).get("iteration") for n in out["system"]]
    out["accurate_ratio"] = [latest.get(n, {}).get("accurate_ratio") for n in out["system"]]
    return out.reset_index(drop=True)[NOT_EXPLORED_COLUMNS]


def verdict_html(d: dict) -> str:
    """'converged' / 'stopped, not converged' / 'not converged' as a coloured span."""
    if d.get("converged"):
        return '<span class="ok">converged</span>'
    word = "stopped, not converged" if d.get("stop") else "not converged"
    return f'<span class="no">{word}</span>'


def _not_explored_html(df: pd.DataFrame) -> str:
    if not len(df):
        return ""
    return (
        "<h3>Systems not explored in this iteration</h3>"
        + html.table(df)
        + '<p class="note">last_explored, accurate_ratio: the latest iteration (up to this one) whose stage '
        "explored the system, and its accurate ratio then (blank: not explored yet).</p>"
    )


def _engine_line(engine: dict | None) -> str:
    """Which force provider explored (explore/engine.json) and why."""
    if not engine:
        return ""
    prec = f", precision {html.esc(engine['precision'])}" if engine.get("precision") else ""
    return (
        f"<p>exploration engine: <b>{html.esc(engine.get('engine', '?'))}</b> on the "
        f"{html.esc(engine.get('device', '?'))}{prec} ({html.esc(engine.get('reason') or '')})</p>"
    )


def render(it: int, tables: dict, content: dict, figs: dict, others: list[int] = ()) -> str:
    """The iteration page's HTML."""
    d = content["decision"]
    if d["converged"] is None:
        verdict = f'<p class="note">{html.esc(d["reason"])}</p>'
    else:
        verdict = f"<p>{verdict_html(d)}: {html.esc(d['reason'] or '')}</p>"
    lab = content["labelling"]
    lab_line = (
        f"<p>labelled: {lab['labelled']}, failed labels: {lab['failed']}"
        f" (ratio {lab['failed_ratio'] if lab['failed_ratio'] is not None else '-'})</p>"
        if lab.get("labelled") is not None
        else '<p class="note">(labels not collected yet)</p>'
    )
    acc = tables["accuracy"]
    over = int(acc.loc[(acc["model"] == "mean") & (acc["source"] == "all"), "sel_overflow"].sum()) if len(acc) else 0
    over_note = (
        f'<p class="no">{over} atoms had more neighbours within rcut than the models\' sel: the extra '
        "neighbours were dropped (as DeePMD-kit does); raise sel in the training input.</p>"
        if over
        else ""
    )
    body = [
        html.section("Decision", verdict, sources.html_note(tables["stale_data"]), anchor="decision"),
        html.section(
            "Per system",
            html.table(tables["summary"].drop(columns=["iteration"])),
            _not_explored_html(tables["not_explored"]),
            html.image(figs["selection"], "selection ratios"),
            '<p class="note">counts from select/stats.json; RMSE: ensemble-mean prediction on all '
            "labelled data so far (dpsnake engine, or DeePMD-kit for models it does not run).</p>",
            anchor="systems",
        ),
        html.section(
            "Model deviation",
            html.image(figs["deviation"], "model deviation histograms"),
            html.table(tables["deviations"]),
            anchor="deviation",
        ),
        html.section(
            "Learning curves",
            html.image(figs["lcurve"], "learning curves"),
            html.table(tables["lcurve_final"]),
            anchor="lcurve",
        ),
        html.section(
            "Ensemble accuracy",
            html.table(acc[acc["model"] == "mean"] if len(acc) else acc),
            '<p class="note">ensemble-mean prediction; source "all": every labelled frame of the '
            "system so far; per source: each dataset alone (the newest labels were not in training)."
            "</p>",
            over_note,
            html.image(figs["parity"], "parity plots"),
            "<details><summary>per model</summary>" + html.table(acc) + "</details>",
            html.table(tables["frames"]),
            anchor="accuracy",
        ),
        html.section(
            "Labelling and exploration",
            lab_line,
            _engine_line(content.get("explore_engine")),
            html.table(
                tables["failures"], empty="no failed labels" if lab.get("labelled") is not None else "no data yet"
            ),
            "<h3>New labelled frames by walker</h3>",
            html.table(tables["new_labels"]),
            "<h3>Walkers stopped early</h3>",
            html.table(tables["stopped"], empty="none" if len(tables["walkers"]) else "no data yet"),
            "<details><summary>all walkers</summary>" + html.table(tables["walkers"]) + "</details>",
            anchor="labels",
        ),
        html.section(
            "Time per rule",
            html.image(figs["times"], "time per rule"),
            html.table(tables["rule_times"]),
            anchor="times",
        ),
    ]
    nav = [
        (f"{readers.iter_name(k)}.html", label) for k, label in ((it - 1, "previous"), (it + 1, "next")) if k in others
    ]
    nav += [
        ("index.html", "run overview"),
        ("#systems", "systems"),
        ("#deviation", "deviation"),
        ("#lcurve", "learning curves"),
        ("#accuracy", "accuracy"),
        ("#labels", "labels"),
        ("#times", "times"),
    ]
    return html.page(f"dpsnake iteration {it}", body, nav)


def write(ctx: Context, it: int) -> dict[str, pathlib.Path]:
    """Write ``results/reports/iter.NNNNNN.{html,csv,json}``; returns their paths."""
    tables, content, figs = build(ctx, it)
    stem = ctx.reports / readers.iter_name(it)
    paths = {ext: stem.parent / f"{stem.name}.{ext}" for ext in ("json", "csv", "html")}
    write_text_atomic(paths["json"], json.dumps(content, indent=1))
    write_text_atomic(paths["csv"], tables["summary"].to_csv(index=False))
    write_text_atomic(paths["html"], render(it, tables, content, figs, readers.iterations(ctx.results)))
    return paths
