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
  kernels in descriptor_kernels.py when the shared memory fits, the elementwise ones below else.
- ``nbr``: the neighbour build (wrapping, ghost images, bins), in neighbor_kernels.py, and the
  compaction of a chunk's slots (ensemble.py).
- ``graph``: the MD integrator stages replayed as CUDA graphs (md/graphs.py).

Selected by ``DPSNAKE_FAST`` (comma list of the names above; default all, "0" none). A kernel that
fails to compile or launch is switched off for the process with a warning and the array code runs.
"""

from __future__ import annotations

import functools
import os
import warnings

FEATURES = ("nets", "env", "scatter", "desc", "nbr", "graph")
_broken: set = set()


def enabled(xp, name: str) -> bool:
    """True if fused kernel family ``name`` is to be used for namespace ``xp``."""
    if xp.__name__ != "cupy" or name in _broken:
        return False
    env = os.environ.get("DPSNAKE_FAST", "all").strip().lower()
    if env in ("0", "none", "off", ""):
        return False
    return env in ("1", "all") or name in {s.strip() for s in env.split(",")}


def guarded(name: str, fn, *args):
    """Run fn(*args); on any error switch family ``name`` off, warn once and return None."""
    try:
        return fn(*args)
    except Exception as exc:  # compile or launch failure: fall back to the array code
        _broken.add(name)
        warnings.warn(
            f"dpsnake fused kernels '{name}' disabled: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=3
        )
        return None


@functools.cache
def _k(name: str):
    import cupy

    return cupy.ElementwiseKernel(*_SRC[name], name=f"dps_{name}")


_SWITCH = """
    const double r = sqrt(dx * dx + dy * dy + dz * dz);
    const double q = 1.0 / (r + p);
    const double rcl = fmin(fmax(r, rs), rc);
    const double u = (rcl - rs) / (rc - rs);
    const double u2 = u * u;
    const double sw = u2 * u * (-6.0 * u2 + 15.0 * u - 10.0) + 1.0;
