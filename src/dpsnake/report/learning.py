"""The run's learning curve: accuracy of each iteration's ensemble against the labels it was trained on.

Taken from the iteration reports (``iter.NNNNNN.json``), never re-evaluated here:

- ``datasets`` (frames per system and source, counted by dpdata) gives the labels the models of
  iteration N were trained on: ``data/init`` plus ``data/iter.K`` for K < N (the workflow's
  ``train_data``), per system and in total;
- ``accuracy`` (ensemble-mean rows) gives the error on iteration N's new labels (``data/iter.N``,
  which those models never saw: the "next-iteration" error) and on each ``test_data`` set.
"""

from __future__ import annotations

import pandas as pd

from dpsnake.report import readers

COLUMNS = ["iteration", "set", "system", "labels_system", "labels_total", "frames", "rmse_e_atom", "rmse_f"]


def trained_labels(content: dict) -> tuple[dict[str, int], int]:
    """Frames the models of this iteration were trained on: per system, and in total."""
    src = readers.iter_name(content["iteration"])
    per: dict[str, int] = {}
    for d in content.get("datasets") or []:
        if d["source"] != src:
            per[d["system"]] = per.get(d["system"], 0) + int(d["frames"])
    return per, sum(per.values())


def rows(content: dict) -> list[dict]:
    """Learning-curve rows of one iteration report: set "next" (per system, the ensemble mean on this
    iteration's new labels) and set "test" (per test set)."""
    it = int(content["iteration"])
    src = readers.iter_name(it)
    per, total = trained_labels(content)
    mean = {(r["set"], r["system"], r["source"]): r for r in content.get("accuracy") or [] if r["model"] == "mean"}
    datasets = content.get("datasets") or []
    out = []
    for system in sorted({d["system"] for d in datasets if d["source"] == src}):
        r = mean.get(("labelled", system, src))
        if r is None and all(d["source"] == src for d in datasets if d["system"] == system):
            r = mean.get(("labelled", system, "all"))  # its only dataset: "all" is the new labels alone
        if r is not None:
            out.append(
                {
                    "iteration": it,
                    "set": "next",
                    "system": system,
                    "labels_system": per.get(system, 0),
                    "labels_total": total,
                    "frames": r["frames"],
                    "rmse_e_atom": r["rmse_e_atom"],
                    "rmse_f": r["rmse_f"],
                }
            )
    for (setname, name, _), r in sorted(mean.items()):
        if setname == "test":
            out.append(
                {
                    "iteration": it,
                    "set": "test",
                    "system": name,
                    "labels_system": None,
                    "labels_total": total,
                    "frames": r["frames"],
                    "rmse_e_atom": r["rmse_e_atom"],
                    "rmse_f": r["rmse_f"],
                }
            )
    return out


def table(contents: list[dict]) -> pd.DataFrame:
    """Learning-curve rows of every iteration, oldest first (see ``rows``)."""
    df = pd.DataFrame([r for c in contents for r in rows(c)], columns=COLUMNS)
    df["labels_system"] = df["labels_system"].astype("Int64")
    return df.sort_values(["set", "system", "iteration"], kind="stable").reset_index(drop=True)


def records(df: pd.DataFrame) -> list[dict]:
    """The table as JSON-safe dicts (blank -> None, counts as int, RMSE as float)."""
    out = []
    for rec in df.astype(object).where(df.notna(), None).to_dict(orient="records"):
        for k, v in rec.items():
            if v is not None and k in ("iteration", "labels_system", "labels_total", "frames"):
                rec[k] = int(v)
            elif v is not None and k.startswith("rmse"):
                rec[k] = float(v)
        out.append(rec)
    return out
