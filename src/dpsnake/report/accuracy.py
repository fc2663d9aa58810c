"""Accuracy of an iteration's model ensemble on labelled data, computed with dpsnake's own engine
(DeePMD-kit's PyTorch models for those the engine does not run).

Datasets are read with dpdata (deepmd/npy); all frames of one dataset are evaluated as one flat batch
(each frame is one "system" of the engine's layout). Energies are compared per atom (eV/atom), forces
per Cartesian component (eV/A), as DeePMD-kit's ``dp test`` does:
``rmse_e_atom = sqrt(mean_f ((E_pred - E_ref) / natoms)^2)``, ``rmse_f = sqrt(mean (F_pred - F_ref)^2)``.
"""

from __future__ import annotations

import pathlib
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dpsnake.errors import UserError

# frames per engine call: bounds memory (neighbour data of ~20k atoms) without slowing small sets
MAX_ATOMS_PER_BATCH = 20000
COLUMNS = ["set", "system", "source", "model", "frames", "atoms", "rmse_e_atom", "rmse_f", "sel_overflow"]


@dataclass
class Prediction:
    """Reference and predicted labels of one dataset.

    e_ref (F,) eV; e_pred (M, F) eV; natoms (F,); f_ref (F, n, 3) eV/A; f_pred (M, F, n, 3) eV/A.
    """

    system: str
    source: str
    e_ref: np.ndarray
    e_pred: np.ndarray
    natoms: np.ndarray
    f_ref: np.ndarray
    f_pred: np.ndarray
    overflow: int = 0  # atom-evaluations whose neighbours within rcut exceeded the models' sel


def load_ensemble(model_paths: list[pathlib.Path]):
    """The ensemble of the given ``.dp`` files and its type_map: the engine's ``Ensemble`` (FP64) where
    it runs every model, else DeePMD-kit's own PyTorch models (same ``evaluate``)."""
    if not model_paths:
        raise UserError("report: no trained models (train/model.K/model.dp) for this iteration")
    from dpsnake.md.engines import choose

    paths = [str(p) for p in model_paths]
    engine, _, loaded = choose("auto", paths)
    if engine == "deepmd":
        from dpsnake.md.deepmd_provider import DeepmdProvider

        prov = DeepmdProvider(paths)
        return prov, list(prov.type_map)
    from dpsnake.engine.dispatch import make_ensemble

    ens = make_ensemble(loaded, precision="double")
    return ens, list(ens.type_map)


def read_labelled(path: pathlib.Path):
    """A deepmd/npy folder as a ``dpdata.LabeledSystem`` (one clear line if it is not one)."""
    import dpdata

    path = pathlib.Path(path)
    if not (path / "type.raw").is_file():
        raise UserError(f"{path}: not a deepmd/npy dataset (no type.raw)")
    try:
        return dpdata.LabeledSystem(str(path), fmt="deepmd/npy")
    except Exception as err:  # dpdata raises many kinds for broken sets
        raise UserError(f"{path}: cannot read as deepmd/npy ({type(err).__name__}: {err})") from None


