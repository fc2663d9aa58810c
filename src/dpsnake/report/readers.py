"""Read one run's files (the contracts of docs/architecture.md) into plain dicts and pandas tables.

Nothing here computes physics: it only parses ``stats.json``, ``collect/summary.json``,
``explore/{walkers,summary}.json``, ``model_devi.out``, ``lcurve.out``, Snakemake benchmark ``.tsv``
files and lists the deepmd/npy datasets. Every reader tolerates a missing file (a run in progress)
by returning an empty table or ``None``; a file that exists but cannot be parsed raises
``UserError`` naming the file.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pandas as pd

from dpsnake.errors import UserError

ITER_RE = re.compile(r"^iter\.(\d{6})$")


def iter_name(it: int) -> str:
    """``iter.NNNNNN`` for iteration ``it``."""
    return f"iter.{int(it):06d}"


def iterations(results: pathlib.Path) -> list[int]:
    """Sorted iteration numbers that have a ``results/iter.NNNNNN/`` folder."""
    results = pathlib.Path(results)
    if not results.is_dir():
        return []
    return sorted(int(m.group(1)) for p in results.iterdir() if (m := ITER_RE.match(p.name)) and p.is_dir())


def _read_json(path: pathlib.Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def read_stats(results: pathlib.Path, it: int) -> dict | None:
    """``results/iter.N/select/stats.json`` as a dict (None while selection has not run)."""
    return _read_json(pathlib.Path(results) / iter_name(it) / "select" / "stats.json")


def stats_table(stats: dict | None) -> pd.DataFrame:
    """Per-system selection counts: one row per system, the columns of stats.json's ``systems``."""
    cols = [
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
        "selected",
    ]
    if not stats or not stats.get("systems"):
        return pd.DataFrame(columns=cols)
    rows = [{"system": name, **vals} for name, vals in stats["systems"].items()]
    df = pd.DataFrame(rows)
    return df[[c for c in cols if c in df.columns] + [c for c in df.columns if c not in cols]]


def read_collect(results: pathlib.Path, it: int) -> dict | None:
    """``results/iter.N/collect/summary.json`` (labelled / failed-label counts), None if absent."""
    return _read_json(pathlib.Path(results) / iter_name(it) / "collect" / "summary.json")


def walkers_table(results: pathlib.Path, it: int, stats: dict | None = None) -> pd.DataFrame:
    """One row per exploration walker: name, system, temperature (K), pressure (bar), ensemble,
    nsteps (planned), steps (reached), status, reason, recipe (how its start structure was generated). Joins explore/walkers.json, explore/summary.json
    and stats.json's ``walkers`` (whichever exist)."""
    explore = pathlib.Path(results) / iter_name(it) / "explore"
    rows: dict[str, dict] = {}
    for w in _read_json(explore / "walkers.json") or []:
        rows[w["name"]] = {k: w.get(k) for k in ("system", "temperature", "pressure", "ensemble", "nsteps", "recipe")}
        rows[w["name"]]["condition"] = condition_label(w)
    for name, w in ((stats or {}).get("walkers") or {}).items():
        r = rows.setdefault(name, {})
        for k in ("system", "temperature", "pressure", "status", "reason"):
            if w.get(k) is not None or k not in r:
                r[k] = w.get(k)
    summ = (_read_json(explore / "summary.json") or {}).get("walkers") or {}
    for name, w in summ.items():
        r = rows.setdefault(name, {})
        r["status"] = w.get("status", r.get("status"))
        r["reason"] = w.get("reason", r.get("reason"))
        r["steps"] = w.get("steps")
    cols = ["walker", "system", "temperature", "pressure", "ensemble", "nsteps", "steps", "status", "reason", "recipe"]
    cols += ["condition"]
    df = pd.DataFrame([{"walker": n, **r} for n, r in rows.items()])
    for c in cols:
        if c not in df.columns:
            df[c] = None
    return df[cols].sort_values("walker", kind="stable").reset_index(drop=True) if len(df) else df[cols]


