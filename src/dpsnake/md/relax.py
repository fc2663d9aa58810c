"""FIRE relaxation of the ``relax`` walkers on the flat batched state, beside the MD walkers.

FIRE (Bitzek, Koskinen, Gaehler, Moseler, Gumbsch 2006) exactly as ASE's ``ase.optimize.FIRE``
with its defaults (dt 0.1, dtmax 1.0, Nmin 5, finc 1.1, fdec 0.5, astart 0.1, fa 0.99, maxstep
0.2 A; no masses: v += dt F), per walker: each relax walker keeps its own FIRE velocity (``st.vel``
of its atoms, and ``fire_cv`` of its cell), time step, mixing and counter, and its own sums (v.F,
|F|, |v|, |dr| over its degrees of freedom).

With ``relax_cell`` the cell relaxes too, as ASE's ``UnitCellFilter`` (+ FIRE): the degrees of
freedom are the atoms' positions without the deformation gradient F (cell = cell_0 F^T) and
n_atoms x F; their forces are f F and (W_sym - V p I) F^-T / n_atoms, W_sym the symmetric virial
(eV) and p the walker's pressure (eV/A^3): zero at the enthalpy minimum at pressure p.

A walker has converged when every row of its forces (the cell's rows included) is below ``fmax``;
ASE's run stops there: here the walker stays frozen (no more FIRE steps: the same positions, forces
and deviation) and the explorer finishes it at its next deviation step, with the frame of the
relaxed structure. ``fire_k`` counts its FIRE steps (ASE's ``nsteps``).

All in ``st.xp`` (NumPy or CuPy), no host synchronisation; ``step`` runs the MD walkers' integrator
unchanged (their numbers do not depend on the relax walkers) and then overrides the relax walkers.
"""

from __future__ import annotations

from dpsnake.md import integrators
from dpsnake.md.integrators import _apply, _inv3, _mm3, segsum

# ASE's FIRE defaults
DT0, DTMAX, NMIN, FINC, FDEC, ASTART, FA = 0.1, 1.0, 5, 1.1, 0.5, 0.1, 0.99
RELAX_NONE, RELAX_POS, RELAX_CELL = 0, 1, 2


def generalized_forces(st):
    """(g_atoms (N, 3) eV/A, g_cell (S, 3, 3) eV/A (zero without cell relaxation), converged (S,) bool)."""
    xp = st.xp
    cellw = st.relax == RELAX_CELL
    cellw_a = cellw[st.system]
    finv_t = _inv3(xp, st.fire_F).transpose(0, 2, 1)
    g = xp.where(cellw_a[:, None], _apply(xp, st.force, st.fire_F[st.system]), st.force)
    vol = xp.abs(integrators._det3(xp, st.cells))
    vir = 0.5 * (st.virial + st.virial.transpose(0, 2, 1)) - (vol * st.p0)[:, None, None] * xp.eye(3)[None]
    gc = _mm3(vir, finv_t) / st.natoms[:, None, None]
    gc = xp.where(cellw[:, None, None], gc, 0.0)
    tol2 = (st.fire_tol * st.fire_tol)[:, None]
    over = segsum(st, ((g * g).sum(axis=1) >= tol2[st.system, 0]).astype(xp.float64))
    over = over + ((gc * gc).sum(axis=2) >= tol2).sum(axis=1)
    return g, gc, over == 0


