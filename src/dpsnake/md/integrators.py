"""Integrators on the flat batched state; every walker keeps its own ensemble, dt and parameters.

One step (``md_step``), for all walkers at once, one force evaluation:

    targets (schedules) -> NHC half step (t, dt/2) -> kick dt/2 -> drift dt (Langevin: drift dt/2, O,
    drift dt/2) -> stochastic cell rescaling (NPT) -> forces -> kick dt/2 -> Bussi (dt) -> NHC half step

- NVE: velocity Verlet (identical to ASE's ``VelocityVerlet``).
- Langevin: BAOAB (Leimkuhler & Matthews 2013), friction 1/tau_t.
- Bussi: canonical sampling through velocity rescaling (Bussi, Donadio, Parrinello 2007), the
  chi-squared sum drawn as an explicit sum of nf-1 squared normals.
- Nose-Hoover chains of length 3 (Martyna, Tuckerman, Tobias, Klein 1996), Q1 = nf kT tau^2, Qj = kT tau^2.
- NPT: stochastic cell rescaling (Bernetti & Bussi 2020; anisotropic / fully flexible version after
  Del Tatto, Raiteri, Bernetti, Bussi 2022): a first-order stochastic equation for the strain,
  driven by (P0 - P_int), positions scaled with the cell and velocities inversely. The pressure uses
  the state at the start of the step. Isotropic: eps = ln V; anisotropic: ln of each diagonal
  stretch; fully flexible: plus symmetric shear (no cell rotation). The drift has no kT/V term:
  with the V-dependent noise amplitude (Ito), this drift makes the NPT distribution with the dV
  measure stationary, and then <P_int> = P0 exactly (tests/test_md_stat.py checks it).

Everything stays in ``st.xp``; no host synchronisation happens inside a step.
"""

from __future__ import annotations

import numbers

from dpsnake.engine.xp import segment_sum
from dpsnake.md import rng
from dpsnake.md.state import (
    B_ANISO,
    B_ISO,
    B_TRI,
    R_P_STEPPED,
    R_T_STEPPED,
    T_BUSSI,
    T_LANGEVIN,
    T_NHC,
    BatchState,
)


def segsum(st: BatchState, values):
    """Per-walker sum of an atom array (N, ...) -> (S, ...) float64.

    One sum over (walker, component) bins, so a (N, 9) sum is one kernel on the GPU (atomic adds);
    on NumPy (bincount) each bin adds its atoms in order, so a walker's sums do not depend on the
    other walkers.
    """
    return segment_sum(st.xp, st.system, values, st.nsys)


def _det3(xp, m):
    """(S,) determinants of (S, 3, 3) matrices: r0 . (r1 x r2) (cuSOLVER's det syncs and is slow)."""
    return (m[:, 0] * xp.cross(m[:, 1], m[:, 2])).sum(axis=1)


def _inv3(xp, m):
    """(S, 3, 3) inverses: the columns of m^-1 are r1 x r2, r2 x r0, r0 x r1 over det."""
    r0, r1, r2 = m[:, 0], m[:, 1], m[:, 2]
    adj = xp.stack([xp.cross(r1, r2), xp.cross(r2, r0), xp.cross(r0, r1)], axis=2)
    return adj / _det3(xp, m)[:, None, None]


def _mm3(a, b):
    """(S, 3, 3) products a_s b_s as one broadcast multiply-sum (CuPy's matmul goes through cuBLAS,
    which cannot be captured in a CUDA graph)."""
    return (a[:, :, :, None] * b[:, None, :, :]).sum(axis=2)


def _apply(xp, v, m):
    """(N, 3) rows v_n times (N, 3, 3) matrices m_n: v_n m_n (an einsum is slower on GPUs)."""
    return v[:, 0:1] * m[:, 0] + v[:, 1:2] * m[:, 1] + v[:, 2:3] * m[:, 2]


def kinetic_energy(st: BatchState):
    """(S,) kinetic energy, eV."""
    return 0.5 * segsum(st, st.mass * (st.vel * st.vel).sum(axis=1))