def predict(ensemble, type_map: list[str], sys_, system: str, source: str) -> Prediction:
    """Evaluate all frames of a dpdata LabeledSystem with the ensemble (M models)."""
    names = list(sys_["atom_names"])
    missing = [n for n in names if n not in type_map]
    if missing:
        raise UserError(f"dataset {source}/{system}: elements {missing} not in the models' type_map {type_map}")
    atype = np.array([type_map.index(names[t]) for t in sys_["atom_types"]], dtype=np.int64)
    coords = np.asarray(sys_["coords"], dtype=np.float64)
    nf, n = coords.shape[:2]
    cells = np.asarray(sys_["cells"], dtype=np.float64)
    periodic = not bool(sys_.nopbc) if hasattr(sys_, "nopbc") else True
    e_pred, f_pred, overflow = [], [], 0
    step = max(1, MAX_ATOMS_PER_BATCH // max(n, 1))
    for a in range(0, nf, step):
        b = min(nf, a + step)
        k = b - a
        with warnings.catch_warnings():  # counted and shown in the report instead
            warnings.simplefilter("ignore", RuntimeWarning)
            out = ensemble.evaluate(
                coords[a:b].reshape(k * n, 3),
                np.tile(atype, k),
                np.repeat(np.arange(k), n),
                cells[a:b],
                np.full(k, periodic),
            )
        overflow += int(getattr(ensemble, "last_overflow", 0) or 0)
        e_pred.append(np.asarray(out["energy"]))  # (M, k)
        f_pred.append(np.asarray(out["force"]).reshape(-1, k, n, 3))  # (M, k, n, 3)
    return Prediction(
        system,
        source,
        np.asarray(sys_["energies"], dtype=np.float64).reshape(nf),
        np.concatenate(e_pred, axis=1),
        np.full(nf, n),
        np.asarray(sys_["forces"], dtype=np.float64).reshape(nf, n, 3),
        np.concatenate(f_pred, axis=1),
        overflow,
    )


def rmse_rows(
    preds: list[Prediction], set_name: str, system: str, source: str = "all", mean_only: bool = False
) -> list[dict]:
    """RMSE rows over the union of ``preds`` (one system): one per model and one for the ensemble
    mean prediction (``model="mean"``)."""
    e_ref = np.concatenate([p.e_ref for p in preds])
    nat = np.concatenate([p.natoms for p in preds])
    e_pred = np.concatenate([p.e_pred for p in preds], axis=1)  # (M, F)
    f_ref = np.concatenate([p.f_ref.reshape(-1) for p in preds])
    f_pred = np.concatenate([p.f_pred.reshape(p.f_pred.shape[0], -1) for p in preds], axis=1)
    rows = []
    preds_by_model = [] if mean_only else [(f"model.{m}", e_pred[m], f_pred[m]) for m in range(e_pred.shape[0])]
    preds_by_model.append(("mean", e_pred.mean(0), f_pred.mean(0)))
    for name, ep, fp in preds_by_model:
        rows.append(
            {
                "set": set_name,
                "system": system,
                "source": source,
                "model": name,
                "frames": int(len(e_ref)),
                "atoms": int(nat.sum()),
                "rmse_e_atom": float(np.sqrt(np.mean(((ep - e_ref) / nat) ** 2))),
                "rmse_f": float(np.sqrt(np.mean((fp - f_ref) ** 2))),
                "sel_overflow": int(sum(p.overflow for p in preds)),
            }
        )
    return rows


def accuracy(
    model_paths,
    labelled: list[dict],
    test_sets: list[dict],
    progress=lambda msg: print(msg, file=sys.stderr, flush=True),
) -> tuple[pd.DataFrame, list[Prediction]]:
    """RMSE table and predictions of the ensemble on labelled data and test sets.

    labelled: [{"source", "system", "path"}] (collect.datasets); test_sets: [{"name", "path"}].
    Table columns: set ("labelled" or "test"), system (the test set's name for tests), source ("all":
    the union of the system's datasets; "init", "iter.K": one dataset, ensemble mean only), model
    ("model.K" or "mean"), frames, atoms, rmse_e_atom (eV/atom), rmse_f (eV/A), sel_overflow (atoms
    whose neighbours within rcut exceeded sel).
    """
    if not labelled and not test_sets:
        return pd.DataFrame(columns=COLUMNS), []
    ensemble, type_map = load_ensemble(model_paths)
    preds: list[Prediction] = []
    rows: list[dict] = []
    by_system: dict[str, list[Prediction]] = {}
    for d in labelled:
        progress(f"dpsnake report: evaluating {len(model_paths)} models on {d['source']}/{d['system']}")
        p = predict(ensemble, type_map, read_labelled(d["path"]), d["system"], d["source"])
        preds.append(p)
        by_system.setdefault(d["system"], []).append(p)
    for system, ps in by_system.items():
        rows += rmse_rows(ps, "labelled", system)
        if len(ps) > 1:  # e.g. this iteration's new labels, never seen by these models
            for p in ps:
                rows += rmse_rows([p], "labelled", system, source=p.source, mean_only=True)
    for t in test_sets:
        progress(f"dpsnake report: evaluating {len(model_paths)} models on test set {t['name']}")
        p = predict(ensemble, type_map, read_labelled(t["path"]), t["name"], "test:" + t["name"])
        preds.append(p)
        rows += rmse_rows([p], "test", t["name"])
    return pd.DataFrame(rows), preds


def test_sets_from_config(config: dict, base: pathlib.Path) -> list[dict]:
    """The config's ``test_data`` (a list of deepmd/npy folders, or of {"name", "path"}) resolved
    against ``base``; each folder may also hold several system folders. Fails naming the entry."""
    entries = config.get("test_data") or []
    if not isinstance(entries, list):
        raise UserError("test_data: must be a list of deepmd/npy folders")
    out = []
    for i, e in enumerate(entries):
        path, name = (e.get("path"), e.get("name")) if isinstance(e, dict) else (e, None)
        if not isinstance(path, str):
            raise UserError(f"test_data[{i}]: expected a folder path, got {e!r}")
        p = pathlib.Path(path)
        p = p if p.is_absolute() else (base / p)
        if (p / "type.raw").is_file():
            out.append({"name": name or p.name, "path": p})
            continue
        subs = sorted(s for s in p.glob("*") if (s / "type.raw").is_file()) if p.is_dir() else []
        if not subs:
            raise UserError(f"test_data[{i}]: {path}: not a deepmd/npy folder (no type.raw in it or its subfolders)")
        out += [{"name": f"{name or p.name}/{s.name}", "path": s} for s in subs]
    return out
