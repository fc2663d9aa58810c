"""Fused elementwise kernels (CuPy) for the neighbour build: wrapping, ghost images, bin keys, the
bin-ordered ext arrays and each centre's 27 candidate ranges, a handful of launches in place of the
~60 small array operations of neighbor.py's array code (which stays the reference and the NumPy
path). Family ``nbr`` of elementwise.py (``EngineSettings.fast``; sources in nbr.cu); on a GPU the
array code cost ~3 ms per call in launches and syncs, whatever the number of atoms.

Per-system geometry travels as one (S, GEO) float64 table, see :func:`pack_geometry`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dpsnake.engine.cuda import elementwise as ew

GEO = 32  # columns: inv 0-8, h 9-17, margin 18-20, pbc 21, lo 22-24, bsize 25-27, nb 28-30, boff 31 (nbr.cu);
# pbc is a bit mask: bit k set when direction k is periodic (7: fully periodic, 0: none)


class ExtArrays(NamedTuple):
    """Output of :func:`build_ext`: wrapped atoms (N, 3), their bins cbin (N, 3), the ext arrays
    (atoms first, then each atom's ghosts) owner (E,), epos (E, 3), key (E,) bin keys, the
    geometry table on the device, and the ghost count (0-d, on the device)."""

    wrapped: object
    cbin: object
    owner: object
    epos: object
    key: object
    geo: object
    ghosts: object


class DeviceGeometry(NamedTuple):
    """Output of :func:`device_geometry`: the (S, GEO) table and the 0-d flag (0 usable, 1 usable
    but make a new grid next time, 2 not usable)."""

    table: object
    flag: object


def pack_geometry(geo, lo, bsize, nb, boff) -> np.ndarray:
    """(S, GEO) float64 host table of a :class:`neighbor._CellGeometry` and the bin grid."""
    S = len(lo)
    t = np.zeros((S, GEO))
    t[:, 0:9] = geo.inv.reshape(S, 9)
    t[:, 9:18] = geo.h.reshape(S, 9)
    t[:, 18:21] = geo.margin
    t[:, 21] = geo.pbc @ np.array([1, 2, 4])  # bit k: direction k periodic
    t[:, 22:25] = lo
    t[:, 25:28] = bsize
    t[:, 28:31] = nb
    t[:, 31] = boff[:-1]
    return t


def device_geometry(xp, cells, prev, rcut: float, nimg: int):
    """The (S, GEO) table of periodic ``cells`` (S, 3, 3) on the device, keeping the bin counts,
    offsets and ``nimg`` of the earlier table ``prev``, and a 0-d flag (the worst system's:
    0 usable, 1 usable but make a new grid next time, 2 not usable). No host copy of the cells."""
    S = cells.shape[0]
    geo = xp.empty((S, GEO))
    flag = xp.empty(S, dtype=xp.int64)
    ew._k("nb_geometry")(xp.ascontiguousarray(cells, dtype=xp.float64), prev, float(rcut), int(nimg), geo, flag)
    return DeviceGeometry(geo, flag.max())


def build_ext(xp, coords, system, table, nimg: int, total_bins: int, cap=None):
    """Wrapped atoms and their ghost images, with bin keys, in a few launches.

    Returns :class:`ExtArrays`.
    ``cap`` None: E = N + the ghosts (one host sync); else E = cap, a guess: entries past the
    ghosts are fillers in bin ``total_bins`` (past every real bin) and, if the ghosts do not
    fit, the count says so (the caller checks it later and redoes the call).
    """
    N = coords.shape[0]
    geo = xp.asarray(table)
    coords = xp.ascontiguousarray(coords, dtype=xp.float64)
    frac = xp.empty((N, 3))
    wrapped = xp.empty((N, 3))
    cbin = xp.empty((N, 3), dtype=xp.int64)
    nghost = xp.empty(N, dtype=xp.int64)
    ew._k("nb_wrap")(system, coords, geo, nimg, frac, wrapped, cbin, nghost)
    ends = xp.cumsum(nghost)
    ghosts = ends[-1] if N else xp.zeros((), dtype=xp.int64)
    if cap is None:
        E = N + int(ghosts)  # a sync: sizes the ext arrays
        eown, epos, ekey = xp.empty(E, dtype=xp.int64), xp.empty((E, 3)), xp.empty(E, dtype=xp.int64)
    else:
        E = int(cap)
        eown, epos, ekey = xp.zeros(E, dtype=xp.int64), xp.zeros((E, 3)), xp.full(E, total_bins, dtype=xp.int64)
    ew._k("nb_ghosts")(system, ends, nghost, frac, wrapped, cbin, geo, nimg, N, E, eown, epos, ekey)
    return ExtArrays(wrapped, cbin, eown, epos, ekey, geo, ghosts)


def bin_order(xp, key, total_bins: int):
    """Ext indices (E,) in bin order, each bin's ascending (what a stable argsort of ``key``
    gives), and the bin edges (total_bins + 1,) into it, by counting: no sort, no host sync.
    Keys equal to ``total_bins`` (fillers, :func:`build_ext`) go last, after every bin."""
    E = key.shape[0]
    count = xp.zeros(total_bins + 2, dtype=xp.int64)
    ew._k("nb_count")(key, count)
    edges = xp.cumsum(count)
    cursor = xp.zeros(total_bins + 1, dtype=xp.int64)
    order = xp.empty(E, dtype=xp.int64)
    ew._k("nb_place")(key, edges, cursor, order)
    ew._k("nb_binsort")(edges[:total_bins], edges[1 : total_bins + 1], order)
    return order, edges[: total_bins + 1]


def sorted_ext(xp, order, epos, eown, atype):
    """Ext arrays in bin order: pos (E, 3), owner, type, ext index (all contiguous, int64)."""
    E = order.shape[0]
    spos = xp.empty((E, 3))
    sown = xp.empty(E, dtype=xp.int64)
    stype = xp.empty(E, dtype=xp.int64)
    ew._k("nb_sorted")(order, epos, eown, xp.ascontiguousarray(atype, dtype=xp.int64), spos, sown, stype)
    return spos, sown, stype, xp.ascontiguousarray(order, dtype=xp.int64)


def bin_ranges(xp, centers, cbin, system, geo, edges):
    """start, count (n, 27) int64 of the 27 bins around each centre (out-of-grid bins count 0)."""
    n = centers.shape[0]
    start = xp.empty((n, 27), dtype=xp.int64)
    cnt = xp.empty((n, 27), dtype=xp.int64)
    ew._k("nb_ranges")(xp.ascontiguousarray(centers, dtype=xp.int64)[:, None], cbin, system, geo, edges, start, cnt)
    return start, cnt