def kinetic_tensor(st: BatchState):
    """(S, 3, 3) sum of m v_a v_b, eV."""
    mv = st.mass[:, None, None] * st.vel[:, :, None] * st.vel[:, None, :]
    return segsum(st, mv.reshape(-1, 9)).reshape(-1, 3, 3)


def volume(st: BatchState):
    """(S,) cell volume, A^3 (1 for walkers not periodic in every direction, which never use it:
    NPT is refused for them)."""
    xp = st.xp
    full = st.pbc.all(axis=-1) if st.pbc.ndim == 2 else st.pbc  # pbc (S, 3), or (S,) in old checkpoints
    return xp.where(full, xp.abs(_det3(xp, st.cells)), 1.0)


def temperature(st: BatchState):
    """(S,) instantaneous temperature, K."""
    from ase import units

    return 2.0 * kinetic_energy(st) / (st.nf * units.kB)


def pressure_tensor(st: BatchState):
    """(S, 3, 3) instantaneous pressure tensor (kinetic + virial), eV/A^3."""
    w = 0.5 * (st.virial + st.virial.transpose(0, 2, 1))
    return (kinetic_tensor(st) + w) / volume(st)[:, None, None]


def set_forces(st: BatchState, out: dict) -> None:
    """Take the driving model's (model 0) energy, forces and virial from an ensemble output."""
    st.energy = out["energy"][0]
    st.force = out["force"][0]
    st.virial = out["virial"][0].reshape(-1, 3, 3)


def _kick(st: BatchState, dt_atom):
    st.vel = st.vel + (0.5 * dt_atom)[:, None] * st.force / st.mass[:, None]


def nhc_half(st: BatchState) -> None:
    """Half a step (dt/2) of the Nose-Hoover chain on the walkers that use it."""
    xp = st.xp
    on = st.thermo == T_NHC
    kT = xp.where(on, st.kT, 1.0)
    tau2 = st.tau_t**2
    q = xp.stack([st.nf * kT * tau2] + [kT * tau2] * (st.nhc_v.shape[1] - 1), axis=1)
    v, eta = st.nhc_v.copy(), st.nhc_eta.copy()
    M = v.shape[1]
    d = 0.5 * st.dt  # length of this half step
    k2 = 2.0 * kinetic_energy(st)
    g = [None] * M
    g[0] = (k2 - st.nf * kT) / q[:, 0]
    for j in range(1, M):
        g[j] = (q[:, j - 1] * v[:, j - 1] ** 2 - kT) / q[:, j]
    v[:, M - 1] += g[M - 1] * d / 2
    for j in range(M - 2, -1, -1):
        a = xp.exp(-v[:, j + 1] * d / 4)
        v[:, j] = (v[:, j] * a + g[j] * d / 2) * a
    scale = xp.exp(-v[:, 0] * d)
    k2 = k2 * scale * scale
    eta += v * d[:, None]
    g[0] = (k2 - st.nf * kT) / q[:, 0]
    for j in range(M - 1):
        a = xp.exp(-v[:, j + 1] * d / 4)
        v[:, j] = (v[:, j] * a + g[j] * d / 2) * a
        g[j + 1] = (q[:, j] * v[:, j] ** 2 - kT) / q[:, j + 1]
    v[:, M - 1] += g[M - 1] * d / 2
    st.nhc_v = xp.where(on[:, None], v, st.nhc_v)
    st.nhc_eta = xp.where(on[:, None], eta, st.nhc_eta)
    st.vel = st.vel * xp.where(on, scale, 1.0)[st.system][:, None]


def nhc_energy(st: BatchState):
    """(S,) energy of the Nose-Hoover chain; E_pot + E_kin + this is conserved."""
    xp = st.xp
    tau2 = st.tau_t**2
    q0 = st.nf * st.kT * tau2
    qj = st.kT * tau2
    e = 0.5 * q0 * st.nhc_v[:, 0] ** 2 + st.nf * st.kT * st.nhc_eta[:, 0]
    e = e + (0.5 * qj[:, None] * st.nhc_v[:, 1:] ** 2 + st.kT[:, None] * st.nhc_eta[:, 1:]).sum(axis=1)
    return xp.where(st.thermo == T_NHC, e, 0.0)


