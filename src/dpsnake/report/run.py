"""The run-level report: ``results/reports/index.html`` + ``run.csv`` + ``run.json`` + ``learning_curve.csv``.

Built from the per-iteration ``iter.NNNNNN.json`` files (missing ones are written first), so the run
page never recomputes what an iteration report already holds.
"""

from __future__ import annotations

import json
import pathlib

import pandas as pd

from dpsnake.fsio import write_text_atomic
from dpsnake.report import decision as decide
from dpsnake.report import html, iteration, learning, plots, readers, sources


def load_iterations(ctx: iteration.Context, rebuild: bool = False, progress=print) -> list[dict]:
    """Per-iteration report contents, oldest first.

    A finished iteration (collect/summary.json exists) whose report is missing, or older than that
    summary, gets its report written. An iteration still running is summarised in memory only
    (without the ensemble evaluation), so a later call reports it in full once it has finished.
    """
    out = []
    for it in readers.iterations(ctx.results):
        path = ctx.reports / f"{readers.iter_name(it)}.json"
        done = ctx.results / readers.iter_name(it) / "collect" / "summary.json"
        if not done.is_file():
            quick = iteration.Context(ctx.config, ctx.results, ctx.bench, ctx.workdir, accuracy=False)
            out.append(iteration.build(quick, it)[1])
            continue
        if rebuild or not path.is_file() or path.stat().st_mtime < done.stat().st_mtime:
            progress(f"dpsnake report: writing the report of iteration {it}")
            iteration.write(ctx, it)
        out.append(json.loads(path.read_text()))
    return out


def run_table(contents: list[dict], threshold: float | None) -> pd.DataFrame:
    """One row per (iteration, system): the iteration summaries stacked, plus the threshold."""
    rows = [r for c in contents for r in c["systems"]]
    df = pd.DataFrame(rows, columns=iteration.SUMMARY_COLUMNS)
    df["threshold"] = threshold
    return df


def trend_table(contents: list[dict], threshold: float | None) -> pd.DataFrame:
    """run_table plus, for the RMSE and dataset-size trends, the systems an iteration did not explore."""
    other = [
        {"iteration": c["iteration"], **{k: r.get(k) for k in ("system", "data_frames", "rmse_e_atom", "rmse_f")}}
        for c in contents
        for r in c.get("not_explored") or []
    ]
    table = run_table(contents, threshold)
    if not other:
        return table
    extra = pd.DataFrame(other, columns=iteration.SUMMARY_COLUMNS).assign(threshold=threshold)
    return pd.concat([table, extra], ignore_index=True).sort_values(["iteration", "system"], kind="stable")


def decision(contents: list[dict], ctx: iteration.Context) -> dict:
    """The run's convergence decision: that of the last iteration whose selection has run."""
    decided = [c for c in contents if c["decision"]["converged"] is not None]
    if not decided:
        return {
            "iteration": None,
            "converged": None,
            "reason": "no iteration has finished selection yet",
            "threshold": ctx.threshold,
        }
    last = decided[-1]["iteration"]
    # recomputed, not taken from a cached iteration report: the current config and stats.json files count
    return {
        "iteration": last,
        **decide.for_iteration(ctx.results, last, readers.read_stats(ctx.results, last), ctx.threshold, ctx.config),
    }


LEARNING_NOTE = (
    '<p class="note">Ensemble-mean RMSE of iteration N\'s models against the labelled frames they were trained '
    "on (labels_system: init + iterations 0..N-1 of the system; labels_total: all systems). set next: on "
    "iteration N's new labels (data/iter.N), which these models never saw: the next-iteration error, on frames "
    "picked because the models disagreed there (no row when the iteration labelled nothing for the system). "
    "set test: on each test_data set. Point labels: iteration. Also in learning_curve.csv and run.json.</p>"
)


def write(ctx: iteration.Context, rebuild: bool = False, progress=print) -> dict[str, pathlib.Path]:
    """Write index.html, run.csv, run.json and learning_curve.csv under results/reports/; returns their paths."""
    contents = load_iterations(ctx, rebuild, progress)
    table = run_table(contents, ctx.threshold)
    dec = decision(contents, ctx)
    stale = sources.stale_data(ctx.config, ctx.results, ctx.workdir)
    lc = learning.table(contents)
    paths = {
        "json": ctx.reports / "run.json",
        "csv": ctx.reports / "run.csv",
        "html": ctx.reports / "index.html",
        "learning_csv": ctx.reports / "learning_curve.csv",
    }
    write_text_atomic(
        paths["json"],
        json.dumps(
            {
                "iterations": [c["iteration"] for c in contents],
                "decision": dec,
                "systems": iteration._records(table.drop(columns=["threshold"])),
                "learning_curve": learning.records(lc),
                "stale_data": iteration._records(stale),
            },
            indent=1,
        ),
    )
    write_text_atomic(paths["csv"], table.drop(columns=["threshold"]).to_csv(index=False))
    write_text_atomic(paths["learning_csv"], lc.to_csv(index=False))

    if dec["converged"] is None:
        verdict = f'<p class="note">{html.esc(dec["reason"])}</p>'
    else:
        verdict = (
            f"<p>{iteration.verdict_html(dec)} at iteration {dec['iteration']}: {html.esc(dec['reason'] or '')}</p>"
        )
    if dec.get("threshold") is not None:
        verdict += f'<p class="note">accurate-ratio threshold: {dec["threshold"]:g}</p>'
    links = "".join(
        f'<li><a href="{readers.iter_name(c["iteration"])}.html">iteration {c["iteration"]}</a>'
        f" ({html.esc(decide.link_word(c['decision']))})</li>"
        for c in contents
    )
    links_note = (
        '<p class="note">In brackets: what each iteration decided at its end (converged; stopped, '
        "not converged; the stage the next iteration explores; or that its selection has not run "
        "yet).</p>"
    )
    latest = decide.latest_table(dec)
    systems = (
        (
            html.table(latest) + '<p class="note">last_explored: the latest iteration whose stage explored the '
            "system; accurate_ratio: its accurate ratio in that iteration. The run is converged when every "
            "system's latest accurate ratio reaches the threshold.</p>"
        )
        if len(latest)
        else ""
    )
    show = table.drop(columns=["threshold"])
    lc_show = lc.assign(labels_system=lc["labels_system"].astype(object).where(lc["labels_system"].notna(), None))
    body = [
        html.section("Decision", verdict, systems, sources.html_note(stale), anchor="decision"),
        html.section(
            "Trends per system",
            html.image(plots.run_trends(trend_table(contents, ctx.threshold)), "trends against iteration"),
            '<p class="note">RMSE: ensemble-mean prediction of each iteration\'s models on all '
            "labelled data available at that iteration.</p>",
            anchor="trends",
        ),
        html.section(
            "Accuracy against labels",
            html.image(plots.learning_vs_labels(lc), "learning curve"),
            html.table(lc_show, empty="no ensemble evaluation yet"),
            LEARNING_NOTE,
            anchor="labels",
        ),
        html.section("All iterations", html.table(show), anchor="table"),
        html.section("Iteration pages", f"<ul>{links}</ul>", links_note, anchor="pages"),
    ]
    write_text_atomic(
        paths["html"],
        html.page(
            "dpsnake run overview",
            body,
            [
                ("#decision", "decision"),
                ("#trends", "trends"),
                ("#labels", "accuracy vs labels"),
                ("#table", "table"),
                ("#pages", "iterations"),
            ],
        ),
    )
    return paths
