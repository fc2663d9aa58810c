"""Candidate selection from model deviations (DP-GEN's 01.model_devi -> 02.fp step), pure functions.

Classes per frame: 0 accurate (deviation < theta_low), 1 candidate (theta_low <= dev < theta_high),
2 failed (>= theta_high). With virial trust levels, a frame is accurate only if both force and virial
are below their low levels and failed if either reaches its high level.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np

ACCURATE, CANDIDATE, FAILED = 0, 1, 2
MODEL_DEVI_COLUMNS = ["step", "max_devi_v", "min_devi_v", "avg_devi_v", "max_devi_f", "min_devi_f", "avg_devi_f"]


def read_model_devi(path) -> dict[str, np.ndarray]:
    """``model_devi.out`` (LAMMPS plugin format; an extra devi_e column is allowed) -> column arrays.
    ``step`` is int (n,), the others float (n,) in eV/A (force) and eV/atom (virial)."""
    path = pathlib.Path(path)
    header = None
    with open(path) as f:
        first = f.readline()
        if first.startswith("#"):
            header = first.lstrip("#").split()
    data = np.loadtxt(path, ndmin=2, comments="#")
    names = header if header and len(header) == data.shape[1] else MODEL_DEVI_COLUMNS[: data.shape[1]]
    if data.shape[0] == 0:
        data = np.zeros((0, len(names)))
    out = {n: data[:, i] for i, n in enumerate(names)}
    out["step"] = out["step"].astype(int)
    return out


def classify(devi_f, trust_f, devi_v=None, trust_v=None) -> np.ndarray:
    """Class per frame (n,) int: ACCURATE / CANDIDATE / FAILED. trust_*: (lo, hi)."""
    devi_f = np.asarray(devi_f, dtype=float)
    lo, hi = trust_f
    failed = ~(devi_f < hi)  # NaN deviations count as failed
    accurate = devi_f < lo
    if trust_v is not None and devi_v is not None:
        devi_v = np.asarray(devi_v, dtype=float)
        failed |= ~(devi_v < trust_v[1])
        accurate &= devi_v < trust_v[0]
    cls = np.full(devi_f.shape, CANDIDATE, dtype=int)
    cls[accurate] = ACCURATE
    cls[failed] = FAILED
    return cls


def adaptive_lo(devi_f, lo: float, hi: float, numb: int, ratio: float, min_lo: float = 0.0) -> float:
    """Lower trust level lowered so that at least ``max(numb, ceil(ratio * n))`` frames below ``hi``
    become candidates (DP-GEN's adaptive trust_lo); never above the configured ``lo``, never below ``min_lo``."""
    devi = np.asarray(devi_f, dtype=float)
    want = max(int(numb), int(math.ceil(ratio * len(devi))))
    below = np.sort(devi[devi < hi])[::-1]
    if want <= 0 or not len(below):
        return lo
    value = below[min(want, len(below)) - 1]
    return float(max(min(lo, value), min_lo))


def adaptive_hi(devi_f, hi: float, ratio: float | None, max_hi: float | None = None) -> float:
    """Upper trust level raised so that at most ``floor(ratio * n)`` of the ``n`` frames reach it (they
    are failed); never below the configured ``hi``, never above ``max_hi``. ``ratio`` None: ``hi``.

    Why: one trust window rarely fits every system; an alloy the early models barely know can have most
    frames above a window set for the pure metal, and in-window picks are then its least informative
    frames. NaN deviations stay failed (they are not counted as frames here)."""
    if ratio is None:
        return float(hi)
    devi = np.sort(np.asarray(devi_f, dtype=float)[np.isfinite(devi_f)])[::-1]
    allowed = int(math.floor(ratio * len(devi) + 1e-9))
    if allowed >= len(devi) or devi[allowed] < hi:
        return float(hi)
    value = float(np.nextafter(devi[allowed], np.inf))  # failed: >= value, i.e. the `allowed` largest
    return value if max_hi is None else float(max(hi, min(value, max_hi)))


def structure_problem(
    atoms, min_dist: float, min_angle: float, vol_range, ref_vol_per_atom: float | None
) -> str | None:
    """Why a frame must not be labelled (too-close atoms, degenerate cell), or None if it is fine."""
    from ase.neighborlist import neighbor_list

    if not np.all(np.isfinite(atoms.positions)):
        return "non-finite coordinates"
    if atoms.pbc.any():
        cell = atoms.cell
        if cell.rank < 3 or abs(cell.volume) < 1e-6:
            return "degenerate cell"
        angles = cell.cellpar()[3:]
        if np.any(angles < min_angle) or np.any(angles > 180 - min_angle):
            return f"cell angle {angles.min():.1f}-{angles.max():.1f} deg outside [{min_angle:g}, {180 - min_angle:g}]"
        if ref_vol_per_atom:
            f = abs(cell.volume) / len(atoms) / ref_vol_per_atom
            if not vol_range[0] <= f <= vol_range[1]:
                return f"volume per atom {f:.2f}x the start structure's, outside {list(vol_range)}"
    if min_dist > 0 and len(atoms) > 1:
        d = neighbor_list("d", atoms, min_dist)
        if len(d):
            return f"atoms {d.min():.3f} A apart (< min_dist {min_dist:g} A)"
    return None


def pick(indices: np.ndarray, devi: np.ndarray, nmax: int, mode: str, rng: np.random.Generator) -> np.ndarray:
    """Up to ``nmax`` of ``indices``: a random sample, or those with the highest deviation. Sorted."""
    indices = np.asarray(indices)
    if len(indices) <= nmax:
        return np.sort(indices)
    if mode == "highest":
        order = np.argsort(-np.asarray(devi)[indices], kind="stable")
        return np.sort(indices[order[:nmax]])
    return np.sort(rng.choice(indices, size=nmax, replace=False))


def decide(
    stats_systems: dict,
    threshold: float,
    it: int,
    stage: int,
    stage_it: int,
    nstages: int,
    stage_max_iterations: int,
    max_iterations: int,
) -> dict:
    """Convergence decision: {'converged', 'stop', 'next_stage', 'reason'}."""
    low = {s: v["accurate_ratio"] for s, v in stats_systems.items() if not v["accurate_ratio"] >= threshold}
    stage_conv = bool(stats_systems) and not low
    last = stage == nstages - 1
    why_not = ", ".join(f"{s} {r:.3f}" for s, r in sorted(low.items())) or "no frames explored"
    if stage_conv and last:
        return {
            "converged": True,
            "stop": True,
            "next_stage": None,
            "reason": f"every system's accurate ratio >= {threshold:g} in the last stage (stage {stage})",
        }
    if it + 1 >= max_iterations:
        what = f"stage {stage} converged" if stage_conv else f"accurate ratio below {threshold:g}: {why_not}"
        return {
            "converged": False,
            "stop": True,
            "next_stage": None,
            "reason": f"stopped: max_iterations {max_iterations} reached ({what})",
        }
    if stage_conv:
        return {
            "converged": False,
            "stop": False,
            "next_stage": stage + 1,
            "reason": f"stage {stage} converged (accurate ratio >= {threshold:g}); next: stage {stage + 1}",
        }
    if stage_it + 1 >= stage_max_iterations:
        if last:
            return {
                "converged": False,
                "stop": True,
                "next_stage": None,
                "reason": f"stopped: exploration plan exhausted (last stage {stage} used its "
                f"{stage_max_iterations} iteration(s); accurate ratio below {threshold:g}: {why_not})",
            }
        return {
            "converged": False,
            "stop": False,
            "next_stage": stage + 1,
            "reason": f"stage {stage} not converged after {stage_max_iterations} iteration(s) "
            f"({why_not}); next: stage {stage + 1}",
        }
    return {
        "converged": False,
        "stop": False,
        "next_stage": stage,
        "reason": f"not converged: accurate ratio below {threshold:g}: {why_not}; repeating stage {stage}",
    }


def decide_from_stats(cfg: dict, stats: dict) -> dict:
    """The decision for an iteration's stats.json under the given (current) config."""
    stages = cfg["explore"]["stages"]
    stage = min(int(stats["stage"]), len(stages) - 1)
    return decide(
        stats["systems"],
        cfg["convergence"]["accurate_ratio"],
        int(stats["iteration"]),
        stage,
        int(stats["stage_iteration"]),
        len(stages),
        stages[stage]["max_iterations"],
        cfg["convergence"]["max_iterations"],
    )
