"""Neighbour search with cell lists (binning), batched over many systems, with DeePMD-kit v3 selection.

Layout: all atoms of all systems in one flat array (``system`` (N,) sorted ints). Periodicity is per
system and direction (``pbc`` (S, 3), or (S,) for every direction or none): periodic directions get
explicit ghost images out to rcut (any triclinic cell, cells shorter than 2 rcut included), then
all atoms and ghosts are binned on a per-system grid of bins no smaller than rcut; each centre looks
at its 27 surrounding bins. Cost and memory grow linearly with the number of atoms.

Mixed periodicity (slabs (T, T, F), wires (F, F, T)): only the periodic cell vectors matter. Each
non-periodic cell vector is replaced by a unit vector orthogonal to the periodic ones
(:func:`effective_cells`), along which atoms are neither wrapped nor imaged, so the results equal
those of the same system fully periodic with a vacuum wider than rcut, whatever the cell holds
along the non-periodic directions (zero, a vacuum, anything).

Selection (DeePMD-kit 3): the nearest ``nnei = sum(sel)`` atoms of any type within rcut (self
excluded), split by type in distance order, type t keeping the first ``sel[t]`` of its kind in block
``sec[t]:sec[t+1]``; what does not fit is dropped (counted in ``NeighborList.overflow``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from dpsnake.engine.cuda import nbr as nbk
from dpsnake.engine.cuda import selection
from dpsnake.engine.settings import EngineContext
from dpsnake.engine.xp import device_key, dot3, segment_minmax, take_rows, to_numpy
from dpsnake.errors import UserError

_MAX_GROUP = 4_000_000  # atoms x shifts handled at once when making ghost images


@dataclass
class BinGrid:
    """The bin grid of a batch: ``geo`` (_CellGeometry), per system ``lo`` / ``bsize`` (S, 3) A,
    ``nb`` (S, 3) bins per direction, ``boff`` (S + 1,) first bin of each system, and ``table``
    the packed (S, GEO) geometry on the device (kernel path; None until made). Host arrays, but
    lo / bsize / geo are None in a grid remade on the device (:meth:`NeighborBuilder._reused_grid`)."""

    geo: object
    lo: object
    bsize: object
    nb: np.ndarray
    boff: np.ndarray
    table: object = None


@dataclass
class NeighborChunk:
    """Neighbour data of a chunk of centre atoms.

    ``centers`` (n,) global atom indices; ``owner`` (n, nnei) global index of the neighbour's atom
    (-1 for empty slots); ``d`` (n, nnei, 3) float64 displacement r_neighbour - r_centre (A), zero in
    empty slots; ``valid`` (n, nnei) bool; ``overflow`` (n,) bool: this centre lost neighbours;
    ``stats`` (ntypes + 1,) int: the most slots a centre fills in each type block, then the number
    of centres that lost neighbours (:func:`chunk_stats`; None until computed).
    """

    centers: object
    owner: object
    d: object
    valid: object
    overflow: object
    stats: object = None


def chunk_stats(xp, ch: NeighborChunk, sel):
    """(ntypes + 1,) int: per type block the most valid slots of one centre (selection fills each
    block from its start), then the number of overflowing centres. The selection kernels write it
    as they go; this is the array code for the other paths."""
    if ch.stats is not None:
        return ch.stats
    sec = np.concatenate([[0], np.cumsum(sel)]).astype(int)
    n = ch.valid.shape[0]
    parts = [
        ch.valid[:, sec[t] : sec[t + 1]].sum(axis=1).max() if n else xp.zeros((), dtype=xp.int64)
        for t in range(len(sel))
    ]
    return xp.stack(parts + [ch.overflow.sum()]).astype(xp.int64)


class NeighborBuilder:
    """Ghost images + bins for a batch of systems; :meth:`chunk` selects neighbours of some centres.

    coords (N, 3) A; atype (N,) int; system (N,) sorted ints 0..S-1; cells (S, 3, 3) rows are lattice
    vectors; pbc (S, 3) bool per direction, or (S,) bool for every direction (:func:`pbc_axes`).
    ``pair_exclude`` (ntypes, ntypes) bool: pairs turned into empty slots.
    ``ctx``: the :class:`~dpsnake.engine.settings.EngineContext` (settings, kept grids) of the
    ensemble; a fresh default one if None. ``reuse_grid``: start from this layout's kept grid.
    """

    def __init__(self, xp, coords, atype, system, cells, pbc, rcut, sel, pair_exclude=None, reuse_grid=False, ctx=None):
        self.xp = xp
        self.ctx = ctx = EngineContext.of(ctx)
        self.rcut = float(rcut)
        self.sel = [int(s) for s in sel]
        self.nnei = sum(self.sel)
        self.sec = np.concatenate([[0], np.cumsum(self.sel)]).astype(int)
        self.pair_exclude = (
            None if pair_exclude is None or not np.any(pair_exclude) else np.asarray(pair_exclude, dtype=bool)
        )
        N = coords.shape[0]
        S = cells.shape[0]
        self.N, self.S = N, S
        self.atype = atype
        coords = coords.astype(xp.float64)
        pbc_h = pbc_axes(pbc, S)  # (S, 3) host; .all(): periodic in every direction
        self._last = (pbc_h.tobytes(), self.rcut, N, S, *device_key(xp))
        # (2,) device check of a call that reused this layout's grid and ghost room: the grid
        # flag of nbk.device_geometry and the ghost count (see settle); None: nothing guessed
        self.check = None
        kernel = ctx.fast(xp, "nbr") and N > 0
        grid, flag = self._reused_grid(cells) if reuse_grid and kernel and pbc_h.all() else (None, None)
        out = None
        kept = ctx.kept_grid(self._last)
        self.room = kept["room"] if grid is not None else None  # ghosts with room (None: count)
        if grid is not None:
            out = ctx.guarded(
                "nbr",
                nbk.build_ext,
                xp,
                coords,
                system,
                grid.table,
                grid.geo.nimg,
                int(grid.boff[-1]),
                None if self.room is None else N + self.room,
            )
            if out is None:  # the kernels cannot run: the array code needs the host grid
                grid = self.room = None
            else:  # ghost count -1: counted now, the arrays fit
                self.check = xp.stack([flag, xp.full((), -1, dtype=xp.int64) if self.room is None else out.ghosts])
        if grid is None:
            grid = self._host_grid(coords, system, cells, pbc_h)
            if kernel:
                if grid.table is None:  # the packed table, moved once per grid
                    grid.table = xp.asarray(nbk.pack_geometry(grid.geo, grid.lo, grid.bsize, grid.nb, grid.boff))
                out = ctx.guarded(
                    "nbr", nbk.build_ext, xp, coords, system, grid.table, grid.geo.nimg, int(grid.boff[-1])
                )
        if out is not None and self.room is None and pbc_h.all():  # room for the next call's ghosts
            kept["room"] = _room(int(out.owner.shape[0]) - N, None)
        self.geo = grid.geo  # _CellGeometry of the host grid this call's grid is (or was remade from)
        self.total_bins = int(grid.boff[-1])
        self._host = {"lo": grid.lo, "bsize": grid.bsize, "nb": grid.nb, "boff": grid.boff}
        self._dev = {}
        self.system = system
        self._geo = None  # packed geometry on the device (kernel path)
        if out is not None:
            wrapped, self.cbin, owner, epos, key, self._geo = (
                out.wrapped,
                out.cbin,
                out.owner,
                out.epos,
                out.key,
                out.geo,
            )
        else:
            wrapped, owner, epos = self._images(coords, system, pbc_h, grid.geo)
            esys = system[owner]
            ebin = self._bin3(epos, esys)
            key = self.boff[esys] + (ebin[:, 0] * self.nb[esys, 1] + ebin[:, 1]) * self.nb[esys, 2] + ebin[:, 2]
            self.cbin = ebin[:N]
        self.wrapped = wrapped
        self.epos, self.eowner = epos, owner
        self.n_ext = int(owner.shape[0])
        if self._geo is not None:  # kernel path: a counting sort (argsort syncs with the host)
            self.border, self.edges = nbk.bin_order(xp, key, self.total_bins)
        else:
            order = xp.argsort(key, kind="stable") if xp is np else xp.argsort(key)
            self.edges = xp.searchsorted(key[order], xp.arange(self.total_bins + 1, dtype=key.dtype), side="left")
            self.border = order
        self.use_kernel = ctx.kernels(xp)
        self._sorted = None
        self._kmax = None
        self._etype = None

    def _host_grid(self, coords, system, cells, pbc_h) -> BinGrid:
        """The grid of these cells made on the host: per-system geometry is tiny (S x 3 x 3), so it
        is done with NumPy and moved once (no launches or syncs per quantity); for periodic batches
        kept as the base of later calls' grids made on the device (:meth:`_reused_grid`; non-periodic
        boxes depend on the atoms)."""
        cells_h = np.asarray(to_numpy(cells), dtype=np.float64).reshape(-1, 3, 3)
        grid = self._grid_of(coords, system, cells_h, pbc_h)
        if pbc_h.all():
            self.ctx.kept_grid(self._last)["grid"] = grid
        return grid

    def _reused_grid(self, cells):
        """(grid, flag): the last host grid of this layout (pbc, atoms, systems) with its table
        remade on the device from ``cells`` (no host copy of the cells: under NPT they change
        every step), and the 0-d device flag of :func:`cuda.nbr.device_geometry`, checked
        once the call is issued (:meth:`settle`). (None, None) if this layout has no host grid yet."""
        last = self.ctx.grids.get(self._last, {}).get("grid")
        if last is None or last.table is None:
            return None, None
        out = self.ctx.guarded("nbr", nbk.device_geometry, self.xp, cells, last.table, self.rcut, last.geo.nimg)
        if out is None:
            return None, None
        return BinGrid(last.geo, None, None, last.nb, last.boff, out.table), out.flag

    def settle(self, check) -> bool:
        """After the call, with ``check`` (the host copy of :attr:`check`): keeps this layout's
        grid and ghost room for the next call, or drops them (next call: made on the host).
        False: this call's results are wrong (bins smaller than rcut, images beyond the grid's,
        or more ghosts than room) and it must be redone."""
        flag, ghosts = (int(v) for v in check)
        kept = self.ctx.kept_grid(self._last)
        if flag:  # cells moved far: a new grid on the host next call
            kept["grid"] = None
        fits = ghosts <= self.n_ext - self.N  # (-1: counted, so sized exactly)
        if ghosts >= 0:
            kept["room"] = _room(ghosts, self.room if fits else None)
        return flag != 2 and fits

    def _grid_of(self, coords, system, cells_h, pbc_h) -> BinGrid:
        """The grid of host cells (its packed device table made when needed)."""
        xp, N, S = self.xp, self.N, self.S
        geo = _CellGeometry(cells_h, pbc_h, self.rcut)
        lo, hi = geo.lo.copy(), geo.hi.copy()
        nonper = np.nonzero(~pbc_h.any(axis=1))[0]
        mixed = np.nonzero(pbc_h.any(axis=1) & ~pbc_h.all(axis=1))[0]
        ptr = None
        if len(nonper):  # non-periodic systems (never wrapped): the box of their atoms
            ptr = _system_ptr(xp, system, S)
            lo[nonper], hi[nonper] = _atom_boxes(xp, coords, system, ptr, nonper)
        if len(mixed):  # slabs, wires: the cell grown by the margin along the periodic directions,
            # the atoms' extent along the others (fractional = A there: unit cell rows)
            ptr = _system_ptr(xp, system, S) if ptr is None else ptr
            frac = (coords[:, :, None] * xp.asarray(geo.inv)[system]).sum(axis=1)
            flo, fhi = _atom_boxes(xp, frac, system, ptr, mixed)
            per, m, h = pbc_h[mixed], geo.margin[mixed], geo.h[mixed]
            flo, fhi = np.where(per, -m, flo), np.where(per, 1.0 + m, fhi)
            a, b = flo[:, :, None] * h, fhi[:, :, None] * h
            lo[mixed], hi[mixed] = np.minimum(a, b).sum(axis=1), np.maximum(a, b).sum(axis=1)
        nb, bsize = _bin_grid(lo, hi, self.rcut, None)
        if nb.prod(axis=1).sum() > 2.0 * N * max(geo.ext_factor.max(initial=1.0), 1.0) + 8.0 * S:
            # too many bins for the atoms somewhere (sparse systems): cap each system's grid
            ptr = _system_ptr(xp, system, S) if ptr is None else ptr
            nb, bsize = _bin_grid(lo, hi, self.rcut, geo.ext_factor * np.diff(ptr))
        boff = np.concatenate([[0], np.cumsum(nb.prod(axis=1))]).astype(np.int64)
        return BinGrid(geo, lo, bsize, nb, boff)

    def _images(self, coords, system, pbc_h, geo):
        """Array code: wrapped atoms (N, 3) and the ext arrays owner (E,), epos (E, 3), atoms first."""
        xp, N = self.xp, coords.shape[0]
        # wrap coordinates into the cell along its periodic directions (as DeePMD-kit's
        # normalize_coord); non-periodic directions keep theirs
        frac = (coords[:, :, None] * xp.asarray(geo.inv)[system]).sum(axis=1)
        pbc_atom = xp.asarray(pbc_h)[system]  # (N, 3)
        frac = xp.where(pbc_atom, frac - xp.floor(frac), frac)
        h = xp.asarray(geo.h)
        anyp = pbc_atom.any(axis=1)[:, None]
        wrapped = xp.where(anyp, (frac[:, :, None] * h[system]).sum(axis=1), coords)
        # ghost images: every shift (within nimg cells, zero along non-periodic directions) of every
        # atom that lands within rcut of the cell, i.e. whose fractional coordinates stay in
        # [-margin, 1 + margin) along the periodic directions
        own, pos = [xp.arange(N)], [wrapped]
        if geo.nimg > 0 and N:
            cart = xp.asarray(geo.shift_cart)  # (nshift, S, 3)
            shifts = xp.asarray(geo.shifts)
            mp = xp.where(pbc_atom, xp.asarray(geo.margin)[system], -1.0)  # -1: no range (not periodic)
            per = max(1, _MAX_GROUP // max(N, 1))
            for g in range(0, len(geo.shifts), per):
                sh = shifts[g : g + per, None, :]  # (k, 1, 3)
                f = frac[None, :, :] + sh  # (k, N, 3)
                keep = (((f >= -mp) & (f < 1.0 + mp)) | (~pbc_atom[None] & (sh == 0.0))).all(axis=2)
                ki, ai = xp.nonzero(keep)
                own.append(ai)
                pos.append(wrapped[ai] + cart[g + ki, system[ai]])
        return wrapped, xp.concatenate(own), xp.concatenate(pos)

    def _grid(self, name):
        """Bin grid array ``name`` (lo, bsize, nb, boff) on the device, moved when first needed
        (the kernel path reads them from its packed table instead)."""
        if name not in self._dev:
            self._dev[name] = self.xp.asarray(self._host[name])
        return self._dev[name]

    lo = property(lambda self: self._grid("lo"))
    bsize = property(lambda self: self._grid("bsize"))
    nb = property(lambda self: self._grid("nb"))
    boff = property(lambda self: self._grid("boff"))

    @functools.cached_property
    def bstart(self):
        """(total_bins,) first position of each bin in bin order."""
        return self.edges[:-1]

    @functools.cached_property
    def bcount(self):
        """(total_bins,) atoms (and ghosts) in each bin."""
        return self.edges[1:] - self.edges[:-1]

    @property
    def etype(self):
        """(E,) type of each ext atom (the array-code selection; the kernel path gathers types
        itself in :func:`cuda.nbr.sorted_ext`)."""
        if self._etype is None:
            self._etype = self.atype[self.eowner]
        return self._etype

    @property
    def kmax(self) -> int:
        """Most atoms in one bin (a host sync; only the array-code selection needs it)."""
        if self._kmax is None:
            self._kmax = int(to_numpy(self.bcount.max())) if self.total_bins else 0
        return self._kmax

    def sorted_ext(self):
        """Ext arrays in bin order (a bin is a contiguous range): pos (E, 3), owner, type, ext index."""
        if self._sorted is None and self._geo is not None:
            self._sorted = nbk.sorted_ext(self.xp, self.border, self.epos, self.eowner, self.atype)
        if self._sorted is None:
            xp, order = self.xp, self.border
            self._sorted = (
                xp.ascontiguousarray(self.epos[order]),
                xp.ascontiguousarray(self.eowner[order]).astype(xp.int64),
                xp.ascontiguousarray(self.etype[order]).astype(xp.int64),
                xp.ascontiguousarray(order).astype(xp.int64),
            )
        return self._sorted

    def _bin3(self, pos, sysi):
        xp = self.xp
        b = xp.floor((pos - self.lo[sysi]) / self.bsize[sysi]).astype(xp.int64)
        return xp.clip(b, 0, self.nb[sysi] - 1)

    def chunk(self, centers) -> NeighborChunk:
        """Select the neighbours of ``centers`` (n,) global atom indices."""
        xp = self.xp
        start, cnt = self.bin_ranges(centers)
        if self.use_kernel:
            ctx = self.ctx
            args = (xp, self.rcut, self.sel, self.sec, self.wrapped[centers], centers, start, cnt, *self.sorted_ext())
            consts = (
                ctx.device_const(xp, np.asarray(self.sel, dtype=np.int32)),
                ctx.device_const(xp, np.asarray(self.sec[:-1], dtype=np.int32)),
            )
            out = None
            if ctx.select_mode() == "warp":  # falls back to the thread kernel if it cannot run
                out = ctx.guarded("select_warp", _select_warp, args, consts)
            if out is None:
                out = selection.select_neighbors(*args, consts=consts)
            return self._finish(centers, *out)
        cand, d, r, ok = self.candidates(centers, start, cnt)
        return self._finish(centers, *select(xp, cand, d, r, ok, self.eowner, self.etype, self.sel))

    def bin_ranges(self, centers):
        """(start (n, 27), count (n, 27)): the bin-order ranges of the 27 bins around each centre."""
        xp = self.xp
        if self._geo is not None:  # kernel path of the build: one launch
            return nbk.bin_ranges(xp, centers, self.cbin, self.system, self._geo, self.edges)
        sysc = self.system[centers]
        cb = self.cbin[centers]  # (n, 3)
        nbc = self.nb[sysc]
        off = xp.asarray(np.stack(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1], indexing="ij"), -1).reshape(-1, 3))
        b3 = cb[:, None, :] + off[None]  # (n, 27, 3)
        inb = ((b3 >= 0) & (b3 < nbc[:, None, :])).all(axis=2)
        bid = self.boff[sysc][:, None] + (b3[..., 0] * nbc[:, None, 1] + b3[..., 1]) * nbc[:, None, 2] + b3[..., 2]
        bid = xp.where(inb, bid, 0)
        return self.bstart[bid], xp.where(inb, self.bcount[bid], 0)

    def candidates(self, centers, start, cnt):
        """Array code: the ext atoms of the 27 bins around each centre (``bin_ranges``): ext index
        ``cand`` (n, C), displacement ``d`` (n, C, 3) from the wrapped centre, distance ``r`` (n, C) and
        ``ok`` (n, C): within rcut and not the centre itself."""
        xp, n = self.xp, int(centers.shape[0])
        k = xp.arange(self.kmax)
        ok = k[None, None, :] < cnt[:, :, None]  # (n, 27, K)
        pos = xp.where(ok, start[:, :, None] + k[None, None, :], 0)
        cand = self.border[pos].reshape(n, -1)
        ok = ok.reshape(n, -1)
        d = take_rows(xp, self.epos, cand)
        d -= self.wrapped[centers][:, None, :]
        r = xp.sqrt(dot3(d, d))
        ok &= (r <= self.rcut) & (cand != centers[:, None])
        return cand, d, r, ok

    def _finish(self, centers, owner, dd, overflow, stats=None) -> NeighborChunk:
        """Model pair exclusions turn pairs into empty slots; zero displacements of empty slots."""
        xp = self.xp
        valid = owner >= 0
        if self.pair_exclude is not None:
            stats = None  # the kernels counted the excluded pairs: recount
            # rows: the centre's type; columns: each slot's pair with it
            table = self.ctx.device_const(xp, self.pair_exclude[:, np.repeat(np.arange(len(self.sel)), self.sel)])
            ex = table[self.atype[centers]]
            valid &= ~ex
            owner = xp.where(valid, owner, -1)
        if self.pair_exclude is not None or not self.use_kernel:  # kernels leave empty slots at 0
            dd = xp.where(valid[:, :, None], dd, 0.0)
        return NeighborChunk(centers=centers, owner=owner, d=dd, valid=valid, overflow=overflow, stats=stats)


def _select_warp(args, consts):
    return selection.select_neighbors_warp(*args, consts=consts)


def select(xp, cand, d, r, ok, owner_of, type_of, sel):
    """DeePMD-kit's selection (array code) from candidates ``cand`` (n, C) with displacements ``d``
    (n, C, 3), distances ``r`` (n, C) and ``ok`` (n, C) (within rcut): the nearest ``sum(sel)`` of
    any type in distance order, split by type, type t keeping its first ``sel[t]`` in block t.
    ``owner_of`` / ``type_of`` map a candidate to its atom and type (None: it is the atom). Returns
    owner (n, nnei) (-1: empty), d (n, nnei, 3) and overflow (n,) (a centre lost neighbours)."""
    n, nnei = ok.shape[0], sum(sel)
    sec = np.concatenate([[0], np.cumsum(sel)]).astype(int)
    nwithin = ok.sum(axis=1)
    r = xp.where(ok, r, xp.inf)
    ncand = r.shape[1]
    if ncand < nnei:  # pad so that every centre has nnei sorted entries
        r = xp.concatenate([r, xp.full((n, nnei - ncand), xp.inf)], axis=1)
        cand = xp.concatenate([cand, xp.zeros((n, nnei - ncand), dtype=cand.dtype)], axis=1)
        d = xp.concatenate([d, xp.zeros((n, nnei - ncand, 3))], axis=1)
    srt = xp.argsort(r, axis=1)[:, :nnei]
    srt += (xp.arange(n) * r.shape[1])[:, None]  # flat positions: 1-D gathers (take_rows)
    rs = xp.take(r.reshape(-1), srt)
    cs = xp.take(cand.reshape(-1), srt)
    ds = take_rows(xp, d.reshape(-1, 3), srt)
    vs = xp.isfinite(rs)
    ts = type_of[cs]
    overflow = nwithin > nnei
    slot = xp.full((n, nnei), nnei, dtype=xp.int64)  # nnei = the dump column
    for t, st in enumerate(sel):
        is_t = vs & (ts == t)
        rank = xp.cumsum(is_t, axis=1) - 1
        keep = is_t & (rank < st)
        overflow |= (is_t & (rank >= st)).any(axis=1)
        slot = xp.where(keep, int(sec[t]) + rank, slot)
    rows = xp.broadcast_to(xp.arange(n)[:, None], (n, nnei))
    owner = xp.full((n, nnei + 1), -1, dtype=xp.int64)
    dd = xp.zeros((n, nnei + 1, 3), dtype=xp.float64)
    owner[rows, slot] = xp.where(slot < nnei, cs if owner_of is None else owner_of[cs], -1)
    dd[rows, slot] = ds
    return owner[:, :nnei], dd[:, :nnei], overflow


class _CellGeometry:
    """Host-side (NumPy) geometry of S cells: inverse, image margins, shifts, corner boxes.

    cells (S, 3, 3) rows = lattice vectors (A); pbc (S, 3) or (S,) bool. ``h`` (S, 3, 3) is
    :func:`effective_cells` (non-periodic rows: orthonormal to the periodic ones; the identity
    without PBC); ``inv`` (S, 3, 3) its inverse (frac = r @ inv); ``pbc`` (S, 3);
    ``margin`` (S, 3) rcut over the face distances in fractional units (0 along non-periodic
    directions); ``nimg``
    images needed per direction; ``shifts`` (K, 3) the non-zero integer shifts within nimg and
    ``shift_cart`` (K, S, 3) their Cartesian vectors per system; ``det`` (S,) signed volumes (a
    periodic system with a singular cell is a UserError); ``lo``/``hi`` (S, 3) the box of
    the cell grown by the margin (what any atom or ghost of a periodic system lies in);
    ``ext_factor`` (S,) ghosts + atoms per atom, an estimate (volume ratio) used to size bins.
    """

    def __init__(self, cells, pbc, rcut):
        self.pbc = pbc = pbc_axes(pbc, len(cells))
        self.h = h = effective_cells(np, cells, pbc)
        # inverse by cofactors: column k of inv is (row k+1 x row k+2) / det (np.linalg.inv costs
        # ~0.1 ms for 256 cells, LAPACK per matrix; this is a few vector operations)
        u, v = h[:, [1, 2, 0]], h[:, [2, 0, 1]]  # (S, 3 rows, 3)
        cof = u[:, :, [1, 2, 0]] * v[:, :, [2, 0, 1]] - u[:, :, [2, 0, 1]] * v[:, :, [1, 2, 0]]
        self.det = (h[:, 0] * cof[:, 0]).sum(axis=1)  # (S,) signed volume
        # NaN cells too; the unit rows of non-periodic directions keep the periodic rows' volume
        bad = np.nonzero(~(np.abs(self.det) > 1e-8))[0]
        if len(bad):
            raise UserError(
                f"cells: periodic system {int(bad[0])} has a singular cell (volume {abs(self.det[bad[0]]):.3g}"
                f" spanned by its periodic directions {pbc[bad[0]].tolist()})"
            )
        self.inv = cof.transpose(0, 2, 1) / self.det[:, None, None]
        self.margin = np.where(pbc, rcut * np.sqrt((self.inv * self.inv).sum(axis=1)), 0.0)
        self.nimg = int(np.ceil(self.margin.max())) if len(cells) else 0
        self.shifts = _shifts(self.nimg)
        # the box of the cell grown by the margin: over the 8 corners of [-m, 1 + m]^3 in
        # fractional units, each Cartesian coordinate's extreme is a sum of per-row extremes
        a = -self.margin[:, :, None] * h
        b = (1.0 + self.margin[:, :, None]) * h
        self.lo, self.hi = np.minimum(a, b).sum(axis=1), np.maximum(a, b).sum(axis=1)
        self.ext_factor = np.prod(1.0 + 2.0 * self.margin, axis=1)

    @functools.cached_property
    def shift_cart(self):
        """(K, S, 3) Cartesian vectors of the shifts per system (the array code's ghost images)."""
        return np.matmul(self.shifts, self.h).transpose(1, 0, 2)


def pbc_axes(pbc, S: int | None = None) -> np.ndarray:
    """(S, 3) host bool: periodicity per system and direction, from ``pbc`` (S, 3), or (S,) meaning
    every direction or none (any namespace). ``S``: the number of systems, checked if given (a
    1-D array is always per system, so a (3,) array with S = 3 is three systems)."""
    p = np.asarray(to_numpy(pbc), dtype=bool)
    if p.ndim == 1:
        p = np.repeat(p[:, None], 3, axis=1)
    if p.ndim != 2 or p.shape[1] != 3 or (S is not None and p.shape[0] != S):
        raise UserError(f"pbc: shape {np.shape(pbc)}, expected ({S if S is not None else 'S'},) or (S, 3)")
    return p


def effective_cells(xp, cells, pbc):
    """(S, 3, 3) cells for the geometry of mixed periodicity: the periodic rows of ``cells`` (S, 3, 3)
    kept, each non-periodic row replaced by a unit vector orthogonal to the periodic rows (slab: the
    normal of its two periodic rows; wire: two unit vectors across its axis; no PBC: the identity),
    right-handed. The fractional coordinate along such a row is then a distance in A, no image is
    made along it, and the cell's own row there (zero, a vacuum, anything) plays no part.

    pbc (S, 3) bool (same namespace). Elementwise (``where``), no host synchronisation, so MD can
    use it on device cells. Degenerate periodic rows give a zero row (a singular cell)."""
    S = cells.shape[0]
    eye = xp.eye(3)
    c = [cells[:, k] for k in range(3)]
    p = [pbc[:, k][:, None] for k in range(3)]
    nper = pbc.astype(xp.int64).sum(axis=1)[:, None]

    def unit(v):
        n = xp.sqrt((v * v).sum(axis=1, keepdims=True))
        return v / xp.where(n > 0, n, 1.0)

    # wire along row j: u_j, a unit vector across it (from the Cartesian axis least along it),
    # and w_j = a_j x u_j, for rows j + 1 and j + 2 (cyclic: a right-handed cell)
    u, w = [], []
    for j in range(3):
        a = unit(c[j])
        e = eye[xp.argmin(xp.abs(a), axis=1)] if S else xp.zeros((0, 3))
        uj = unit(e - (e * a).sum(axis=1, keepdims=True) * a)
        u.append(uj)
        w.append(xp.cross(a, uj))
    rows = []
    for k in range(3):
        k1, k2 = (k + 1) % 3, (k + 2) % 3
        slab = unit(xp.cross(c[k1], c[k2]))  # k the one non-periodic row
        wire = xp.where(p[k2], u[k2], w[k1])  # the periodic row is k - 1 (= k + 2) or k + 1
        other = xp.where(nper == 2, slab, xp.where(nper == 1, wire, xp.broadcast_to(eye[k], (S, 3))))
        rows.append(xp.where(p[k], c[k], other))
    return xp.stack(rows, axis=1)


def _room(ghosts: int, room):
    """Ghost room for the next call after one with ``ghosts``: ``room`` again while it holds them
    with at most 4% to spare, else 2% + 64 more than now (atoms cross the cell faces)."""
    if room is not None and ghosts <= room <= 1.04 * ghosts + 128:
        return room
    return int(1.02 * ghosts) + 64


@functools.lru_cache(maxsize=8)
def _shifts(nimg: int) -> np.ndarray:
    """(K, 3) float64 non-zero integer shifts within +-nimg, meshgrid (ij) order."""
    rng = np.arange(-nimg, nimg + 1)
    s = np.stack(np.meshgrid(rng, rng, rng, indexing="ij"), -1).reshape(-1, 3)
    s = s[np.any(s != 0, axis=1)].astype(np.float64)
    s.flags.writeable = False
    return s


def _atom_boxes(xp, pos, system, ptr, which):
    """(len(which), 3) min and max of pos over the atoms of systems ``which`` (host arrays; an
    empty system gets a zero box). A few systems: one reduction each (no atomics, so one large
    system is fast); many: segment min/max with atomics (small systems, little contention)."""
    k = len(which)
    lo, hi = np.zeros((k, 3)), np.zeros((k, 3))
    if k <= 16:
        parts = []
        for s in which:
            seg = pos[int(ptr[s]) : int(ptr[s + 1])]
            parts.append(xp.stack([seg.min(axis=0), seg.max(axis=0)]) if seg.shape[0] else xp.full((2, 3), xp.nan))
        mm = to_numpy(xp.stack(parts))
        lo, hi = mm[:, 0], mm[:, 1]
    else:
        S = len(ptr) - 1
        l_all, h_all = (to_numpy(v) for v in segment_minmax(xp, system, pos, S))
        lo, hi = l_all[which], h_all[which]
    ok = np.isfinite(lo) & np.isfinite(hi)
    return np.where(ok, lo, 0.0), np.where(ok, hi, 0.0)


def _system_ptr(xp, system, S):
    """(S + 1,) host offsets of each system's atoms in the sorted ``system`` (a host sync)."""
    return to_numpy(xp.searchsorted(system, xp.arange(S + 1))) if S else np.zeros(1, dtype=int)


def _bin_grid(lo, hi, rcut, n_est):
    """Bins per direction (S, 3) int64 and bin size (S, 3) A: bins no smaller than rcut and, if
    ``n_est`` (S,) atoms are given, at most ~2 per atom so sparse systems stay linear in memory."""
    ext = np.maximum(hi - lo, 0.0)
    nb = np.maximum(np.floor(ext / rcut), 1.0)
    if n_est is not None:
        cap = 2.0 * n_est + 8.0
        scale = np.maximum((nb.prod(axis=1) / cap) ** (1.0 / 3.0), 1.0)
        nb = np.maximum(np.floor(nb / scale[:, None]), 1.0)
    bsize = np.where(ext > 0, ext / nb, 1.0)
    return nb.astype(np.int64), bsize
