"""Labelled frames -> deepmd/npy datasets (dpdata), with one provenance row per frame.

A dataset folder is written under a temporary name and renamed when complete, so a kill never leaves
half a dataset, and a rerun replaces (never appends to) what an earlier attempt wrote.
"""

from __future__ import annotations

import csv
import io
import pathlib

import numpy as np

PROVENANCE_COLUMNS = ["iteration", "system", "walker", "step", "max_devi_f", "task"]


def labeled_system(frames: list, type_map: list[str]):
    """Labelled ase.Atoms (SinglePointCalculator results) of one system -> one dpdata.LabeledSystem
    whose atom names follow the global ``type_map`` (elements absent from the frames included)."""
    import dpdata

    out = None
    for atoms in frames:
        s = dpdata.LabeledSystem(atoms, fmt="ase/structure")
        s.apply_type_map(type_map)
        out = s if out is None else out + s
    return out


def provenance_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=PROVENANCE_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in PROVENANCE_COLUMNS})
    return buf.getvalue()


def write_system(folder: pathlib.Path, frames: list, rows: list[dict], type_map: list[str]) -> int:
    """Write frames (ase.Atoms with results) as deepmd/npy in ``folder`` (which must not exist yet,
    callers write into a temporary parent) plus provenance.csv. Returns the number of frames."""
    folder = pathlib.Path(folder)
    s = labeled_system(frames, type_map)
    s.to_deepmd_npy(str(folder), set_size=max(len(frames), 1))
    (folder / "provenance.csv").write_text(provenance_text(rows))
    return len(s)


def system_folders(roots: list) -> list[pathlib.Path]:
    """deepmd/npy system folders (holding type.raw) directly under the given dataset roots."""
    out = []
    for r in roots:
        r = pathlib.Path(r)
        if (r / "type.raw").is_file():
            out.append(r)
        elif r.is_dir():
            out += sorted(p for p in r.iterdir() if (p / "type.raw").is_file())
    return out


def frame_keys(folder: pathlib.Path) -> list[bytes]:
    """A hash key per frame (coordinates rounded to 1e-6 A): used to assert that no frame repeats."""
    import dpdata

    s = dpdata.LabeledSystem(str(folder), fmt="deepmd/npy")
    return [np.round(c, 6).tobytes() for c in s["coords"]]
