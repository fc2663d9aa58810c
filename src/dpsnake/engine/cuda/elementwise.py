"""Fused elementwise CUDA kernels (cupy.ElementwiseKernel) for the engine's memory-bound passes.

CuPy only; each one replaces a chain of array operations in nets.py / descriptor.py / ensemble.py
that stays the reference (and the NumPy path) and does the same math in one pass over memory:

- ``nets``: a dense layer's ``tanh(a w + b) * idt + residual`` and its derivative ``(1 - t^2) idt``
  in one kernel (the concat(x, x) residual by broadcasting, never materialised); the backward
  residual sum ``gx + gy[:nin] + gy[nin:]`` in one kernel.
- ``env``: the environment matrix (r, switch, q, R, Rn in the net dtype) from the displacements in
  one kernel, and the chain rule back to g = dE/dd (FP64) in another (sw, q recomputed).
- ``scatter``: forces of neighbour slots scattered with atomicAdd, skipping empty slots; each
  centre's sum of g and its virial -g^T d in one pass over its slots.
- ``desc``: the descriptor D = gr^T gr[:, :axis] and its backward to gr, per centre (were batched
  cuBLAS products of 4-deep matrices, ~0.4 ms each for 27,648 centres on an H100); block-per-centre
  kernels in desc.py when the shared memory fits, the elementwise ones below else.
- ``nbr``: the neighbour build (wrapping, ghost images, bins), in nbr.py, and the
  compaction of a chunk's slots (ensemble.py).
- ``graph``: the MD integrator stages replayed as CUDA graphs (md/graphs.py).

Selected by ``EngineSettings.fast`` (the names above; default all). A kernel that fails to compile
or launch switches its family off for the ensemble (``EngineContext.guarded``), with a warning, and
the array code runs. Sources: elementwise.cu (and nbr.cu for ``nbr``).
"""

from __future__ import annotations

import functools

from dpsnake.engine import cuda


@functools.cache  # a compile cache: keyed by the kernel's name, whose source is fixed
def _k(name: str):
    import cupy

    return cupy.ElementwiseKernel(*_SRC[name], name=f"dps_{name}")


# {name: (in params, out params, body)} of elementwise.cu and nbr.cu (the neighbour build's)
_SRC = {**cuda.elementwise_kernels("elementwise.cu"), **cuda.elementwise_kernels("nbr.cu")}


def dense_tanh(xp, layer, x, keep: bool):
    """One tanh layer fused: x (..., nin) -> y (..., nout), dy (derivative incl. idt, or None).

    Same math as nets.Net.forward (residual x when nout == nin, concat(x, x) when nout == 2 nin).
    """
    nin, nout = layer.nin, layer.nout
    lead = x.shape[:-1]
    R = 1
    for s in lead:
        R *= int(s)
    x2 = x.reshape(R, nin)
    dt = x.dtype
    if nin == 1:  # outer product: a * w with w (nout,)
        a, w = x2, layer.w[0]
    else:
        a, w = x2 @ layer.w, dt.type(1)
    b = dt.type(0) if layer.b is None else layer.b
    idt = dt.type(1) if layer.idt is None else layer.idt
    if layer.resnet and nout in (nin, 2 * nin):  # view as (R, k, nin): residual x broadcast over k
        k = nout // nin
        shape = (R, k, nin)
        a = a.reshape(R, 1, 1) if nin == 1 else a.reshape(shape)
        w = w if nin != 1 else w.reshape(k, 1)
        b = b if layer.b is None else b.reshape(k, nin)
        idt = idt if layer.idt is None else idt.reshape(k, nin)
        res = x2.reshape(R, 1, nin)
    else:
        shape, res = (R, nout), dt.type(0)
    y = xp.empty(shape, dtype=dt)
    if keep:
        dy = xp.empty(shape, dtype=dt)
        _k("tanh_dy")(a, w, b, idt, res, y, dy)
        return y.reshape(*lead, nout), dy.reshape(*lead, nout)
    _k("tanh")(a, w, b, idt, res, y)
    return y.reshape(*lead, nout), None


def add_concat_grad(xp, gx, gy, nin: int):
    """gx += gy[..., :nin] + gy[..., nin:] in one pass (in place, returns gx)."""
    g3 = gy.reshape(-1, 2, nin)
    _k("add2")(g3[:, 0, :], g3[:, 1, :], gx.reshape(-1, nin))
    return gx


def env_forward(xp, d, valid, davg, rstd, rs, rc, p, dtype):
    """Rn (n, nnei, 4) in ``dtype`` from d (n, nnei, 3) float64; davg/rstd (nnei, 4) float64."""
    n, nnei = valid.shape
    Rn = xp.empty((n, nnei, 4), dtype=dtype)
    _k("env_fwd")(
        xp.ascontiguousarray(valid),
        xp.ascontiguousarray(d),
        xp.ascontiguousarray(davg),
        xp.ascontiguousarray(rstd),
        nnei,
        float(rs),
        float(rc),
        float(p),
        Rn,
    )
    return Rn


def env_backward(xp, gRn, d, valid, rstd, rs, rc, p):
    """g = dE/dd (n, nnei, 3) float64 from gRn = dE/dRn (n, nnei, 4) (net dtype)."""
    n, nnei = valid.shape
    g = xp.empty((n, nnei, 3), dtype=xp.float64)
    _k("env_bwd")(
        xp.ascontiguousarray(valid),
        xp.ascontiguousarray(gRn),
        xp.ascontiguousarray(d),
        xp.ascontiguousarray(rstd),
        nnei,
        float(rs),
        float(rc),
        float(p),
        g,
    )
    return g


