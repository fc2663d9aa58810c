"""Fused elementwise kernels (CuPy) for the neighbour build: wrapping, ghost images, bin keys, the
bin-ordered ext arrays and each centre's 27 candidate ranges, a handful of launches in place of the
~60 small array operations of neighbor.py's array code (which stays the reference and the NumPy
path). Family ``nbr`` of elementwise.py (``DPSNAKE_FAST``); on a GPU the array code cost ~3 ms per
call in launches and syncs, whatever the number of atoms.

Per-system geometry travels as one (S, GEO) float64 table, see :func:`pack_geometry`.
"""

from __future__ import annotations

import numpy as np

from dpsnake.engine import elementwise as ew

GEO = 32  # columns: inv 0-8, h 9-17, margin 18-20, pbc 21, lo 22-24, bsize 25-27, nb 28-30, boff 31

_BIN = """
    long long bb[3];
    for (int k = 0; k < 3; ++k) {
        long long v = (long long)floor((p[k] - geo[g + 22 + k]) / geo[g + 25 + k]);
        const long long hi = (long long)geo[g + 28 + k] - 1;
        bb[k] = v < 0 ? 0 : (v > hi ? hi : v);
    }
    const long long key = (long long)geo[g + 31] + (bb[0] * (long long)geo[g + 29] + bb[1])
                          * (long long)geo[g + 30] + bb[2];
"""

_RANGE = """
        int lo[3], hi[3];
        for (int k = 0; k < 3; ++k) {
            lo[k] = 1; hi[k] = 0;
            if (per) {
                for (int s = -(int)nimg; s <= (int)nimg; ++s) {
                    const double v = f[k] + (double)s;
                    if (v >= -geo[g + 18 + k] && v < 1.0 + geo[g + 18 + k]) {
                        if (lo[k] > hi[k]) lo[k] = s;
                        hi[k] = s;
                    }
                }
            } else { lo[k] = 0; hi[k] = 0; }
        }
"""

