"""Tabulated embedding nets: DeePMD-kit's model compression (``dp compress``) for se_e2_a and for
the geometric net of se_atten / se_atten_v2 in strip mode.

Each embedding net G: x -> (M,) is replaced by a fifth-order polynomial per interval of x (the
normalised s-channel Rn[:, 0]) that matches G, G' and G'' at both ends of the interval. The grid is
DeePMD-kit's: [lower, upper) with ``stride`` and [upper, extrapolate * upper) with 10 * stride, where
lower = floor(min -davg / dstd) (an empty slot) and upper = ceil(max (sw(d) / d - davg) / dstd) at
d = min_nbor_dist, the closest distance in the training data. Outside, the value (and slope) of the
first / last interval's left node is used, as DeePMD-kit's ``locate_xx_se_a`` does, so a model
compressed here gives DeePMD-kit's compressed outputs (tests/test_engine_tabulate.py compares with
``dp compress``; the accuracy against the uncompressed nets is in docs/benchmarks.md).

se_atten strip (:func:`build_strip_table`): the one net Gs(s) of the descriptor, one table for all
type pairs (the type part is the strip table of :mod:`dpsnake.engine.attn.model`), on the grid of
DeePMD-kit's PyTorch ``dp --pt compress`` (tests/test_engine_attn_tabulate.py).

``TabulatedNet`` has the interface of :class:`~dpsnake.engine.nets.Net` that descriptor.py uses
(forward with a cache, backward for the input gradient), in NumPy or CuPy array code; on CUDA the
kernels of cuda/tab.py replace it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dpsnake.engine.envmat import switch
from dpsnake.errors import UserError


@dataclass(frozen=True)
class Compression:
    """How to tabulate: ``min_nbor_dist`` (A, from the training data), ``stride`` of the first
    table (the second uses 10 x stride, as ``dp compress -s``), ``extrapolate`` (x range of the
    second table, in units of upper)."""

    min_nbor_dist: float
    stride: float = 0.01
    extrapolate: float = 5.0

    def __post_init__(self):
        if not (self.min_nbor_dist > 0):
            raise UserError(f"compress.min_nbor_dist: {self.min_nbor_dist!r} is not a positive distance (A)")
        if not (self.stride > 0):
            raise UserError(f"compress.stride: {self.stride!r} is not positive")
        if not (self.extrapolate > 1):
            raise UserError(f"compress.extrapolate: {self.extrapolate!r} is not > 1")


def _act_derivs(name: str, z):
    """act(z), act'(z), act''(z) (float64 NumPy)."""
    name = name.lower()
    if name == "tanh":
        y = np.tanh(z)
        return y, 1 - y * y, -2 * y * (1 - y * y)
    if name in ("none", "linear"):
        return z, np.ones_like(z), np.zeros_like(z)
    if name == "relu":
        return np.maximum(z, 0), (z > 0).astype(float), np.zeros_like(z)
    if name == "relu6":
        return np.clip(z, 0, 6), ((z > 0) & (z < 6)).astype(float), np.zeros_like(z)
    if name in ("sigmoid", "softplus", "silu"):
        s = 1 / (1 + np.exp(-z))
        ds, d2s = s * (1 - s), s * (1 - s) * (1 - 2 * s)
        if name == "sigmoid":
            return s, ds, d2s
        if name == "softplus":
            return np.logaddexp(0, z), s, ds
        return z * s, s + z * ds, 2 * ds + z * d2s
    if name in ("gelu", "gelu_tf"):
        c, k = math.sqrt(2 / math.pi), 0.044715
        u = c * (z + k * z**3)
        du, d2u = c * (1 + 3 * k * z * z), c * 6 * k * z
        t = np.tanh(u)
        dt = (1 - t * t) * du
        d2t = -2 * t * (1 - t * t) * du * du + (1 - t * t) * d2u
        return 0.5 * z * (1 + t), 0.5 * (1 + t) + 0.5 * z * dt, dt + 0.5 * z * d2t
    raise UserError(f"compress: activation {name!r} of the embedding net cannot be tabulated")