def bussi(st: BatchState, step) -> None:
    """One step (dt) of the Bussi-Donadio-Parrinello stochastic velocity rescaling."""
    xp = st.xp
    on = st.thermo == T_BUSSI
    g = rng.atom_normals(xp, st.seed, st.system, st.local, step, rng.BUSSI)
    k = st.local[:, None] * 3 + xp.arange(3)[None, :]
    nf_atom = st.nf[st.system][:, None]
    r1 = segsum(st, xp.where(k == 0, g, 0.0).sum(axis=1))
    s2 = segsum(st, xp.where((k >= 1) & (k <= nf_atom - 1), g * g, 0.0).sum(axis=1))
    kin = kinetic_energy(st)
    kt = 0.5 * st.nf * st.kT
    c = xp.exp(-st.dt / st.tau_t)
    new = (
        kin
        + (1 - c) * (kt * (s2 + r1 * r1) / st.nf - kin)
        + 2 * r1 * xp.sqrt(xp.maximum(kin * kt / st.nf * (1 - c) * c, 0.0))
    )
    alpha = xp.sqrt(xp.maximum(new, 0.0) / xp.where(kin > 0, kin, 1.0))
    alpha = xp.where(on & (kin > 0), alpha, 1.0)
    st.vel = st.vel * alpha[st.system][:, None]


def langevin_o(st: BatchState, step) -> None:
    """The O part of BAOAB (exact Ornstein-Uhlenbeck over dt) on the Langevin walkers."""
    xp = st.xp
    on = (st.thermo == T_LANGEVIN)[st.system]
    c1 = xp.exp(-(st.dt / st.tau_t))[st.system]
    c2 = xp.sqrt((1 - c1 * c1) * st.kT[st.system] / st.mass)
    g = rng.atom_normals(xp, st.seed, st.system, st.local, step, rng.LANGEVIN)
    st.vel = xp.where(on[:, None], c1[:, None] * st.vel + c2[:, None] * g, st.vel)


def cell_rescale(st: BatchState, ptens, step, modes=(B_ISO, B_ANISO, B_TRI)) -> None:
    """Stochastic cell rescaling over dt for the NPT walkers, given the pressure tensor (S, 3, 3).

    modes: the barostat codes present in the batch (the others are not computed).
    """
    xp = st.xp
    S = st.nsys
    vol = volume(st)
    mob = st.beta / st.tau_p * st.dt  # strain per (eV/A^3) over this step
    r = rng.system_normals(xp, st.seed, step, rng.BAROSTAT, 6)
    kT = st.kT
    eye = xp.eye(3)[None]
    mode = st.baro[:, None, None]
    mu = xp.broadcast_to(eye, (S, 3, 3))
    if B_ISO in modes:  # eps = ln V
        piso = (ptens[:, 0, 0] + ptens[:, 1, 1] + ptens[:, 2, 2]) / 3
        de_v = -mob * (st.p0 - piso) + xp.sqrt(2 * kT * mob / vol) * r[:, 0]
        mu = xp.where(mode == B_ISO, xp.exp(de_v / 3)[:, None, None] * eye, mu)
    if B_ANISO in modes or B_TRI in modes:  # ln of each diagonal stretch (+ symmetric shear)
        diag = xp.stack([ptens[:, a, a] for a in range(3)], axis=1)
        de = -(mob / 3)[:, None] * (st.p0[:, None] - diag) + xp.sqrt(2 * kT * mob / (3 * vol))[:, None] * r[:, :3]
        e = de[:, :, None] * eye
        if B_ANISO in modes:
            e2 = _mm3(e, e)
            mu = xp.where(mode == B_ANISO, eye + e + e2 / 2 + _mm3(e2, e) / 6, mu)
        if B_TRI in modes:
            psym = 0.5 * (ptens + ptens.transpose(0, 2, 1))
            off = (mob / 3)[:, None, None] * psym + xp.sqrt(kT * mob / (3 * vol))[:, None, None] * _sym_noise(xp, r)
            et = e + off * (1 - eye)
            et2 = _mm3(et, et)
            mu = xp.where(mode == B_TRI, eye + et + et2 / 2 + _mm3(et2, et) / 6, mu)
    mu_inv = _inv3(xp, mu)
    st.pos = _apply(xp, st.pos, mu[st.system])
    st.vel = _apply(xp, st.vel, mu_inv[st.system])
    st.cells = _mm3(st.cells, mu)