"""

_SRC = {
    # y = tanh(a w + b) idt + res, dy = (1 - t^2) idt (all broadcast)
    "tanh_dy": (
        "T a, T w, T b, T idt, T res",
        "T y, T dy",
        "const T t = tanh(a * w + b); y = t * idt + res; dy = ((T)1 - t * t) * idt;",
    ),
    "tanh": ("T a, T w, T b, T idt, T res", "T y", "y = tanh(a * w + b) * idt + res;"),
    # backward of a concat(x, x) residual: g += g0 + g1 (left to right, as the array code)
    "add2": ("T g0, T g1", "T g", "g = g + g0 + g1;"),
    # env matrix: element i = (centre, slot); d (n, nnei, 3) and Rn (n, nnei, 4) contiguous
    "env_fwd": (
        "bool valid, raw float64 d, raw float64 davg, raw float64 rstd, int64 nnei, float64 rs, float64 rc, float64 p",
        "raw T Rn",
        """
    const long long s = i % nnei;
    double R0 = 0.0, R1 = 0.0, R2 = 0.0, R3 = 0.0;
    if (valid) {
        const double dx = d[3 * i], dy = d[3 * i + 1], dz = d[3 * i + 2];
    """
        + _SWITCH
        + """
        R0 = sw * q;
        const double s2 = sw * q * q;
        R1 = s2 * dx; R2 = s2 * dy; R3 = s2 * dz;
    }
    Rn[4 * i] = (T)((R0 - davg[4 * s]) * rstd[4 * s]);
    Rn[4 * i + 1] = (T)((R1 - davg[4 * s + 1]) * rstd[4 * s + 1]);
    Rn[4 * i + 2] = (T)((R2 - davg[4 * s + 2]) * rstd[4 * s + 2]);
    Rn[4 * i + 3] = (T)((R3 - davg[4 * s + 3]) * rstd[4 * s + 3]);
    """,
    ),
    # chain rule dE/dRn -> g = dE/dd through R = sw [q, d q^2]; empty slots give exactly 0
    "env_bwd": (
        "bool valid, raw T gRn, raw float64 d, raw float64 rstd, int64 nnei, float64 rs, float64 rc, float64 p",
        "raw float64 g",
        """
    const long long s = i % nnei;
    double g0 = 0.0, g1 = 0.0, g2 = 0.0;
    if (valid) {
        const double dx = d[3 * i], dy = d[3 * i + 1], dz = d[3 * i + 2];
    """
        + _SWITCH
        + """
        const double dsw = (r > rs && r < rc) ? -30.0 * u2 * (u - 1.0) * (u - 1.0) / (rc - rs) : 0.0;
        const double a0 = (double)gRn[4 * i] * rstd[4 * s];
        const double a1 = (double)gRn[4 * i + 1] * rstd[4 * s + 1];
        const double a2 = (double)gRn[4 * i + 2] * rstd[4 * s + 2];
        const double a3 = (double)gRn[4 * i + 3] * rstd[4 * s + 3];
        const double gvd = a1 * dx + a2 * dy + a3 * dz;
        const double coef = (a0 * (dsw * q - sw * q * q) + gvd * (dsw * q * q - 2.0 * sw * q * q * q)) / r;
        const double s2 = sw * q * q;
        g0 = coef * dx + s2 * a1; g1 = coef * dy + s2 * a2; g2 = coef * dz + s2 * a3;
    }
    g[3 * i] = g0; g[3 * i + 1] = g1; g[3 * i + 2] = g2;
    """,
    ),
    # f[own] -= g over (n, nnei, 3) (own, valid broadcast over the last axis); f (N, 3) contiguous
    "scatter_neg": ("T g, int64 own, bool valid", "raw T f", "if (valid) atomicAdd(&f[own * 3 + i % 3], -g);"),
    # per centre c: out[c, 0:3] = sum_s g[c, s], out[c, 3 + 3a + b] = -sum_s g[c, s, a] d[c, s, b]
    "centre_sums": (
        "raw float64 g, raw float64 d, int64 nc",
        "float64 out",
        """
    const long long c = i / 12, base = c * nc * 3;
    const int j = (int)(i - 12 * c);
    double s = 0.0;
    if (j < 3) {
        for (long long t = 0; t < nc; ++t) s += g[base + 3 * t + j];
    } else {
        const long long a = (j - 3) / 3, b = (j - 3) % 3;
        for (long long t = 0; t < nc; ++t) s -= g[base + 3 * t + a] * d[base + 3 * t + b];
    }
    out = s;
    """,
    ),
    # D[c, p, q] = sum_k gr[c, k, p] gr[c, k, q], gr (n, 4, M1), D (n, M1, A)
    "desc_D": (
        "raw T gr, int64 M1, int64 A",
        "T D",
        """
    // one 64-bit division per element (they cost ~4x the 32-bit ones, and this kernel is all index)
    const long long c = i / (M1 * A), b = c * 4 * M1;
    const int r = (int)(i - c * M1 * A), p = r / (int)A, q = r - p * (int)A;
    D = gr[b + p] * gr[b + q] + gr[b + M1 + p] * gr[b + M1 + q]
        + gr[b + 2 * M1 + p] * gr[b + 2 * M1 + q] + gr[b + 3 * M1 + p] * gr[b + 3 * M1 + q];
    """,
    ),
    # backward of D to gr: ggr[c, k, p] = (sum_q gr[c, k, q] gD[c, p, q]
    #                                      + [p < A] sum_m gr[c, k, m] gD[c, m, p]) * scale,
    # the second term (p < A only) in its own launch so no warp waits on a few long loops
    "desc_ggr": (
        "raw T gr, raw T gD, int64 M1, int64 A, T scale",
        "T ggr",
        """
    const long long c = i / (4 * M1);
    const int r = (int)(i - c * 4 * M1), k = r / (int)M1, p = r - k * (int)M1;
    const long long gb = c * 4 * M1 + k * M1, db = c * M1 * A;
    T v = 0;
    for (long long q = 0; q < A; ++q) v += gr[gb + q] * gD[db + p * A + q];
    ggr = p < A ? v : v * scale;
    """,
    ),
    "desc_ggr_add": (
        "raw T gr, raw T gD, int64 M1, int64 A, T scale",
        "T ggr",
        """
    const long long c = i / (4 * A);
    const int r = (int)(i - c * 4 * A), k = r / (int)A, p = r - k * (int)A;
    const long long gb = c * 4 * M1 + k * M1, db = c * M1 * A;
    T v2 = 0;
    for (long long m = 0; m < M1; ++m) v2 += gr[gb + m] * gD[db + m * A + p];
    ggr = (ggr + v2) * scale;
    """,
    ),
    # compaction of a chunk: element i = (centre c, kept column j) of (n, nc); owner, d (n, nnei[, 3])
    "compact": (
        "raw int64 owner, raw float64 d, raw int64 centers, raw int64 cols, int64 nnei, int64 nc",
        "int64 owner_c, int64 own, raw float64 dc, bool valid",
        """
    const long long c = i / nc, src = c * nnei + cols[i - c * nc];
    const long long o = owner[src];
    owner_c = o; valid = o >= 0; own = o >= 0 ? o : centers[c];
    dc[3 * i] = d[3 * src]; dc[3 * i + 1] = d[3 * src + 1]; dc[3 * i + 2] = d[3 * src + 2];
    """,
    ),
}


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


def _desc_block(gr, A: int) -> bool:
    """Use descriptor_kernels.py (block per centre) rather than the elementwise kernels below?
    DPSNAKE_DESC=elementwise keeps the latter (for comparisons)."""
    from dpsnake.engine import descriptor_kernels as dk

    return os.environ.get("DPSNAKE_DESC", "block") != "elementwise" and dk.supported(gr.dtype.name, gr.shape[2], A)


def descriptor(xp, gr, A: int):
    """D (n, M1 * A) = gr^T gr[:, :, :A] per centre, gr (n, 4, M1) contiguous."""
    if _desc_block(gr, A):
        from dpsnake.engine.descriptor_kernels import descriptor as block

        return block(xp, gr, A)
    n, _, M1 = gr.shape
    D = xp.empty((n, M1, A), dtype=gr.dtype)
    _k("desc_D")(gr, M1, A, D)
    return D.reshape(n, M1 * A)


def descriptor_grad(xp, gr, gD, scale: float):
    """dE/dgr (n, 4, M1) from gD = dE/dD (n, M1, A), times ``scale`` (1/nnei)."""
    if _desc_block(gr, gD.shape[2]):
        from dpsnake.engine.descriptor_kernels import descriptor_grad as block

        return block(xp, gr, gD, scale)
    n, _, M1 = gr.shape
    ggr = xp.empty_like(gr)
    gD = xp.ascontiguousarray(gD)
    A, sc = gD.shape[2], gr.dtype.type(scale)
    _k("desc_ggr")(gr, gD, M1, A, sc, ggr)
    _k("desc_ggr_add")(gr, gD, M1, A, sc, ggr[:, :, :A])
    return ggr
