"""Model deviation of an ensemble, exactly as DeePMD-kit defines it (population std, ddof 0).

Per system (frame):
- force: sigma_i = || std_models(F_i) ||_xyz; max/min/avg over the system's atoms;
  relative: sigma_i / (|mean F_i| + relative).
- virial: std_models(V / natoms) per component (9); max, min, avg = ||sigma|| / 3;
  relative: sigma / (||mean V / natoms|| + relative_v).
- energy: std_models(E / natoms).
``model_devi.out`` is written in the LAMMPS plugin's column format (optionally with ``devi_e``).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from dpsnake.engine.xp import array_namespace, to_numpy
from dpsnake.errors import UserError

COLUMNS = ["step", "max_devi_v", "min_devi_v", "avg_devi_v", "max_devi_f", "min_devi_f", "avg_devi_f"]


def _seg_stats(xp, values, system, S):
    """max, min, mean of values (N,) per system (S,)."""
    from dpsnake.engine.xp import segment_minmax, segment_sum

    lo, hi = segment_minmax(xp, system, values[:, None], S)
    acc = segment_sum(xp, system, xp.stack([values, xp.ones_like(values)], axis=1), S)  # no host sync
    return hi[:, 0], lo[:, 0], acc[:, 0] / xp.maximum(acc[:, 1], 1)


def atom_force_deviation(force, relative: float | None = None):
    """sigma_i (N,) from force (M, N, 3)."""
    xp = array_namespace(force)
    dev = xp.sqrt((force.std(axis=0) ** 2).sum(axis=-1))
    if relative is not None:
        dev = dev / (xp.sqrt((force.mean(axis=0) ** 2).sum(axis=-1)) + relative)
    return dev


def force_deviation(force, system, nsystems: int | None = None, relative: float | None = None):
    """(max, min, avg) force deviation per system, each (S,); force (M, N, 3), system (N,)."""
    xp = array_namespace(force)
    system = xp.asarray(system)
    S = int(to_numpy(system.max())) + 1 if nsystems is None else nsystems
    return _seg_stats(xp, atom_force_deviation(force, relative), system, S)


def virial_deviation(virial, natoms, relative: float | None = None):
    """(max, min, avg) virial deviation per system; virial (M, S, 9) eV, natoms (S,)."""
    xp = array_namespace(virial)
    v = virial / xp.asarray(natoms, dtype=xp.float64)[None, :, None]
    dev = v.std(axis=0)
    if relative is not None:
        dev = dev / (xp.sqrt((v.mean(axis=0) ** 2).sum(axis=-1)) + relative)[:, None]
    return dev.max(axis=-1), dev.min(axis=-1), xp.sqrt((dev**2).sum(axis=-1)) / 3.0


def energy_deviation(energy, natoms):
    """std over models of E / natoms per system; energy (M, S)."""
    xp = array_namespace(energy)
    return (energy / xp.asarray(natoms, dtype=xp.float64)[None, :]).std(axis=0)


def deviation_columns(out: dict, system, natoms, relative=None, relative_v=None) -> dict:
    """All deviation columns per system from :meth:`Ensemble.evaluate` output (as NumPy arrays)."""
    S = out["energy"].shape[1]
    mv, nv, av = virial_deviation(out["virial"], natoms, relative_v)
    mf, nf, af = force_deviation(out["force"], system, S, relative)
    de = energy_deviation(out["energy"], natoms)
    xp = array_namespace(out["force"])
    names = ("max_devi_v", "min_devi_v", "avg_devi_v", "max_devi_f", "min_devi_f", "avg_devi_f", "devi_e")
    cols = to_numpy(xp.stack([mv, nv, av, mf, nf, af, de]))  # one copy to the host
    return dict(zip(names, cols))


def calc_model_devi(
    coords,
    cells,
    atom_types,
    models,
    fname=None,
    frequency: int = 1,
    relative: float | None = None,
    relative_v: float | None = None,
    precision: str = "double",
    **kwargs,
):
    """DeePMD-kit's ``calc_model_devi``: (nframes, 8) array with columns step, max_devi_v,
    min_devi_v, avg_devi_v, max_devi_f, min_devi_f, avg_devi_f, devi_e.

    coords (nf, nat*3) or (nf, nat, 3); cells (nf, 9) or None; atom_types (nat,);
    models: list of paths, DPModel / AttnModel, DeepPot objects, or one Ensemble / AttnEnsemble. Writes ``fname`` if given.
    """
    from dpsnake.engine.deeppot import DeepPot, frames_to_flat
    from dpsnake.engine.dispatch import make_ensemble

    if hasattr(models, "evaluate"):  # an Ensemble or AttnEnsemble
        ens = models
    else:
        ms = [m.ensemble.models[0] if isinstance(m, DeepPot) else m for m in models]
        ens = make_ensemble(ms, precision=precision)
    xp = array_namespace(coords)
    c, t, s, cl, pbc, nf, nat = frames_to_flat(xp, coords, cells, atom_types)
    if nat == 0:  # max/min over no atoms (DeePMD-kit's calc_model_devi fails here too)
        raise UserError("atom_types: no atoms: the force deviation of a frame without atoms is undefined")
    out = ens.evaluate(c, t, s, cl, pbc)
    cols = deviation_columns(out, s, xp.full(nf, nat), relative, relative_v)
    steps = np.arange(nf, dtype=np.int64) * frequency
    devi = np.column_stack([steps] + [cols[k] for k in COLUMNS[1:]] + [cols["devi_e"]])
    if fname:
        write_model_devi(fname, steps, cols, devi_e=True)
    return devi


def write_model_devi(path, steps, columns: dict, devi_e: bool = False, append: bool = False):
    """Write ``model_devi.out`` as the LAMMPS plugin does (header, %12d + 6 x ' %18.6e').

    steps (n,) ints; columns: dict with the 6 deviation columns (and ``devi_e`` if devi_e).
    append: add rows to an existing file (no header). Writes atomically (temp name + os.replace).
    """
    path = pathlib.Path(path)
    names = COLUMNS[1:] + (["devi_e"] if devi_e else [])
    header = "#" + f"{'step':>11s}" + "".join(f"{n:>19s}" for n in names)
    lines = []
    data = np.column_stack([to_numpy(columns[n]).astype(float).reshape(-1) for n in names])
    for st, row in zip(np.asarray(steps).reshape(-1), data):
        lines.append(f"{int(st):12d}" + "".join(f" {v:18.6e}" for v in row))
    old = path.read_text() if append and path.exists() else ""
    text = old if old else header + "\n"
    text += "".join(l + "\n" for l in lines)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_model_devi(path) -> dict:
    """Read a ``model_devi.out`` (ours, the LAMMPS plugin's or ``dp model-devi``'s) into
    {column name: np.ndarray}; ``step`` as int64."""
    path = pathlib.Path(path)
    with open(path) as fh:
        names = None
        for line in fh:
            if line.startswith("#"):
                toks = line[1:].split()
                if toks and toks[0] == "step":
                    names = toks
            else:
                break
    data = np.loadtxt(path, ndmin=2)
    if names is None:
        names = COLUMNS + (["devi_e"] if data.shape[1] > 7 else [])
    out = {n: data[:, k] for k, n in enumerate(names[: data.shape[1]])}
    out["step"] = out["step"].astype(np.int64)
    return out
