"""Matplotlib figures of the report, returned as base64 PNG strings for self-contained HTML.

Every function takes pandas tables from ``collect``/``accuracy`` and returns ``str`` (base64 PNG)
or ``None`` when there is nothing to draw.
"""

from __future__ import annotations

import base64
import io

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # headless: Snakemake jobs and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

CLASS_COLORS = {"accurate": "#2ca02c", "candidate": "#ff7f0e", "failed": "#d62728"}


def to_base64(fig) -> str:
    """PNG bytes of a figure, base64-encoded; closes the figure."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _grid(n: int, width: float = 4.2, height: float = 3.2, ncols: int = 3):
    ncols = min(ncols, max(n, 1))
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def selection_bars(systems: pd.DataFrame) -> str | None:
    """Stacked accurate/candidate/failed ratios per system."""
    if not len(systems):
        return None
    fig, ax = plt.subplots(figsize=(1.2 * len(systems) + 3, 3.2))
    bottom = np.zeros(len(systems))
    for cls, color in CLASS_COLORS.items():
        vals = systems[f"{cls}_ratio"].to_numpy(float)
        ax.bar(systems["system"], vals, bottom=bottom, color=color, label=cls)
        bottom += vals
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of explored frames")
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
    return to_base64(fig)


def deviation_hist(devi: pd.DataFrame, systems: pd.DataFrame) -> str | None:
    """Per system: histogram of max_devi_f (eV/A) per condition (temperature or schedule: readers.condition_label),
    theta_low / theta_high marked."""
    if not len(devi) or "max_devi_f" not in devi:
        return None
    names = sorted(devi["system"].dropna().unique())
    if not names:
        return None
    trust = systems.set_index("system") if len(systems) else None
    fig, axes = _grid(len(names))
    for ax, name in zip(axes, names):
        d = devi[devi["system"] == name]
        vals = d["max_devi_f"].to_numpy(float)
        known = trust is not None and name in trust.index
        lo_hi = [trust.at[name, c] for c in ("trust_lo", "trust_hi")] if known else []
        pos = vals[vals > 0]
        levels = [v for v in lo_hi if v is not None and np.isfinite(v) and v > 0]
        edges_src = np.concatenate([pos, levels])
        if len(edges_src):
            # start frames of a perfect lattice have ~1e-15 deviations: do not let them stretch the
            # axis over decades; everything below the first edge is counted in the first bin
            floor = (min(levels) if levels else float(np.median(pos))) / 100
            bins = np.geomspace(max(edges_src.min(), floor) / 1.5, edges_src.max() * 1.5, 40)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        else:
            bins = 40
        cond = d["condition"].fillna("") if "condition" in d else pd.Series("", index=d.index)
        for (temp, c), g in d.groupby([d["temperature"].astype(float).fillna(-1), cond], sort=True):
            label = c or ("T ?" if temp == -1 else f"{temp:g} K")
            v = g["max_devi_f"].to_numpy(float)
            if len(edges_src):  # zeros would fall off a log axis: count them in the first bin
                v = np.maximum(v, bins[0])
            ax.hist(v, bins=bins, histtype="step", linewidth=1.6, label=label)
        for v, ls, lab in zip(lo_hi, ("--", "-"), ("theta_low", "theta_high")):
            if v is not None and np.isfinite(v):
                ax.axvline(v, color="k", linestyle=ls, linewidth=1.2, label=f"{lab} = {v:g}")
        ax.set_title(name)
        ax.set_xlabel("max force deviation (eV/A)")
        ax.set_ylabel("frames")
        ax.legend(fontsize=7)
    return to_base64(fig)


def learning_curves(curves: dict[str, pd.DataFrame]) -> str | None:
    """Energy (eV/atom) and force (eV/A) training RMSE against step, one line per model."""
    curves = {k: v for k, v in curves.items() if len(v)}
    if not curves:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, key, ylabel in zip(axes, ("rmse_e", "rmse_f"), ("energy RMSE (eV/atom)", "force RMSE (eV/A)")):
        for i, (name, df) in enumerate(sorted(curves.items())):
            color = f"C{i % 10}"
            for part, ls in (("trn", "-"), ("val", "--")):
                col = f"{key}_{part}"
                if col in df and np.isfinite(df[col]).any():
                    ax.plot(df["step"], df[col], ls, color=color, label=f"{name} {part}")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    return to_base64(fig)


def parity(preds, max_points: int = 20000, seed: int = 0) -> str | None:
    """Per system (and test set): ensemble-mean prediction against reference, energy per atom and
    force components; points coloured by data source."""
    if not preds:
        return None
    groups: dict[str, list] = {}
    for p in preds:
        groups.setdefault(p.system if not p.source.startswith("test:") else p.source, []).append(p)
    rng = np.random.default_rng(seed)
    fig, axes = _grid(2 * len(groups), width=3.6, height=3.4, ncols=4)
    for k, (name, ps) in enumerate(groups.items()):
        ax_e, ax_f = axes[2 * k], axes[2 * k + 1]
        span = {"energy": [], "force": []}
        for i, p in enumerate(ps):
            color = f"C{i % 10}"
            er, ep = p.e_ref / p.natoms, p.e_pred.mean(0) / p.natoms
            ax_e.scatter(er, ep, s=10, color=color, label=p.source)
            fr, fp = p.f_ref.reshape(-1), p.f_pred.mean(0).reshape(-1)
            if len(fr) > max_points:  # keep the PNG small; the RMSE uses all points
                idx = rng.choice(len(fr), max_points, replace=False)
                fr, fp = fr[idx], fp[idx]
            ax_f.scatter(fr, fp, s=3, color=color, alpha=0.6)
            span["energy"] += [er, ep]
            span["force"] += [fr, fp]
        for ax, what, unit in ((ax_e, "energy", "eV/atom"), (ax_f, "force", "eV/A")):
            v = np.concatenate(span[what])
            lo, hi = float(v.min()), float(v.max())
            pad = 0.05 * (hi - lo) if hi > lo else max(abs(hi), 1e-3) * 0.05
            lim = np.array([lo - pad, hi + pad])
            ax.plot(lim, lim, "k-", linewidth=0.8)
            ax.set_xlim(lim)
            ax.set_ylim(lim)
            ax.set_xlabel(f"reference {what} ({unit})")
            ax.set_ylabel(f"predicted {what} ({unit})")
            ax.set_title(f"{name}: {what}", fontsize=10)
        ax_e.legend(fontsize=7)
    return to_base64(fig)


def rule_time_bars(times: pd.DataFrame) -> str | None:
    """Total wall time per Snakemake rule (s)."""
    if not len(times):
        return None
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(times) + 1.2))
    ax.barh(times["rule"], times["wall_s_total"], color="C0")
    ax.set_xlabel("wall time, sum over jobs (s)")
    return to_base64(fig)


def run_trends(run: pd.DataFrame) -> str | None:
    """Run level, per system against iteration: accurate ratio, energy and force RMSE (ensemble mean on
    all labelled data so far), dataset size (frames)."""
    if not len(run):
        return None
    panels = [
        ("accurate_ratio", "accurate ratio", False),
        ("rmse_e_atom", "energy RMSE (eV/atom)", True),
        ("rmse_f", "force RMSE (eV/A)", True),
        ("data_frames", "labelled frames", False),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.4))
    for ax, (col, label, logy) in zip(axes, panels):
        for i, (name, g) in enumerate(run.groupby("system", sort=True)):
            if col in g and pd.to_numeric(g[col], errors="coerce").notna().any():
                ax.plot(g["iteration"], pd.to_numeric(g[col], errors="coerce"), "o-", color=f"C{i % 10}", label=name)
        if col == "accurate_ratio" and "threshold" in run and run["threshold"].notna().any():
            ax.axhline(float(run["threshold"].dropna().iloc[0]), color="k", linestyle="--", label="threshold")
        if logy and ax.lines:
            ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.lines:
            ax.legend(fontsize=7)
    return to_base64(fig)


def learning_vs_labels(lc: pd.DataFrame) -> str | None:
    """Run level: ensemble-mean force (top) and energy (bottom) RMSE against labelled frames trained on.
    One column per system (error on the iteration's new labels against that system's labels), and one
    for the test sets (against all labels); log-scale y where the values span more than a factor 3."""
    if not len(lc):
        return None
    nxt, test = lc[lc["set"] == "next"], lc[lc["set"] == "test"]
    panels = [
        (f"{name}: new labels (next iteration)", g, "labels_system", f"labelled frames of {name}")
        for name, g in nxt.groupby("system", sort=True)
    ]
    if len(test):
        panels.append(("test sets", test, "labels_total", "labelled frames (all systems)"))
    fig, axes = plt.subplots(2, len(panels), figsize=(4.4 * len(panels) + 0.5, 6.4), squeeze=False)
    for j, (title, g, xcol, xlabel) in enumerate(panels):
        for row, (col, ylabel) in enumerate(
            (("rmse_f", "force RMSE (eV/A)"), ("rmse_e_atom", "energy RMSE (eV/atom)"))
        ):
            ax = axes[row][j]
            for i, (name, s) in enumerate(g.groupby("system", sort=True)):
                s = s.sort_values("iteration")
                y = pd.to_numeric(s[col], errors="coerce").to_numpy(float)
                x = pd.to_numeric(s[xcol], errors="coerce").to_numpy(float)
                ax.plot(x, y, "o-", color=f"C{i % 10}", label=name)
                for xi, yi, it in zip(x, y, s["iteration"]):
                    ax.annotate(str(it), (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7)
            v = pd.to_numeric(g[col], errors="coerce").dropna()
            if ax.lines and (v > 0).all() and v.max() > 3 * v.min():  # log where it spans a factor > 3
                ax.set_yscale("log")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if row == 0:
                ax.set_title(title, fontsize=10)
            if ax.lines and xcol == "labels_total":
                ax.legend(fontsize=7)
    return to_base64(fig)
