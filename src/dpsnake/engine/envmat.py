"""DeePMD-kit's environment matrix in array code (FP64): the smooth switch (descriptor.py, tabulate.py,
attn/env.py), the rows Rn and their chain rule back to the displacements (se_e2_a's descriptor.py and se_atten's
attn/env.py, where the "env" kernels do not run). R = sw(r) [q, d q^2], q = 1 / (r + protection);
Rn = (R - davg) rstd."""

from __future__ import annotations

from dpsnake.engine.xp import dot3


def switch(xp, r, rs, rc):
    """Quintic switch sw(r) and dsw/dr (DeePMD-kit's compute_smooth_weight): 1 below rs, 0 above rc."""
    rcl = xp.clip(r, rs, rc)
    u = (rcl - rs) / (rc - rs)
    u2 = u * u
    sw = u2 * u * (-6.0 * u2 + 15.0 * u - 10.0) + 1.0
    dsw = -30.0 * u2 * (u - 1.0) ** 2 / (rc - rs)
    dsw = xp.where((r > rs) & (r < rc), dsw, 0.0)
    return sw, dsw


def geometry(xp, d, valid, rs, rc, protection):
    """(vf, rr, q, sw, dsw) of displacements d (n, s, 3) FP64 with ``valid`` (n, s) bool: the valid slots as 0 / 1,
    r (1 in empty slots), q = 1 / (r + protection), sw(r) (0 in empty slots) and dsw/dr."""
    vf = valid.astype(xp.float64)
    rr = xp.where(valid, xp.sqrt(dot3(d, d)), 1.0)
    q = 1.0 / (rr + protection)
    sw, dsw = switch(xp, rr, rs, rc)
    return vf, rr, q, sw * vf, dsw


def env_rows(xp, d, geo, davg, rstd, keep=None):
    """Rn (n, s, 4) FP64 = (R - davg) rstd, its rows times ``keep`` (n, s) where given (excluded neighbours: 0);
    geo: :func:`geometry`'s."""
    _, _, q, sw, _ = geo
    R = xp.concatenate([(sw * q)[..., None], (sw * q * q)[..., None] * d], axis=2)
    Rn = (R - davg) * rstd
    return Rn if keep is None else Rn * keep[..., None]


def env_chain(xp, gRn, d, valid, geo, rstd, keep=None, gsw=None, mask=None):
    """g = dE/dd (n, s, 3) FP64 from gRn = dE/dRn (n, s, 4) FP64 through :func:`env_rows` (and, with gsw =
    dE/dswm, through swm = sw mask); exactly 0 in empty slots (a NaN centre must not leak through them)."""
    vf, rr, q, sw, dsw = geo
    gR = gRn * rstd
    if keep is not None:
        gR = gR * keep[..., None]
    gR = gR * vf[..., None]
    g0, gv = gR[..., 0], gR[..., 1:]
    gvd = dot3(gv, d)
    coef = g0 * (dsw * q - sw * q * q) + gvd * (dsw * q * q - 2.0 * sw * q**3)
    if gsw is not None:
        coef = coef + gsw * mask * dsw
    g = (coef / rr)[..., None] * d + (sw * q * q)[..., None] * gv
    return xp.where(valid[..., None], g, 0.0)