def condition_label(w: dict) -> str:
    """What a walker explores, for grouping deviations: its temperature (``300 K``) or temperature
    schedule (``300-2500-300 K``), a pressure schedule, ``relax``, and ``biased``."""
    from dpsnake.md.ramps import label

    if w.get("ensemble") == "relax":
        parts = ["relax"]
    elif w.get("temperature_ramp"):
        parts = [f"{label(w['temperature_ramp'])} K"]
    else:
        parts = [f"{float(w.get('temperature') or 0.0):g} K"]
    if w.get("pressure_ramp"):
        parts.append(f"{label(w['pressure_ramp'])} bar")
    if w.get("bias"):
        parts.append("biased")
    return ", ".join(parts)


def read_model_devi(path: pathlib.Path) -> pd.DataFrame:
    """A ``model_devi.out`` (LAMMPS plugin format, optional ``devi_e`` column) as a DataFrame whose
    columns are named from its header: step, max_devi_v, ..., max_devi_f (eV/A), ..."""
    path = pathlib.Path(path)
    names = None
    with open(path) as fh:
        for line in fh:
            if not line.startswith("#"):
                break
            if line.lstrip("#").split()[:1] == ["step"]:
                names = line.lstrip("#").split()
                break
    if not names:
        raise UserError(f"{path}: no '# step max_devi_v ...' header line")
    try:
        data = np.loadtxt(path, ndmin=2)
    except ValueError as err:
        raise UserError(f"{path}: cannot parse ({err})") from None
    if data.size == 0:
        return pd.DataFrame(columns=names)
    if data.shape[1] != len(names):
        raise UserError(f"{path}: {data.shape[1]} columns but the header names {len(names)}")
    df = pd.DataFrame(data, columns=names)
    df["step"] = df["step"].astype(int)
    return df


def deviations_table(results: pathlib.Path, it: int, walkers: pd.DataFrame) -> pd.DataFrame:
    """All frames' deviations of an iteration, long form: walker, system, temperature, pressure,
    step, max_devi_f (eV/A) and the other model_devi.out columns."""
    explore = pathlib.Path(results) / iter_name(it) / "explore"
    frames = []
    meta = walkers.set_index("walker") if len(walkers) else None
    names = list(walkers["walker"]) if len(walkers) else sorted(p.parent.name for p in explore.glob("*/model_devi.out"))
    for name in names:
        f = explore / name / "model_devi.out"
        if not f.is_file():
            continue
        df = read_model_devi(f)
        df.insert(0, "walker", name)
        for k in ("condition", "system", "temperature", "pressure"):
            known = meta is not None and name in meta.index and k in meta.columns
            df.insert(1, k, meta.at[name, k] if known else None)
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["walker", "system", "temperature", "pressure", "step", "max_devi_f"])
    return pd.concat(frames, ignore_index=True)


def read_lcurve(path: pathlib.Path) -> pd.DataFrame:
    """DeePMD-kit's ``lcurve.out`` with its header's column names (step, rmse_trn, rmse_e_trn,
    rmse_f_trn, [rmse_*_val], lr): energies per atom in eV, forces in eV/A."""
    path = pathlib.Path(path)
    names = None
    with open(path) as fh:
        for line in fh:
            if line.startswith("#") and "step" in line:
                names = line.lstrip("#").split()
                break
    if not names:
        raise UserError(f"{path}: no '# step ...' header line (not a DeePMD-kit lcurve.out?)")
    data = np.genfromtxt(path, comments="#", ndmin=2)  # genfromtxt: 'nan' entries for missing val data
    if data.size == 0:
        return pd.DataFrame(columns=names)
    if data.shape[1] != len(names):
        raise UserError(f"{path}: {data.shape[1]} columns but the header names {len(names)}")
    return pd.DataFrame(data, columns=names)


def lcurves(results: pathlib.Path, it: int) -> dict[str, pd.DataFrame]:
    """``{"model.K": lcurve table}`` for the models of iteration ``it`` that have an lcurve.out."""
    train = pathlib.Path(results) / iter_name(it) / "train"
    return {p.parent.name: read_lcurve(p) for p in sorted(train.glob("model.*/lcurve.out"))}


