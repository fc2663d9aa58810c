"""se_atten's environment matrix for a chunk of centres of one type, and its chain rule back to the
displacements (attn/descriptor.py's geometry, FP64).

Forward: sw(r) the quintic switch, q = 1 / (r + p); R = sw [q, d q^2] (0 in empty slots); Rn = (R - davg) rstd,
its rows zeroed where a real neighbour's type is excluded (``mask`` false on a valid slot); swm = sw mask;
u = Rn[1:4] / max(|Rn[1:4]|, eps), the attention's directions. Rn, swm and u go to the nets in their dtype.
Backward: from dE/dRn (the net dtype), dE/ds on channel 0 (the geometric net's), dE/du (the attention's) and
dE/dswm (FP64) to g = dE/dd (n, ns, 3) FP64, exactly 0 in empty slots.

On CuPy with the family "env" (EngineSettings.fast) each direction is one elementwise kernel
(cuda/elementwise.cu's attn_env_fwd / attn_env_bwd, which recompute r, sw, q and u rather than keep them);
elsewhere the array code below, which they are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpsnake.engine import envmat
from dpsnake.engine.cuda import elementwise as ew

EPS = 1e-12  # DeePMD-kit's floor of |Rn[1:4]| when normalising the attention's directions


@dataclass
class Env:
    """A chunk's env matrix in the net dtype, and what :func:`backward` needs."""

    Rn: object  # (n, ns, 4), C-contiguous
    swm: object  # (n, ns), C-contiguous
    u: object  # (n, ns, 3), or None (asked without directions, array code)
    kernels: bool  # made by the "env" kernels (the backward runs them too)
    geo: tuple | None = None  # the array code's FP64 arrays for its backward


def forward(rt, ti: int, d, valid, mask, directions: bool) -> Env:
    """The env matrix of centres of type ``ti`` (rt: an AttnRuntime): d (n, ns, 3) float64, valid (n, ns)
    bool, mask (n, ns) bool (valid minus excluded neighbours, or ``valid`` itself); ``directions``: u is
    wanted (the array code skips it otherwise)."""
    xp, m, dt = rt.xp, rt.model, rt.dtype
    ns = valid.shape[1]
    davg, rstd = rt.davg[ti, :ns], rt.rstd[ti, :ns]
    if rt.ctx.fast(xp, "env"):
        Rn, swm, u = ew.attn_env_forward(xp, d, valid, mask, davg, rstd, m.rcut_smth, m.rcut, m.env_protection, EPS, dt)
        return Env(Rn, swm, u, True)
    geo = envmat.geometry(xp, d, valid, m.rcut_smth, m.rcut, m.env_protection)
    keep = None
    if mask is not valid:  # excluded real neighbours: zero rows
        keep = (~(valid & ~mask)).astype(xp.float64)
    Rn = envmat.env_rows(xp, d, geo, davg, rstd, keep)
    u = nrm = den = None
    if directions:
        x = Rn[..., 1:4]
        nrm = xp.sqrt((x * x).sum(axis=2, keepdims=True))
        den = xp.maximum(nrm, EPS)
        u = x / den
    swm = xp.ascontiguousarray((geo[3] * mask).astype(dt))
    return Env(xp.ascontiguousarray(Rn.astype(dt)), swm, None if u is None else u.astype(dt), False,
               (geo, keep, u, nrm, den))  # fmt: skip


def backward(rt, ti: int, env: Env, d, valid, mask, gRn, gs0=None, gu=None, gsw=None):
    """g = dE/dd (n, ns, 3) float64 from gRn = dE/dRn (n, ns, 4) (net dtype), gs0 = dE/dRn[..., 0] (n, ns)
    added to it (the net's), gu = dE/du (n, ns, 3) and gsw = dE/dswm (n, ns) float64; None where absent."""
    xp, m = rt.xp, rt.model
    ns = valid.shape[1]
    rstd = rt.rstd[ti, :ns]
    if env.kernels:
        rs, rc, p = m.rcut_smth, m.rcut, m.env_protection
        return ew.attn_env_backward(xp, gRn, gs0, gu, gsw, d, valid, mask, rt.davg[ti, :ns], rstd, rs, rc, p, EPS)
    geo, keep, u, nrm, den = env.geo
    gRn = gRn.astype(xp.float64)
    if gu is not None:  # u = x / max(|x|, eps): (gu - u (u . gu)) / |x| above eps, gu / eps below
        gu = gu.astype(xp.float64)
        gRn[..., 1:4] += xp.where(nrm > EPS, (gu - u * (u * gu).sum(axis=2, keepdims=True)) / den, gu / EPS)
    if gs0 is not None:
        gRn[..., 0] += gs0.astype(xp.float64)
    # swm = sw * mask enters the attention / the smooth type gate (gsw)
    return envmat.env_chain(xp, gRn, d, valid, geo, rstd, keep, gsw, mask)