def net_derivatives(net, x):
    """G(x), G'(x), G''(x), each (n, M) float64, for a 1-input net and x (n,) (forward mode)."""
    h = np.asarray(x, dtype=np.float64).reshape(-1, 1)
    dh, d2h = np.ones_like(h), np.zeros_like(h)
    for l in net.layers:
        w = np.asarray(l.w, dtype=np.float64)
        z = h @ w + (0 if l.b is None else np.asarray(l.b, dtype=np.float64))
        dz, d2z = dh @ w, d2h @ w
        a, a1, a2 = _act_derivs(l.activation, z)
        y, dy, d2y = a, a1 * dz, a2 * dz * dz + a1 * d2z
        if l.idt is not None:
            idt = np.asarray(l.idt, dtype=np.float64)
            y, dy, d2y = y * idt, dy * idt, d2y * idt
        if l.resnet and l.nout == l.nin:
            y, dy, d2y = y + h, dy + dh, d2y + d2h
        elif l.resnet and l.nout == 2 * l.nin:
            y = y + np.concatenate([h, h], axis=1)
            dy = dy + np.concatenate([dh, dh], axis=1)
            d2y = d2y + np.concatenate([d2h, d2h], axis=1)
        h, dh, d2h = y, dy, d2y
    return h, dh, d2h


@dataclass
class Table:
    """One tabulated net: ``coef`` (nspline, 6, M) float64, polynomial in dx = x - node of the
    interval; bounds ``lower`` <= ``upper`` < ``vmax`` and strides (DeePMD-kit's table_info)."""

    lower: float
    upper: float
    vmax: float
    stride0: float
    stride1: float
    coef: np.ndarray

    @property
    def nspline(self) -> int:
        return self.coef.shape[0]

    @classmethod
    def build(cls, net, lower: float, upper: float, comp: Compression) -> Table:
        s0, s1, ext = comp.stride, 10 * comp.stride, comp.extrapolate
        # DeePMD-kit's grid, node for node (np.arange's rounding included)
        xx = np.concatenate([np.arange(lower, upper, s0), np.arange(upper, ext * upper, s1), [ext * upper]])
        nspline = int((upper - lower) / s0 + (ext * upper - upper) / s1)
        if nspline < 1 or len(xx) < nspline + 1:
            raise UserError(f"compress: empty table for x in [{lower}, {upper}] (min_nbor_dist too large?)")
        v, d1, d2 = net_derivatives(net, xx[: nspline + 1])
        tt = np.full((nspline, 1), s1)
        tt[: int((upper - lower) / s0)] = s0
        hh = v[1:] - v[:-1]
        d1a, d1b, d2a, d2b = d1[:-1], d1[1:], d2[:-1], d2[1:]
        c = np.empty((nspline, 6, v.shape[1]))
        c[:, 0], c[:, 1], c[:, 2] = v[:-1], d1a, 0.5 * d2a
        c[:, 3] = (20 * hh - (8 * d1b + 12 * d1a) * tt - (3 * d2a - d2b) * tt * tt) / (2 * tt**3)
        c[:, 4] = (-30 * hh + (14 * d1b + 16 * d1a) * tt + (3 * d2a - 2 * d2b) * tt * tt) / (2 * tt**4)
        c[:, 5] = (12 * hh - 6 * (d1b + d1a) * tt + (d2b - d2a) * tt * tt) / (2 * tt**5)
        return cls(float(lower), float(upper), float(ext * upper), s0, s1, c)

    def to(self, xp, dtype) -> TabulatedNet:
        return TabulatedNet(self, xp.asarray(self.coef.astype(dtype)))