def attn_env_forward(xp, d, valid, mask, davg, rstd, rs, rc, p, eps, dtype):
    """se_atten's env matrix in one pass (attn/descriptor.py's array code): (Rn (n, ns, 4), swm (n, ns), un (n, ns,
    3)) in ``dtype`` from d (n, ns, 3) float64, valid and mask (n, ns) bool; davg / rstd (ns, 4) float64."""
    n, ns = valid.shape
    Rn = xp.empty((n, ns, 4), dtype=dtype)
    swm = xp.empty((n, ns), dtype=dtype)
    un = xp.empty((n, ns, 3), dtype=dtype)
    c = xp.ascontiguousarray
    _k("attn_env_fwd")(
        c(valid), c(mask), c(d), c(davg), c(rstd), ns, float(rs), float(rc), float(p), float(eps), Rn, swm, un
    )
    return Rn, swm, un


def attn_env_backward(xp, gRn, gs0, gu, gsw, d, valid, mask, davg, rstd, rs, rc, p, eps):
    """g = dE/dd (n, ns, 3) float64 through :func:`attn_env_forward` from dE/dRn = gRn (n, ns, 4) (+ gs0 (n, ns) on
    channel 0), dE/dun = gu (n, ns, 3) and dE/dswm = gsw (n, ns) float64; gs0, gu, gsw None where absent."""
    n, ns = valid.shape
    g = xp.empty((n, ns, 3), dtype=xp.float64)
    c = xp.ascontiguousarray
    flags = (gs0 is not None) | (gu is not None) << 1 | (gsw is not None) << 2
    gRn = c(gRn)
    gs0 = gRn if gs0 is None else c(gs0, dtype=gRn.dtype)
    gu = gRn if gu is None else c(gu, dtype=gRn.dtype)
    gsw = g if gsw is None else c(gsw, dtype=xp.float64)
    args = (c(d), c(davg), c(rstd), ns, float(rs), float(rc), float(p), float(eps), xp.int32(flags))
    _k("attn_env_bwd")(c(valid), c(mask), gRn, gs0, gu, gsw, *args, g)
    return g


def scatter_neg(xp, f, own, valid, g):
    """f[own[i, s]] -= g[i, s] for valid slots; f (N, 3) float64 contiguous, g (n, nnei, 3)."""
    _k("scatter_neg")(g, own[..., None], valid[..., None], f)
    return f


def compact(xp, ch, cols):
    """Columns ``cols`` (nc,) of a neighbour chunk in one pass: owner (n, nc) (-1 empty), own (n, nc)
    (the centre itself in empty slots), d (n, nc, 3), valid (n, nc); four gathers and a where
    otherwise."""
    n, nnei = ch.owner.shape
    nc = int(cols.shape[0])
    owner = xp.empty((n, nc), dtype=xp.int64)
    own = xp.empty((n, nc), dtype=xp.int64)
    d = xp.empty((n, nc, 3), dtype=xp.float64)
    valid = xp.empty((n, nc), dtype=bool)
    _k("compact")(
        xp.ascontiguousarray(ch.owner, dtype=xp.int64),
        xp.ascontiguousarray(ch.d, dtype=xp.float64),
        xp.ascontiguousarray(ch.centers, dtype=xp.int64),
        cols,
        nnei,
        nc,
        owner,
        own,
        d,
        valid,
    )
    return owner, own, d, valid


def centre_sums(xp, g, d):
    """(n, 12) float64 per centre: sum over slots of g (n, nc, 3), then the virial -g^T d row-major."""
    n, nc = g.shape[:2]
    out = xp.empty((n, 12), dtype=xp.float64)
    _k("centre_sums")(xp.ascontiguousarray(g), xp.ascontiguousarray(d), nc, out)
    return out


def _desc_block(gr, A: int, block: bool) -> bool:
    """Use desc.py (block per centre; ``block``: EngineSettings.desc == "block") rather than the
    elementwise kernels below, where its shared memory fits?"""
    from dpsnake.engine.cuda import desc

    return block and desc.supported(gr.dtype.name, gr.shape[2], A)


def descriptor(xp, gr, A: int, block: bool = True):
    """D (n, M1 * A) = gr^T gr[:, :, :A] per centre, gr (n, 4, M1) contiguous."""
    if _desc_block(gr, A, block):
        from dpsnake.engine.cuda.desc import descriptor as block

        return block(xp, gr, A)
    n, _, M1 = gr.shape
    D = xp.empty((n, M1, A), dtype=gr.dtype)
    _k("desc_D")(gr, M1, A, D)
    return D.reshape(n, M1 * A)


def descriptor_grad(xp, gr, gD, scale: float, block: bool = True):
    """dE/dgr (n, 4, M1) from gD = dE/dD (n, M1, A), times ``scale`` (1/nnei)."""
    if _desc_block(gr, gD.shape[2], block):
        from dpsnake.engine.cuda.desc import descriptor_grad as block

        return block(xp, gr, gD, scale)
    n, _, M1 = gr.shape
    ggr = xp.empty_like(gr)
    gD = xp.ascontiguousarray(gD)
    A, sc = gD.shape[2], gr.dtype.type(scale)
    _k("desc_ggr")(gr, gD, M1, A, sc, ggr)
    _k("desc_ggr_add")(gr, gD, M1, A, sc, ggr[:, :, :A])
    return ggr