def _sym_noise(xp, r):
    """(S, 3, 3) symmetric matrix with r[:, 3], r[:, 4], r[:, 5] at (0,1), (0,2), (1,2); zero diagonal."""
    z = xp.zeros_like(r[:, 3])
    rows = [
        xp.stack([z, r[:, 3], r[:, 4]], axis=1),
        xp.stack([r[:, 3], z, r[:, 5]], axis=1),
        xp.stack([r[:, 4], r[:, 5], z], axis=1),
    ]
    return xp.stack(rows, axis=1)


def md_step(st: BatchState, compute, step, flags: dict, all_models: bool = False) -> dict:
    """Advance every walker of ``st`` by its dt; returns the ensemble output at the new positions.

    compute(st, all_models) -> {"energy" (M, S), "force" (M, N, 3), "virial" (M, S, 9)} in st.xp;
    model 0 drives. ``step`` is the index of this step (0 for the first), the RNG counter (an int,
    or a 0-d uint64 device array: see rng.walker_keys). ``flags`` = st.flags() (host booleans:
    which parts are present).
    """
    pre_force(st, step, flags)
    out = compute(st, all_models)
    set_forces(st, out)
    post_force(st, step, flags)
    return out


def set_targets(st: BatchState, step, flags: dict) -> None:
    """Thermostat / barostat targets (``st.kT``, ``st.p0``) of step ``step`` from the walkers'
    schedules (dpsnake.md.ramps), written in place (fixed addresses for the CUDA graphs): the step
    ending at step+1 takes the schedule's value at step+1, as LAMMPS' ramps. A walker without a
    schedule keeps its constant exactly; a batch without schedules skips this."""
    from dpsnake.md.ramps import ramp_values

    xp = st.xp
    if not (flags.get("ramp_t") or flags.get("ramp_p")):
        return
    # ``step``: an int, or a 0-d uint64 device array (graph replays read it from device memory)
    s = float(step + 1) if isinstance(step, numbers.Integral) else (step + xp.uint64(1)).astype(xp.float64)
    if flags.get("ramp_t"):
        st.kT[...] = ramp_values(xp, s, st.t_knot, st.t_val, (st.ramp & R_T_STEPPED) != 0)
    if flags.get("ramp_p"):
        st.p0[...] = ramp_values(xp, s, st.p_knot, st.p_val, (st.ramp & R_P_STEPPED) != 0)


def pre_force(st: BatchState, step, flags: dict) -> None:
    """The part of a step before the force call: targets of the step (schedules), thermostat half
    step, kick, drift, cell rescaling."""
    set_targets(st, step, flags)
    dt_atom = st.dt[st.system]
    if flags["nhc"]:
        nhc_half(st)
    ptens = pressure_tensor(st) if flags["npt"] else None
    _kick(st, dt_atom)
    if flags["langevin"]:
        st.pos = st.pos + (0.5 * dt_atom)[:, None] * st.vel
        langevin_o(st, step)
        st.pos = st.pos + (0.5 * dt_atom)[:, None] * st.vel
    else:
        st.pos = st.pos + dt_atom[:, None] * st.vel
    if flags["npt"]:
        cell_rescale(st, ptens, step, flags.get("baro_modes", (B_ISO, B_ANISO, B_TRI)))


def post_force(st: BatchState, step, flags: dict) -> None:
    """The part of a step after the force call (forces in ``st``): kick, Bussi, thermostat half step."""
    _kick(st, st.dt[st.system])
    if flags["bussi"]:
        bussi(st, step)
    if flags["nhc"]:
        nhc_half(st)