def model_files(results: pathlib.Path, it: int) -> list[pathlib.Path]:
    """The ``.dp`` models of iteration ``it`` (``train/model.K/model.dp``), sorted by K."""
    train = pathlib.Path(results) / iter_name(it) / "train"
    found = list(train.glob("model.*/model.dp"))
    return sorted(found, key=lambda p: int(p.parent.name.split(".")[1]) if p.parent.name.split(".")[1].isdigit() else 0)


def benchmarks_table(bench_dir: pathlib.Path, it: int) -> pd.DataFrame:
    """Snakemake ``benchmark:`` files of iteration ``it`` (``bench_dir/iter.N/<rule>[.<wc>].tsv``):
    one row per file with rule, job (file stem), s (wall seconds), cpu_time (s), max_rss (MB)."""
    d = pathlib.Path(bench_dir) / iter_name(it)
    rows = []
    for f in sorted(d.glob("*.tsv")):
        try:
            t = pd.read_csv(f, sep="\t")
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise UserError(f"{f}: not a Snakemake benchmark table ({err})") from None
        if "s" not in t.columns or not len(t):
            raise UserError(f"{f}: not a Snakemake benchmark table (no 's' column)")
        rows.append(
            {
                # explore.shard.K / explore.merge: the sharded exploration's own rules
                "rule": {"shard": "explore_shard", "merge": "explore_merge"}.get(
                    f.stem.split(".")[1] if f.stem.startswith("explore.") else "", f.stem.split(".")[0]
                ),
                "job": f.stem,
                "s": float(t["s"].mean()),
                "cpu_time": float(pd.to_numeric(t.get("cpu_time"), errors="coerce").mean())
                if "cpu_time" in t
                else np.nan,
                "max_rss": float(pd.to_numeric(t.get("max_rss"), errors="coerce").mean()) if "max_rss" in t else np.nan,
            }
        )
    return pd.DataFrame(rows, columns=["rule", "job", "s", "cpu_time", "max_rss"])


def rule_times(bench: pd.DataFrame) -> pd.DataFrame:
    """Time per rule: jobs, total and max wall seconds, total CPU seconds."""
    if not len(bench):
        return pd.DataFrame(columns=["rule", "jobs", "wall_s_total", "wall_s_max", "cpu_s_total"])
    g = bench.groupby("rule", sort=True)
    return pd.DataFrame(
        {
            "jobs": g.size(),
            "wall_s_total": g["s"].sum(),
            "wall_s_max": g["s"].max(),
            "cpu_s_total": g["cpu_time"].sum(min_count=1),
        }
    ).reset_index()


def datasets(results: pathlib.Path, upto: int) -> list[dict]:
    """Labelled deepmd/npy datasets available at iteration ``upto``: ``results/data/init/<system>``
    and ``results/data/iter.K/<system>`` for K <= upto. Each: {"source", "system", "path"}."""
    data = pathlib.Path(results) / "data"
    out = []
    srcs = [("init", data / "init")] + [(iter_name(k), data / iter_name(k)) for k in range(int(upto) + 1)]
    for src, d in srcs:
        if not d.is_dir():
            continue
        for s in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if (s / "type.raw").is_file():
                out.append({"source": src, "system": s.name, "path": s})
    return out


def read_provenance(results: pathlib.Path, upto: int) -> pd.DataFrame:
    """All ``provenance.csv`` rows of ``results/data/iter.K/*`` with K <= upto."""
    tabs = [
        pd.read_csv(p)
        for d in datasets(results, upto)
        if d["source"] != "init"
        for p in [d["path"] / "provenance.csv"]
        if p.is_file()
    ]
    return (
        pd.concat(tabs, ignore_index=True)
        if tabs
        else pd.DataFrame(columns=["iteration", "system", "walker", "step", "max_devi_f", "task"])
    )