SRC = {
    # one atom: wrap into the cell (periodic systems), count its ghost images, bin key of the atom
    # one atom: wrap into the cell (periodic systems), its bin, how many ghost images it has
    "nb_wrap": (
        "int64 sys, raw float64 coords, raw float64 geo, int64 nimg",
        "raw float64 frac, raw float64 wrapped, raw int64 cbin, int64 nghost",
        """
    const long long g = sys * 32;
    const bool per = geo[g + 21] != 0.0;
    double c[3] = {coords[3 * i], coords[3 * i + 1], coords[3 * i + 2]};
    double f[3], p[3];
    for (int j = 0; j < 3; ++j) {
        f[j] = c[0] * geo[g + j] + c[1] * geo[g + 3 + j] + c[2] * geo[g + 6 + j];
        if (per) f[j] = f[j] - floor(f[j]);
    }
    for (int j = 0; j < 3; ++j)
        p[j] = per ? f[0] * geo[g + 9 + j] + f[1] * geo[g + 12 + j] + f[2] * geo[g + 15 + j] : c[j];
    for (int j = 0; j < 3; ++j) { frac[3 * i + j] = f[j]; wrapped[3 * i + j] = p[j]; }
    """
        + _BIN
        + """
    for (int k = 0; k < 3; ++k) cbin[3 * i + k] = bb[k];
    """
        + _RANGE.replace("        ", "    ")
        + """
    // images in range per direction (an empty range, lo > hi, only for a NaN position: no ghosts)
    long long nimage = 1;
    for (int k = 0; k < 3; ++k) nimage *= hi[k] >= lo[k] ? hi[k] - lo[k] + 1 : 0;
    nghost = per && nimage > 0 ? nimage - 1 : 0;
    """,
    ),
    # one atom: its own ext entry at i, then its ghosts (shifts in meshgrid order, zero shift
    # skipped) from natoms + ends - nghost (ends: inclusive cumulative sum of nghost); ghosts at
    # cap and beyond are not written (the arrays were sized from a guess; the call is redone)
    "nb_ghosts": (
        "int64 sys, int64 ends, int64 nghost, raw float64 frac, raw float64 wrapped, "
        "raw int64 cbin, raw float64 geo, int64 nimg, int64 natoms, int64 cap",
        "raw int64 eown, raw float64 epos, raw int64 ekey",
        """
    const long long g = sys * 32;
    const bool per = geo[g + 21] != 0.0;
    eown[i] = i;
    for (int j = 0; j < 3; ++j) epos[3 * i + j] = wrapped[3 * i + j];
    ekey[i] = (long long)geo[g + 31] + (cbin[3 * i] * (long long)geo[g + 29] + cbin[3 * i + 1])
              * (long long)geo[g + 30] + cbin[3 * i + 2];
    if (per && nghost > 0) {
        const double f[3] = {frac[3 * i], frac[3 * i + 1], frac[3 * i + 2]};
        """
        + _RANGE
        + """
        long long o = natoms + ends - nghost;
        for (int a = lo[0]; a <= hi[0]; ++a)
        for (int b = lo[1]; b <= hi[1]; ++b)
        for (int c = lo[2]; c <= hi[2]; ++c) {
            if (a == 0 && b == 0 && c == 0) continue;
            double p[3];
            for (int j = 0; j < 3; ++j)
                p[j] = wrapped[3 * i + j] + ((double)a * geo[g + 9 + j] + (double)b * geo[g + 12 + j]
                                             + (double)c * geo[g + 15 + j]);
            """
        + _BIN
        + """
            if (o < cap) {
                eown[o] = i;
                for (int j = 0; j < 3; ++j) epos[3 * o + j] = p[j];
                ekey[o] = key;
            }
            ++o;
        }
    }
    """,
    ),
    # ext entries in bin order: position, owner, type (one gather pass)
    "nb_sorted": (
        "int64 o, raw float64 epos, raw int64 eown, raw int64 atype",
        "raw float64 spos, int64 sown, int64 stype",
        """
    for (int j = 0; j < 3; ++j) spos[3 * i + j] = epos[3 * o + j];
    sown = eown[o];
    stype = atype[eown[o]];
    """,
    ),
    # bin order by counting: atoms per bin (at key + 1, so that the inclusive scan is the edges),
    # then each ext entry's place in its bin's range (in any order: atomics), then each bin's range
    # sorted by ext index (a thread per bin, a few dozen entries), the order a stable sort gives
    "nb_count": ("int64 key", "raw int64 count", "atomicAdd((unsigned long long*)&count[key + 1], 1ULL);"),
    "nb_place": (
        "int64 key, raw int64 edges",
        "raw int64 cursor, raw int64 order",
        """
    const long long p = edges[key] + (long long)atomicAdd((unsigned long long*)&cursor[key], 1ULL);
    order[p] = i;
    """,
    ),
    "nb_binsort": (
        "int64 lo, int64 hi",
        "raw int64 order",
        """
    for (long long a = lo + 1; a < hi; ++a) {
        const long long v = order[a];
        long long b = a;
        while (b > lo && order[b - 1] > v) { order[b] = order[b - 1]; --b; }
        order[b] = v;
    }
    """,
    ),
    # one periodic system: its table row from its cell and the bin counts of an earlier table
    # (prev), as pack_geometry of _CellGeometry with that grid; flag 0: usable, 1: usable, but the
    # cell grew 2% past room for another bin (a new grid on the host next time), 2: not usable (singular
    # cell, bins smaller than rcut, or more images than nimg): the call is redone on the host
    "nb_geometry": (
        "raw float64 cells, raw float64 prev, float64 rcut, int64 nimg",
        "raw float64 geo, int64 flag",
        """
    double h[9], cof[9], inv[9], m[3];
    for (int j = 0; j < 9; ++j) h[j] = cells[9 * i + j];
    for (int r = 0; r < 3; ++r)
        for (int k = 0; k < 3; ++k) {
            const double* u = h + 3 * ((r + 1) % 3);
            const double* v = h + 3 * ((r + 2) % 3);
            cof[3 * r + k] = u[(k + 1) % 3] * v[(k + 2) % 3] - u[(k + 2) % 3] * v[(k + 1) % 3];
        }
    const double det = h[0] * cof[0] + h[1] * cof[1] + h[2] * cof[2];
    for (int a = 0; a < 3; ++a)
        for (int b = 0; b < 3; ++b) inv[3 * a + b] = cof[3 * b + a] / det;
    for (int k = 0; k < 3; ++k)
        m[k] = rcut * sqrt(inv[k] * inv[k] + inv[3 + k] * inv[3 + k] + inv[6 + k] * inv[6 + k]);
    const long long g = 32 * i;
    long long f = fabs(det) > 1e-8 ? 0 : 2;  // NaN cells too
    for (int j = 0; j < 9; ++j) { geo[g + j] = inv[j]; geo[g + 9 + j] = h[j]; }
    for (int k = 0; k < 3; ++k) {
        double lo = 0.0, hi = 0.0;
        for (int r = 0; r < 3; ++r) {
            const double a = -m[r] * h[3 * r + k], b = (1.0 + m[r]) * h[3 * r + k];
            lo += a < b ? a : b;
            hi += a < b ? b : a;
        }
        const double ext = hi - lo > 0.0 ? hi - lo : 0.0, nb = prev[g + 28 + k];
        const double bs = ext > 0.0 ? ext / nb : 1.0;
        if (!(m[k] <= (double)nimg) || (nb > 1.0 && !(bs >= rcut * (1.0 - 1e-12)))) f = 2;
        else if (f == 0 && floor(ext / (1.02 * rcut)) > nb) f = 1;  // 2% past: a cell that
        // fluctuates about a bin boundary is not regridded (and then found too small) every step
        geo[g + 18 + k] = m[k];
        geo[g + 22 + k] = lo;
        geo[g + 25 + k] = bs;
        geo[g + 28 + k] = nb;
    }
    geo[g + 21] = 1.0;
    geo[g + 31] = prev[g + 31];
    flag = f;
    """,
    ),
    # (centre, one of 27 neighbouring bins) -> start and count of its atoms in bin order
    "nb_ranges": (
        "int64 cidx, raw int64 cbin, raw int64 system, raw float64 geo, raw int64 edges",
        "int64 start, int64 cnt",
        """
    const long long b = i % 27, g = system[cidx] * 32;
    const long long o[3] = {b / 9 - 1, (b / 3) % 3 - 1, b % 3 - 1};
    long long bb[3];
    bool inb = true;
    for (int k = 0; k < 3; ++k) {
        bb[k] = cbin[3 * cidx + k] + o[k];
        inb = inb && bb[k] >= 0 && bb[k] < (long long)geo[g + 28 + k];
    }
    if (inb) {
        const long long id = (long long)geo[g + 31] + (bb[0] * (long long)geo[g + 29] + bb[1])
                             * (long long)geo[g + 30] + bb[2];
        start = edges[id];
        cnt = edges[id + 1] - edges[id];
    } else {
        start = edges[0];
        cnt = 0;
    }
    """,
    ),
}
ew._SRC.update(SRC)


def pack_geometry(geo, lo, bsize, nb, boff) -> np.ndarray:
    """(S, GEO) float64 host table of a :class:`neighbor._CellGeometry` and the bin grid."""
    S = len(lo)
    t = np.zeros((S, GEO))
    t[:, 0:9] = geo.inv.reshape(S, 9)
    t[:, 9:18] = geo.h.reshape(S, 9)
    t[:, 18:21] = geo.margin
    t[:, 21] = geo.pbc
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
    return geo, flag.max()


def build_ext(xp, coords, system, table, nimg: int, total_bins: int, cap=None):
    """Wrapped atoms and their ghost images, with bin keys, in a few launches.

    Returns wrapped (N, 3), cbin (N, 3) bins of the atoms, the ext arrays (atoms first, then each
    atom's ghosts): owner (E,), epos (E, 3), key (E,), and the ghost count (0-d, on the device).
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
    return wrapped, cbin, eown, epos, ekey, geo, ghosts


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
