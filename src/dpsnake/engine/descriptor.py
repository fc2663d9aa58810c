"""se_e2_a descriptor + ener fitting: atomic energies and dE/dd for a chunk of same-type centres.

Forward (per centre, nnei = sum(sel) slots, DeePMD-kit's definitions):
  sw(r) quintic switch; R = sw [1/(r+p), d/(r+p)^2] (0 in empty slots); Rn = (R - davg) / dstd;
  descriptor exclude_types zero Rn rows of real neighbours; G = embed(Rn[:, 0]) (nnei, M1);
  gr = Rn^T G / nnei (4, M1); D = gr^T gr[:, :axis] (M1*axis); E = fit(D) + bias.
Backward by hand (reverse mode) to g = dE/dd (n, nnei, 3), in FP64 for the geometry. The nets run in
the runtime dtype (float64, or float32 in mixed precision).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpsnake.engine.model import DPModel


@dataclass
class RuntimeModel:
    """A :class:`DPModel` with weights moved to namespace ``xp`` and cast to the net dtype."""

    model: DPModel
    xp: object
    dtype: object
    davg: object  # (ntypes, nnei, 4) float64
    rstd: object  # 1 / dstd, float64
    embeddings: list
    fittings: list
    bias: np.ndarray
    fused: list | None = None  # FusedNet per embedding net (CUDA) or None

    @classmethod
    def build(cls, model: DPModel, xp, dtype):
        from dpsnake.engine import kernels

        fused = None
        name = np.dtype(dtype).name
        if kernels.fused_enabled(xp, name):
            from dpsnake.engine.fused import get_fused

            fused = [None if n is None else get_fused(n, name) for n in model.embeddings]
        return cls(model=model, xp=xp, dtype=dtype,
                   davg=xp.asarray(model.davg, dtype=xp.float64),
                   rstd=xp.asarray(1.0 / model.dstd, dtype=xp.float64),
                   embeddings=[None if n is None else n.to(xp, dtype) for n in model.embeddings],
                   fittings=[None if n is None else n.to(xp, dtype) for n in model.fittings],
                   bias=np.asarray(model.bias, dtype=np.float64), fused=fused)


def _switch(xp, r, rs, rc):
    """Quintic switch sw(r) and dsw/dr (DeePMD-kit's compute_smooth_weight)."""
    rcl = xp.clip(r, rs, rc)
    u = (rcl - rs) / (rc - rs)
    u2 = u * u
    sw = u2 * u * (-6.0 * u2 + 15.0 * u - 10.0) + 1.0
    dsw = -30.0 * u2 * (u - 1.0) ** 2 / (rc - rs)
    dsw = xp.where((r > rs) & (r < rc), dsw, 0.0)
    return sw, dsw


def energy_and_grad(rm: RuntimeModel, ti: int, d, valid, need_grad: bool = True):
    """Atomic energies (n,) float64 and g = dE/dd (n, nnei, 3) float64 for centres of type ``ti``.

    d (n, nnei, 3) float64 displacements (zero in empty slots), valid (n, nnei) bool.
    """
    xp, m = rm.xp, rm.model
    n, nnei = valid.shape
    if m.atom_exclude[ti]:
        return xp.zeros(n), (xp.zeros((n, nnei, 3)) if need_grad else None)
    from dpsnake.engine import elementwise as ew

    keep = None
    if m.desc_exclude[ti].any():
        # descriptor exclusion: zero rows of real neighbours of an excluded (ti, t) pair
        tslot = xp.asarray(np.repeat(np.arange(m.ntypes), m.sel))
        exrow = xp.asarray(m.desc_exclude[ti])[tslot][None, :]
        exrow = exrow & (True if m.exclude_padding else valid)
        keep = (~exrow).astype(xp.float64)
    p = m.env_protection
    fast_env = keep is None and ew.enabled(xp, "env")
    Rn_c = env = None
    if fast_env:  # CuPy: r, switch, R, Rn in one kernel (sw, q recomputed in the backward one)
        Rn_c = ew.guarded("env", ew.env_forward, xp, d, valid, rm.davg[ti], rm.rstd[ti],
                          m.rcut_smth, m.rcut, p, rm.dtype)
        fast_env = Rn_c is not None
    if not fast_env:
        Rn_c, env = _env_mat(xp, rm, ti, d, valid, keep)
    return _nets(rm, ti, Rn_c, d, valid, keep, need_grad, env)


def _env_mat(xp, rm, ti, d, valid, keep):
    """Array-code env matrix: Rn (n, nnei, 4) in the net dtype and what the backward needs."""
    m = rm.model
    vf = valid.astype(xp.float64)
    r = xp.sqrt((d * d).sum(axis=2))
    rr = xp.where(valid, r, 1.0)
    p = m.env_protection
    q = 1.0 / (rr + p)
    sw, dsw = _switch(xp, rr, m.rcut_smth, m.rcut)
    sw = sw * vf
    R = xp.concatenate([(sw * q)[..., None], (sw * q * q)[..., None] * d], axis=2)
    Rn = (R - rm.davg[ti]) * rm.rstd[ti]
    if keep is not None:
        Rn = Rn * keep[..., None]
    return xp.ascontiguousarray(Rn.astype(rm.dtype)), (vf, rr, q, sw, dsw)


def _nets(rm, ti, Rn_c, d, valid, keep, need_grad, env):
    """Embedding, descriptor, fitting and (if need_grad) the backward pass from Rn_c."""
    from dpsnake.engine import elementwise as ew

    xp, m = rm.xp, rm.model
    n, nnei = valid.shape
    sec = m.sec
    M1 = m.neuron[-1]
    A = m.axis_neuron
    gr = xp.zeros((n, 4, M1), dtype=rm.dtype)
    Gs = []
    for tt in range(m.ntypes):
        a, b = sec[tt], sec[tt + 1]
        k = tt if m.type_one_side else ti + m.ntypes * tt
        if a == b:
            Gs.append(None)
        elif rm.fused is not None:  # CUDA: embedding + contraction in one kernel, nothing stored
            rm.fused[k].forward(Rn_c, a, b, gr)
        else:
            G, cache = rm.embeddings[k].forward(xp, Rn_c[:, a:b, 0:1], keep=need_grad)
            gr += xp.matmul(Rn_c[:, a:b, :].transpose(0, 2, 1), G)
            Gs.append((G, cache))
    gr *= 1.0 / nnei
    gr1 = gr[:, :, :A]
    D = xp.matmul(gr.transpose(0, 2, 1), gr1).reshape(n, M1 * A)
    fit = rm.fittings[ti]
    y, fcache = fit.forward(xp, D, keep=need_grad)
    e = y[:, 0].astype(xp.float64) + float(rm.bias[ti])
    if not need_grad:
        return e, None
    gD = fit.backward(xp, xp.ones((n, 1), dtype=rm.dtype), fcache).reshape(n, M1, A)
    ggr = xp.matmul(gr1, gD.transpose(0, 2, 1))  # (n, 4, M1)
    ggr[:, :, :A] += xp.matmul(gr, gD)
    ggr *= 1.0 / nnei
    gRn = xp.zeros((n, nnei, 4), dtype=rm.dtype)
    if rm.fused is not None:
        ggr = xp.ascontiguousarray(ggr)
    for tt in range(m.ntypes):
        a, b = sec[tt], sec[tt + 1]
        if a == b:
            continue
        k = tt if m.type_one_side else ti + m.ntypes * tt
        if rm.fused is not None:
            rm.fused[k].backward(Rn_c, ggr, a, b, gRn)
            continue
        G, cache = Gs[tt]
        net = rm.embeddings[k]
        gG = xp.matmul(Rn_c[:, a:b, :], ggr)  # (n, s, M1)
        gRn[:, a:b, :] = xp.matmul(G, ggr.transpose(0, 2, 1))
        gRn[:, a:b, 0:1] += net.backward(xp, gG, cache)
    if env is None:  # fused chain rule (CuPy); empty slots give exactly 0
        g = ew.guarded("env", ew.env_backward, xp, gRn, d, valid, rm.rstd[ti], m.rcut_smth,
                       m.rcut, m.env_protection)
        if g is not None:
            return e, g
        vf = valid.astype(xp.float64)
        rr = xp.where(valid, xp.sqrt((d * d).sum(axis=2)), 1.0)
        q = 1.0 / (rr + m.env_protection)
        sw, dsw = _switch(xp, rr, m.rcut_smth, m.rcut)
        sw = sw * vf
    else:
        vf, rr, q, sw, dsw = env
    gR = gRn.astype(xp.float64) * rm.rstd[ti]
    if keep is not None:
        gR = gR * keep[..., None]
    gR = gR * vf[..., None]
    # chain through R = sw [q, d q^2], q = 1/(r+p)
    g0, gv = gR[..., 0], gR[..., 1:]
    gvd = (gv * d).sum(axis=2)
    coef = (g0 * (dsw * q - sw * q * q) + gvd * (dsw * q * q - 2.0 * sw * q ** 3)) / rr
    g = coef[..., None] * d + (sw * q * q)[..., None] * gv
    # a NaN centre (atoms on top of each other) must not leak through its empty slots
    return e, xp.where(valid[..., None], g, 0.0)