def fire_move(st) -> tuple:
    """One FIRE step of the relax walkers from the forces in ``st``: returns (pos (N, 3), vel (N, 3),
    cells (S, 3, 3)) for them (the rows of other walkers are unchanged) and updates the FIRE
    arrays in place of their fields (converged walkers: nothing moves)."""
    xp = st.xp
    on = (st.relax != RELAX_NONE) & ~st.fire_conv
    g, gc, _ = generalized_forces(st)
    v, vc = st.vel, st.fire_cv
    vf = segsum(st, (g * v).sum(axis=1)) + (gc * vc).sum(axis=(1, 2))
    g2 = segsum(st, (g * g).sum(axis=1)) + (gc * gc).sum(axis=(1, 2))
    v2 = segsum(st, (v * v).sum(axis=1)) + (vc * vc).sum(axis=(1, 2))
    first = st.fire_n < 0
    up = (vf > 0) & ~first
    grow = up & (st.fire_n > NMIN)
    a = st.fire_a
    mix = xp.where(up, a * xp.sqrt(v2) / xp.sqrt(xp.where(g2 > 0, g2, 1.0)), 0.0)
    keep = xp.where(up, 1.0 - a, xp.where(first, 1.0, 0.0))  # reset (uphill): v = 0
    dt = xp.where(grow, xp.minimum(st.fire_dt * FINC, DTMAX), st.fire_dt)
    dt = xp.where(~up & ~first, dt * FDEC, dt)
    new_a = xp.where(grow, a * FA, xp.where(up, a, ASTART))
    new_n = xp.where(up, st.fire_n + 1, 0)
    vs = st.system
    v = keep[vs][:, None] * v + mix[vs][:, None] * g + dt[vs][:, None] * g
    vc = keep[:, None, None] * vc + mix[:, None, None] * gc + dt[:, None, None] * gc
    dr, drc = dt[vs][:, None] * v, dt[:, None, None] * vc
    norm = xp.sqrt(segsum(st, (dr * dr).sum(axis=1)) + (drc * drc).sum(axis=(1, 2)))
    scale = xp.where(norm > st.fire_maxstep, st.fire_maxstep / xp.where(norm > 0, norm, 1.0), 1.0)
    dr, drc = dr * scale[vs][:, None], drc * scale[:, None, None]
    # the cell walkers: positions without the deformation F, moved, then F_new applied (UnitCellFilter)
    cellw = st.relax == RELAX_CELL
    F = st.fire_F
    F_new = xp.where(cellw[:, None, None], F + drc / st.natoms[:, None, None], F)
    finv_t = _inv3(xp, F).transpose(0, 2, 1)
    x = xp.where(cellw[vs][:, None], _apply(xp, st.pos, finv_t[vs]), st.pos) + dr
    pos = xp.where(cellw[vs][:, None], _apply(xp, x, F_new.transpose(0, 2, 1)[vs]), x)
    cells = xp.where(cellw[:, None, None], _mm3(_mm3(st.cells, finv_t), F_new.transpose(0, 2, 1)), st.cells)
    on_a = on[vs][:, None]
    st.fire_dt = xp.where(on, dt, st.fire_dt)
    st.fire_a = xp.where(on, new_a, st.fire_a)
    st.fire_n = xp.where(on, new_n, st.fire_n)
    st.fire_k = xp.where(on, st.fire_k + 1, st.fire_k)
    st.fire_cv = xp.where(on[:, None, None], vc, st.fire_cv)
    st.fire_F = xp.where(on[:, None, None], F_new, st.fire_F)
    return (
        xp.where(on_a, pos, st.pos),
        xp.where(on_a, v, st.vel),
        xp.where(on[:, None, None], cells, st.cells),
    )


def update_converged(st) -> None:
    """``st.fire_conv`` from the forces now in ``st`` (relax walkers only)."""
    st.fire_conv = (st.relax != RELAX_NONE) & generalized_forces(st)[2]


def step(st, compute, step, flags: dict, all_models: bool = False) -> dict:
    """``integrators.md_step`` for a batch with relax walkers: the MD walkers take their MD step, the
    relax walkers a FIRE step (one force call for all); returns the ensemble output."""
    xp = st.xp
    pos, vel, cells = fire_move(st)  # from the forces of the current positions
    integrators.pre_force(st, step, flags)
    r = st.relax != RELAX_NONE
    ra = r[st.system][:, None]
    st.pos = xp.where(ra, pos, st.pos)
    st.cells = xp.where(r[:, None, None], cells, st.cells)
    out = compute(st, all_models)
    integrators.set_forces(st, out)
    integrators.post_force(st, step, flags)
    st.vel = xp.where(ra, vel, st.vel)  # the MD kicks leave the FIRE velocities alone
    update_converged(st)
    return out
