"""Which labelled data was built from an older version of a structure file.

Initial data records what it was made from in ``data/init/<system>/source.json`` and each iteration's
plan records its start structures in ``explore/plan.json`` (``structures``: file and content hash,
``dpsnake.workflow.structures.fingerprint``). Finished work is kept when a structure file is edited
(only unfinished iterations follow the new file), so the reports list the datasets whose frames come
from a structure that has changed since.
"""

from __future__ import annotations

import json
import pathlib

import pandas as pd

from dpsnake.report import readers

COLUMNS = ["data", "system", "note"]


def _json(path: pathlib.Path):
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a damaged record only means we cannot tell: say nothing


def current_structures(config: dict, workdir: pathlib.Path) -> dict[str, dict]:
    """{system: fingerprint} of the structures the config names now (files resolved against workdir)."""
    from dpsnake.workflow.structures import fingerprint

    out = {}
    for name, sc in (config.get("systems") or {}).items():
        if isinstance(sc, dict) and isinstance(sc.get("structure"), dict):
            out[name] = fingerprint(sc["structure"], workdir)
    return out


def _dataset_changed(src: dict, now: str | None, workdir: pathlib.Path) -> str | None:
    """How an existing dataset the initial data was converted from differs from the configured one."""
    from dpsnake.workflow.structures import path_sha256, path_stat

    if now != src["init_data"]:
        return f"converted from {src['init_data']}; the config now names {now or 'generated data'}"
    p = pathlib.Path(now)
    p = p if p.is_absolute() else workdir / p
    if src.get("init_data_stat") and path_stat(p) == src["init_data_stat"]:
        return None  # same files, sizes and times: not hashed again (status stays instant)
    sha = path_sha256(p)
    if src.get("init_data_sha256") and sha != src["init_data_sha256"]:
        return (
            f"converted from an older version of {now} (sha256 {src['init_data_sha256'][:12]}, "
            f"now {sha[:12] if sha else 'missing'})"
        )
    return None


def stale_data(config: dict, results: pathlib.Path, workdir: pathlib.Path, upto: int | None = None) -> pd.DataFrame:
    """Datasets (``data/init/<system>``, ``data/iter.K/<system>`` with K <= upto) whose frames were built
    from a structure that differs from the current one: columns data, system, note."""
    results = pathlib.Path(results)
    current = current_structures(config, pathlib.Path(workdir))
    rows = []
    if current:
        from dpsnake.workflow.structures import changed

        for name in sorted(current):
            src = _json(results / "data" / "init" / name / "source.json") or {}
            note = changed(src.get("structure"), current[name])
            if src.get("init_data"):
                note = _dataset_changed(src, (config["systems"][name] or {}).get("init_data"), pathlib.Path(workdir))
            if note:
                rows.append({"data": f"data/init/{name}", "system": name, "note": f"initial data {note}"})
        for it in readers.iterations(results):
            if upto is not None and it > upto:
                break
            plan = _json(results / readers.iter_name(it) / "explore" / "plan.json") or {}
            for name, rec in sorted((plan.get("structures") or {}).items()):
                data = results / "data" / readers.iter_name(it) / name
                note = changed(rec, current.get(name))
                if note and data.is_dir():
                    rows.append(
                        {
                            "data": f"data/{readers.iter_name(it)}/{name}",
                            "system": name,
                            "note": f"explored from a start structure {note}",
                        }
                    )
    return pd.DataFrame(rows, columns=COLUMNS)


def html_note(df: pd.DataFrame) -> str:
    """A warning paragraph plus the table, or '' when every dataset matches the current files."""
    from dpsnake.report import html

    if not len(df):
        return ""
    return (
        '<p class="no">Some labelled data was built from an older version of an input file (finished work '
        "is kept when a file changes; unfinished iterations use the new file):</p>" + html.table(df)
    )
