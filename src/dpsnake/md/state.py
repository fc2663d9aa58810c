"""The flat batched MD state: all atoms of all active walkers in one set of arrays.

Layout (as the engine's): atoms of walker 0, then walker 1, ...; ``system (N,)`` is sorted 0..S-1.
Internal units are ASE's: positions A, velocities A per ASE time unit (so F/m is an acceleration
with no factor), energies eV, masses amu, time steps in ASE time units. Arrays live in ``xp``
(NumPy or CuPy); nothing here copies to the host except ``to_host``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from dpsnake.md.walkers import Walker, degrees_of_freedom, maxwell_boltzmann

NHC_LENGTH = 3  # chain length, LAMMPS' default tchain

_ATOM = ("pos", "vel", "mass", "atype", "system", "local", "force")
_SYS = (
    "cells",
    "pbc",
    "energy",
    "virial",
    "seed",
    "natoms",
    "dt",
    "kT",
    "nf",
    "tau_t",
    "tau_p",
    "p0",
    "beta",
    "thermo",
    "baro",
    "nhc_eta",
    "nhc_v",
    "walker",
    "t_knot",
    "t_val",
    "p_knot",
    "p_val",
    "ramp",
    *("relax", "fire_tol", "fire_maxstep", "fire_dt", "fire_a", "fire_n", "fire_k", "fire_conv", "fire_cv", "fire_F"),
)
# bits of ``ramp`` (per walker): a temperature / pressure schedule, and whether it is stepped
R_T, R_T_STEPPED, R_P, R_P_STEPPED = 1, 2, 4, 8
# thermostat / barostat codes (per walker)
T_NONE, T_NHC, T_BUSSI, T_LANGEVIN = 0, 1, 2, 3
B_NONE, B_ISO, B_ANISO, B_TRI = 0, 1, 2, 3
_TCODE = {None: T_NONE, "nhc": T_NHC, "bussi": T_BUSSI, "langevin": T_LANGEVIN}
_BCODE = {None: B_NONE, "iso": B_ISO, "aniso": B_ANISO, "tri": B_TRI}
# per-walker bias arrays (dpsnake.md.bias); None in checkpoints written before biases existed
_BIAS = ("b_int", "b_par", "mtd", "b_out")


@dataclass
class BatchState:
    """Dynamic state and per-walker parameters of one batch.

    Atom arrays (N = all atoms): pos, vel, force (N, 3) float64; mass (N,) amu; atype, system,
    local (N,) int64 (local = index of the atom inside its walker, the RNG counter).
    Walker arrays (S = active walkers): cells (S, 3, 3) rows = lattice vectors (as the structure
    gives them: along a non-periodic direction the row plays no part); pbc (S, 3) bool per direction;
    energy (S,) eV and virial (S, 3, 3) eV of the driving model at ``pos``; seed (S,) uint64;
    natoms (S,); dt (S,) ASE time; kT (S,) eV; nf (S,) kinetic degrees of freedom; tau_t, tau_p
    (S,) ASE time; p0 (S,) eV/A^3; beta (S,) compressibility A^3/eV; thermo, baro (S,) codes;
    nhc_eta, nhc_v (S, NHC_LENGTH) chain positions and velocities; walker (S,) index into the
    full walker list. Target schedules (dpsnake.md.ramps): t_knot, t_val (S, K) knot steps and kT
    (eV); p_knot, p_val (S, K') knot steps and p0 (eV/A^3); ramp (S,) bits R_T, R_T_STEPPED, R_P,
    R_P_STEPPED. ``kT`` and ``p0`` hold the current targets (set in place at each step when a walker
    of the batch has a schedule). Biases (dpsnake.md.bias): b_int (S, 6), b_par (S, 9) parameters,
    mtd (S, H, 2) metadynamics Gaussians (centre, height eV), b_out (S, 2) CV and bias energy (eV).
    """

    pos: object
    vel: object
    mass: object
    atype: object
    system: object
    local: object
    force: object
    cells: object
    pbc: object
    energy: object
    virial: object
    seed: object
    natoms: object
    dt: object
    kT: object
    nf: object
    tau_t: object
    tau_p: object
    p0: object
    beta: object
    thermo: object
    baro: object
    nhc_eta: object
    nhc_v: object
    walker: object
    t_knot: object
    t_val: object
    p_knot: object
    p_val: object
    ramp: object
    # relax walkers (dpsnake.md.relax; absent in checkpoints from before them: filled by from_host):
    # relax (S,) code (0 MD, 1 FIRE on positions, 2 with the cell); fire_tol (S,) eV/A; fire_maxstep
    # (S,) A; fire_dt, fire_a (S,) FIRE's step and mixing; fire_n (S,) steps downhill (-1 before the
    # first step); fire_k (S,) FIRE steps taken; fire_conv (S,) bool; fire_cv (S, 3, 3) cell velocity;
    # fire_F (S, 3, 3) deformation gradient (cell = cell_0 F^T). A relax walker's ``vel`` is its FIRE
    # velocity (A per FIRE time unit).
    relax: object = None
    fire_tol: object = None
    fire_maxstep: object = None
    fire_dt: object = None
    fire_a: object = None
    fire_n: object = None
    fire_k: object = None
    fire_conv: object = None
    fire_cv: object = None
    fire_F: object = None
    xp: object = np
    b_int: object = None
    b_par: object = None
    mtd: object = None
    b_out: object = None

    @property
    def nsys(self) -> int:
        return int(self.cells.shape[0])

    def flags(self) -> dict:
        """Which integrator parts this batch needs (host booleans, fixed until the batch changes)."""
        from dpsnake.engine.xp import to_numpy

        t, b = to_numpy(self.thermo), to_numpy(self.baro)
        return {
            "nhc": bool((t == T_NHC).any()),
            "bussi": bool((t == T_BUSSI).any()),
            "langevin": bool((t == T_LANGEVIN).any()),
            "npt": bool((b != B_NONE).any()),
            "baro_modes": sorted(int(m) for m in set(b.tolist()) - {B_NONE}),
            "ramp_t": bool((to_numpy(self.ramp) & R_T).any()),
            "ramp_p": bool((to_numpy(self.ramp) & R_P).any()),
            "relax": bool((to_numpy(self.relax) != 0).any()),
        }

    def select(self, keep_sys: np.ndarray) -> BatchState:
        """A new state with only the walkers ``keep_sys`` (host bool (S,)); systems renumbered."""
        xp = self.xp
        keep_sys_d = xp.asarray(keep_sys)
        keep_atom = keep_sys_d[self.system]
        renum = xp.cumsum(keep_sys_d.astype(xp.int64)) - 1
        out = {}
        for f in _ATOM:
            out[f] = getattr(self, f)[keep_atom]
        out["system"] = renum[out["system"]]
        for f in _SYS + _BIAS:
            if getattr(self, f) is not None:
                out[f] = getattr(self, f)[keep_sys_d]
        return BatchState(xp=xp, **out)

    def to_host(self) -> dict:
        """All arrays as NumPy (for checkpoints)."""
        from dpsnake.engine.xp import to_numpy

        return {
            f.name: to_numpy(getattr(self, f.name))
            for f in fields(self)
            if f.name != "xp" and getattr(self, f.name) is not None
        }

    @classmethod
    def from_host(cls, arrays: dict, xp=np) -> BatchState:
        from dpsnake.engine.xp import asarray

        arrays = {**_no_relax(len(arrays["cells"])), **arrays}  # checkpoints from before relax walkers
        return cls(xp=xp, **{k: asarray(xp, v) for k, v in arrays.items()})


def _no_relax(S: int) -> dict:
    """The relax arrays of S walkers that are all MD walkers."""
    out = {k: np.zeros(S) for k in ("fire_tol", "fire_maxstep", "fire_dt", "fire_a")}
    out.update({k: np.zeros(S, dtype=np.int64) for k in ("relax", "fire_k")})
    out["fire_n"] = np.full(S, -1, dtype=np.int64)
    out["fire_conv"] = np.zeros(S, dtype=bool)
    out["fire_cv"] = np.zeros((S, 3, 3))
    out["fire_F"] = np.broadcast_to(np.eye(3), (S, 3, 3)).copy()
    return out


def start_state(walkers: list[Walker], structures, xp=np) -> BatchState:
    """The batch of all ``walkers`` at step 0, as the explorer starts it: ``structures`` from
    walkers.read_structures, Maxwell-Boltzmann velocities at each walker's temperature and seed."""
    vel = [
        maxwell_boltzmann(m, w.temperature, w.seed, degrees_of_freedom(len(m), w))
        for w, (_atoms, _atype, m) in zip(walkers, structures)
    ]
    return build_state(walkers, list(range(len(walkers))), structures, vel, xp)


def build_state(walkers: list[Walker], indices, structures, velocities, xp=np) -> BatchState:
    """Initial batch of the walkers ``indices`` (into ``walkers``).

    structures[i] = (atoms, atype, masses) of walker i; velocities[i] (n, 3) ASE units. Forces,
    energy and virial are zero until the first evaluation.
    """
    from ase import units

    pos, vel, mass, atype, system, local = [], [], [], [], [], []
    cells, pbc, rows = [], [], []
    for s, i in enumerate(indices):
        w = walkers[i]
        atoms, at, m = structures[i]
        n = len(atoms)
        pos.append(atoms.get_positions())
        vel.append(velocities[i])
        mass.append(m)
        atype.append(at)
        system.append(np.full(n, s, dtype=np.int64))
        local.append(np.arange(n, dtype=np.int64))
        # slabs and wires keep their cells (written to the frames); no PBC: zeros
        cells.append(atoms.cell.array if atoms.pbc.any() else np.zeros((3, 3)))
        pbc.append(np.array(atoms.pbc, dtype=bool))
        ps = 1000.0 * units.fs
        rows.append(
            dict(
                seed=np.uint64(w.seed % (1 << 64)),
                natoms=n,
                dt=w.dt * ps,
                kT=units.kB * w.temperature,
                nf=degrees_of_freedom(n, w),
                tau_t=w.tau_t * ps,
                tau_p=w.tau_p * ps,
                p0=w.pressure * units.bar,
                beta=w.compressibility / units.bar,
                thermo=_TCODE[w.thermostat],
                baro=_BCODE[w.barostat],
                walker=i,
            )
        )
    S = len(indices)
    h = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    h.update(_schedules([walkers[i] for i in indices]))
    h.update(_relax([walkers[i] for i in indices]))
    if any(walkers[i].bias for i in indices):
        from dpsnake.md.bias import state_arrays

        h.update(state_arrays([walkers[i] for i in indices], [structures[i] for i in indices]))
    h["seed"] = h["seed"].astype(np.uint64)
    for k in ("natoms", "nf", "thermo", "baro", "walker", "ramp"):
        h[k] = h[k].astype(np.int64)
    pos = np.concatenate(pos)
    N = len(pos)
    arrays = dict(
        pos=pos,
        vel=np.concatenate(vel).astype(np.float64),
        mass=np.concatenate(mass).astype(np.float64),
        atype=np.concatenate(atype),
        system=np.concatenate(system),
        local=np.concatenate(local),
        force=np.zeros((N, 3)),
        cells=np.array(cells, dtype=np.float64),
        pbc=np.array(pbc, dtype=bool).reshape(S, 3),
        energy=np.zeros(S),
        virial=np.zeros((S, 3, 3)),
        nhc_eta=np.zeros((S, NHC_LENGTH)),
        nhc_v=np.zeros((S, NHC_LENGTH)),
        **h,
    )
    return BatchState.from_host(arrays, xp=xp)


def _schedules(walkers: list[Walker]) -> dict:
    """The walkers' target schedules as padded arrays (the constant targets as two equal knots)."""
    from ase import units

    from dpsnake.md.ramps import knot_arrays

    t_knot, t_val, t_step = knot_arrays(
        [w.temperature_ramp for w in walkers], [w.temperature for w in walkers], units.kB
    )
    p_knot, p_val, p_step = knot_arrays([w.pressure_ramp for w in walkers], [w.pressure for w in walkers], units.bar)
    bits = [
        (R_T if w.temperature_ramp else 0)
        | (R_T_STEPPED if ts else 0)
        | (R_P if w.pressure_ramp else 0)
        | (R_P_STEPPED if ps else 0)
        for w, ts, ps in zip(walkers, t_step, p_step)
    ]
    return {"t_knot": t_knot, "t_val": t_val, "p_knot": p_knot, "p_val": p_val, "ramp": np.array(bits, dtype=np.int64)}


def _relax(walkers: list[Walker]) -> dict:
    """The FIRE arrays of the walkers (dpsnake.md.relax; ASE's FIRE start: dt 0.1, a 0.1)."""
    from dpsnake.md import relax

    out = _no_relax(len(walkers))
    for s, w in enumerate(walkers):
        if w.ensemble == "relax":
            out["relax"][s] = relax.RELAX_CELL if w.relax_cell else relax.RELAX_POS
            out["fire_tol"][s], out["fire_maxstep"][s] = w.fmax, w.maxstep
            out["fire_dt"][s], out["fire_a"][s] = relax.DT0, relax.ASTART
    return out