class TabulatedNet:
    """A :class:`Table` with its coefficients in an array namespace: the Net interface."""

    def __init__(self, table: Table, coef):
        self.table = table
        self.coef = coef  # (nspline, 6, M)

    @property
    def nin(self) -> int:
        return 1

    @property
    def nout(self) -> int:
        return self.coef.shape[2]

    def locate(self, xp, x):
        """Interval index (int) and dx (x's dtype) of x (any shape), DeePMD-kit's rules."""
        t = self.table
        first = int((t.upper - t.lower) / t.stride0)
        last = first + int((t.vmax - t.upper) / t.stride1) - 1
        xf = x.astype(xp.float64)
        i0 = xp.floor((xf - t.lower) / t.stride0)
        i1 = first + xp.floor((xf - t.upper) / t.stride1)
        idx = xp.where(xf < t.upper, i0, xp.where(xf < t.vmax, i1, last))
        idx = xp.where(xf < t.lower, 0, idx)
        idx = xp.clip(xp.nan_to_num(idx), 0, t.nspline - 1).astype(xp.int64)
        node = xp.where(idx < first, t.lower + idx * t.stride0, t.upper + (idx - first) * t.stride1)
        dx = xp.where((xf < t.lower) | (xf >= t.vmax), 0.0, xf - node)
        return idx, dx.astype(x.dtype)

    def forward(self, xp, x, keep: bool = True, ctx=None):
        """x (..., 1) -> G (..., M); the cache is G'(x) (..., M) when ``keep`` (``ctx`` unused:
        the Net interface)."""
        idx, dx = self.locate(xp, x[..., 0])
        c = self.coef[idx]  # (..., 6, M): one gather, then sums of products (4.5x 11 gathers + Horner)
        d2 = dx * dx
        d3, d4 = d2 * dx, d2 * d2
        one = xp.ones_like(dx)
        y = xp.einsum("...k,...km->...m", xp.stack([one, dx, d2, d3, d4, d4 * dx], axis=-1), c)
        if not keep:
            return y, None
        dp = xp.stack([xp.zeros_like(dx), one, 2 * dx, 3 * d2, 4 * d3, 5 * d4], axis=-1)
        return y, xp.einsum("...k,...km->...m", dp, c)

    def backward(self, xp, gy, cache, ctx=None):
        """gy = dL/dG (..., M) -> dL/dx (..., 1)."""
        return xp.einsum("...m,...m->...", gy, cache)[..., None]


def env_range(model, comp: Compression, first_slot: bool = False):
    """Per centre type: (lower, upper) of x = Rn[:, 0] (floored / ceiled), DeePMD-kit's rule.

    ``first_slot``: the rule of DeePMD-kit's PyTorch backend, whose tabulation reads davg / dstd
    (ntypes, nnei, 4) at ``[:, 0]``: the first neighbour slot's four channels rather than the
    s-channel of every slot. The statistics are the same in every slot, but the directional
    channels (davg 0) widen the range: upper also covers ceil(sw(d) / d / dstd_xyz).
    """
    d = comp.min_nbor_dist
    sw = float(switch(np, np.float64(d), model.rcut_smth, model.rcut)[0])
    if first_slot:
        davg, dstd = model.davg[:, 0, :], model.dstd[:, 0, :]  # (ntypes, 4)
    else:
        davg, dstd = model.davg[..., 0], model.dstd[..., 0]  # (ntypes, nnei)
    lower = (-davg / dstd).min(axis=1)
    upper = ((sw / d - davg) / dstd).max(axis=1)
    return np.floor(lower), np.ceil(upper)


def build_strip_table(model, comp: Compression) -> Table:
    """The :class:`Table` of the geometric net Gs(s) of an se_atten strip-mode model (an
    :class:`~dpsnake.engine.attn.model.AttnModel`): one grid for every centre type (the lowest
    lower, the highest upper), as DeePMD-kit's ``DescrptDPA1.enable_compression``."""
    lower, upper = env_range(model, comp, first_slot=True)
    return Table.build(model.embedding, lower.min(), upper.max(), comp)


def build_tables(model, comp: Compression) -> list:
    """One :class:`Table` per embedding net of ``model`` (None where the net is absent or every
    centre type using it excludes that neighbour type: those keep the net)."""
    lower, upper = env_range(model, comp)
    nt = model.ntypes
    tables = []
    for k, net in enumerate(model.embeddings):
        if net is None:
            tables.append(None)
            continue
        if model.type_one_side:
            # DeePMD-kit: centre types that do not exclude this neighbour type and have sel > 0
            use = [not model.desc_exclude[i, k] and model.sel[i] > 0 for i in range(nt)]
            if not any(use):
                tables.append(None)
                continue
            lo, up = lower[use].min(), upper[use].max()
        else:
            ti, tt = k % nt, k // nt  # k = ti + ntypes * tt (DPModel.embeddings)
            if model.desc_exclude[ti, tt]:
                tables.append(None)
                continue
            lo, up = lower[ti], upper[ti]
        tables.append(Table.build(net, lo, up, comp))
    return tables
