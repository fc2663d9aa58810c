"""Neighbour search with cell lists (binning), batched over many systems, with DeePMD-kit v3 selection.

Layout: all atoms of all systems in one flat array (``system`` (N,) sorted ints). Periodic systems
get explicit ghost images out to rcut (any triclinic cell, cells shorter than 2 rcut included), then
all atoms and ghosts are binned on a per-system grid of bins no smaller than rcut; each centre looks
at its 27 surrounding bins. Cost and memory grow linearly with the number of atoms.

Selection (DeePMD-kit 3): the nearest ``nnei = sum(sel)`` atoms of any type within rcut (self
excluded), split by type in distance order, type t keeping the first ``sel[t]`` of its kind in block
``sec[t]:sec[t+1]``; what does not fit is dropped (counted in ``NeighborList.overflow``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpsnake.engine.xp import segment_minmax, to_numpy

_MAX_GROUP = 4_000_000  # atoms x shifts handled at once when making ghost images


@dataclass
class NeighborChunk:
    """Neighbour data of a chunk of centre atoms.

    ``centers`` (n,) global atom indices; ``owner`` (n, nnei) global index of the neighbour's atom
    (-1 for empty slots); ``d`` (n, nnei, 3) float64 displacement r_neighbour - r_centre (A), zero in
    empty slots; ``valid`` (n, nnei) bool; ``overflow`` (n,) bool: this centre lost neighbours.
    """

    centers: object
    owner: object
    d: object
    valid: object
    overflow: object


class NeighborBuilder:
    """Ghost images + bins for a batch of systems; :meth:`chunk` selects neighbours of some centres.

    coords (N, 3) A; atype (N,) int; system (N,) sorted ints 0..S-1; cells (S, 3, 3) rows are lattice
    vectors; pbc (S,) bool. ``pair_exclude`` (ntypes, ntypes) bool: pairs turned into empty slots.
    """

    def __init__(self, xp, coords, atype, system, cells, pbc, rcut, sel, pair_exclude=None):
        self.xp = xp
        self.rcut = float(rcut)
        self.sel = [int(s) for s in sel]
        self.nnei = sum(self.sel)
        self.sec = np.concatenate([[0], np.cumsum(self.sel)]).astype(int)
        self.pair_exclude = None if pair_exclude is None or not np.any(pair_exclude) else \
            xp.asarray(np.asarray(pair_exclude, dtype=bool))
        N = coords.shape[0]
        S = cells.shape[0]
        self.N, self.S = N, S
        self.atype = atype
        coords = coords.astype(xp.float64)
        cells = cells.astype(xp.float64)
        pbc = xp.asarray(pbc, dtype=bool)
        pbc_atom = pbc[system]
        # wrap periodic coordinates into the cell (as DeePMD-kit's normalize_coord)
        eye = xp.eye(3, dtype=xp.float64)
        hsafe = xp.where(pbc[:, None, None], cells, eye)
        inv = xp.linalg.inv(hsafe)
        frac = xp.einsum("ni,nij->nj", coords, inv[system])
        frac = xp.where(pbc_atom[:, None], frac - xp.floor(frac), frac)
        wrapped = xp.where(pbc_atom[:, None], xp.einsum("ni,nij->nj", frac, hsafe[system]), coords)
        # images needed per direction: rcut / face distance (|column k of inv(h)| = 1 / face dist)
        margin = self.rcut * xp.sqrt((inv * inv).sum(axis=1))  # (S, 3) in fractional units
        margin = xp.where(pbc[:, None], margin, 0.0)
        nimg = int(np.ceil(float(to_numpy(margin.max())))) if S else 0
        own, shf = [xp.arange(N)], [xp.zeros((N, 3), dtype=xp.float64)]
        if nimg > 0:
            rng = np.arange(-nimg, nimg + 1)
            shifts = np.stack(np.meshgrid(rng, rng, rng, indexing="ij"), -1).reshape(-1, 3)
            shifts = shifts[np.any(shifts != 0, axis=1)].astype(np.float64)
            per = max(1, _MAX_GROUP // max(N, 1))
            idxp = xp.nonzero(pbc_atom)[0]
            fp, mp = frac[idxp], margin[system[idxp]]
            for g in range(0, len(shifts), per):
                sh = xp.asarray(shifts[g:g + per])  # (k, 3)
                f = fp[None, :, :] + sh[:, None, :]  # (k, n, 3)
                keep = ((f >= -mp) & (f < 1.0 + mp)).all(axis=2)
                ki, ai = xp.nonzero(keep)
                own.append(idxp[ai])
                shf.append(sh[ki])
        owner = xp.concatenate(own)
        shift = xp.concatenate(shf)
        esys = system[owner]
        epos = wrapped[owner] + xp.einsum("ni,nij->nj", shift, hsafe[esys])
        self.wrapped = wrapped
        self.epos, self.eowner, self.etype = epos, owner, atype[owner]
        self.n_ext = int(owner.shape[0])
        # per-system grid of bins no smaller than rcut
        lo, hi = segment_minmax(xp, esys, epos, S)
        lo = xp.where(xp.isfinite(lo), lo, 0.0)
        ext = xp.maximum(xp.where(xp.isfinite(hi), hi, 0.0) - lo, 0.0)
        nb = xp.maximum(xp.floor(ext / self.rcut), 1.0)
        # cap the number of bins (sparse non-periodic systems) at ~2 per atom
        nsys_atoms = xp.bincount(esys, minlength=S).astype(xp.float64)
        cap = 2.0 * nsys_atoms + 8.0
        scale = xp.maximum((nb.prod(axis=1) / cap) ** (1.0 / 3.0), 1.0)
        nb = xp.maximum(xp.floor(nb / scale[:, None]), 1.0)
        bsize = xp.where(ext > 0, ext / nb, 1.0)
        nb = nb.astype(xp.int64)
        nbins = nb.prod(axis=1)
        boff = xp.concatenate([xp.zeros(1, dtype=xp.int64), xp.cumsum(nbins)])
        self.total_bins = int(to_numpy(boff[-1]))
        self.lo, self.bsize, self.nb, self.boff = lo, bsize, nb, boff
        ebin = self._bin3(epos, esys)
        key = boff[esys] + (ebin[:, 0] * nb[esys, 1] + ebin[:, 1]) * nb[esys, 2] + ebin[:, 2]
        order = xp.argsort(key)
        skey = key[order]
        allb = xp.arange(self.total_bins, dtype=skey.dtype)
        self.bstart = xp.searchsorted(skey, allb, side="left")
        self.bcount = xp.searchsorted(skey, allb, side="right") - self.bstart
        self.kmax = int(to_numpy(self.bcount.max())) if self.total_bins else 0
        self.border = order
        self.system = system
        self.cbin = ebin[:N]
        from dpsnake.engine import kernels

        self.use_kernel = kernels.enabled(xp)
        self._sorted = None

    def sorted_ext(self):
        """Ext arrays in bin order (a bin is a contiguous range): pos (E, 3), owner, type, ext index."""
        if self._sorted is None:
            xp, order = self.xp, self.border
            self._sorted = (xp.ascontiguousarray(self.epos[order]),
                            xp.ascontiguousarray(self.eowner[order]).astype(xp.int64),
                            xp.ascontiguousarray(self.etype[order]).astype(xp.int64),
                            xp.ascontiguousarray(order).astype(xp.int64))
        return self._sorted

    def _bin3(self, pos, sysi):
        xp = self.xp
        b = xp.floor((pos - self.lo[sysi]) / self.bsize[sysi]).astype(xp.int64)
        return xp.clip(b, 0, self.nb[sysi] - 1)

    def chunk(self, centers) -> NeighborChunk:
        """Select the neighbours of ``centers`` (n,) global atom indices."""
        xp = self.xp
        n = int(centers.shape[0])
        nnei = self.nnei
        sysc = self.system[centers]
        cb = self.cbin[centers]  # (n, 3)
        nbc = self.nb[sysc]
        off = xp.asarray(np.stack(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1], indexing="ij"),
                                  -1).reshape(-1, 3))
        b3 = cb[:, None, :] + off[None]  # (n, 27, 3)
        inb = ((b3 >= 0) & (b3 < nbc[:, None, :])).all(axis=2)
        bid = self.boff[sysc][:, None] + (b3[..., 0] * nbc[:, None, 1] + b3[..., 1]) * nbc[:, None, 2] \
            + b3[..., 2]
        bid = xp.where(inb, bid, 0)
        start = self.bstart[bid]
        cnt = xp.where(inb, self.bcount[bid], 0)
        if self.use_kernel:
            from dpsnake.engine import elementwise, kernels

            args = (xp, self.rcut, self.sel, self.sec, self.wrapped[centers], centers, start, cnt,
                    *self.sorted_ext())
            out = None
            if kernels.select_mode() == "warp":  # experimental; falls back if it cannot run
                out = elementwise.guarded("select_warp", kernels.select_neighbors_warp, *args)
            if out is None:
                out = kernels.select_neighbors(*args)
            return self._finish(centers, *out)
        k = xp.arange(self.kmax)
        ok = k[None, None, :] < cnt[:, :, None]  # (n, 27, K)
        pos = xp.where(ok, start[:, :, None] + k[None, None, :], 0)
        cand = self.border[pos].reshape(n, -1)
        ok = ok.reshape(n, -1)
        d = self.epos[cand] - self.wrapped[centers][:, None, :]
        r = xp.sqrt((d * d).sum(axis=2))
        ok &= (r <= self.rcut) & (cand != centers[:, None])
        nwithin = ok.sum(axis=1)
        r = xp.where(ok, r, xp.inf)
        ncand = r.shape[1]
        if ncand < nnei:  # pad so that every centre has nnei sorted entries
            r = xp.concatenate([r, xp.full((n, nnei - ncand), xp.inf)], axis=1)
            cand = xp.concatenate([cand, xp.zeros((n, nnei - ncand), dtype=cand.dtype)], axis=1)
            d = xp.concatenate([d, xp.zeros((n, nnei - ncand, 3))], axis=1)
        srt = xp.argsort(r, axis=1)[:, :nnei]
        rs = xp.take_along_axis(r, srt, axis=1)
        cs = xp.take_along_axis(cand, srt, axis=1)
        ds = xp.take_along_axis(d, srt[:, :, None], axis=1)
        vs = xp.isfinite(rs)
        ts = self.etype[cs]
        overflow = nwithin > nnei
        slot = xp.full((n, nnei), nnei, dtype=xp.int64)  # nnei = the dump column
        for t, st in enumerate(self.sel):
            is_t = vs & (ts == t)
            rank = xp.cumsum(is_t, axis=1) - 1
            keep = is_t & (rank < st)
            overflow |= (is_t & (rank >= st)).any(axis=1)
            slot = xp.where(keep, int(self.sec[t]) + rank, slot)
        rows = xp.broadcast_to(xp.arange(n)[:, None], (n, nnei))
        owner = xp.full((n, nnei + 1), -1, dtype=xp.int64)
        dd = xp.zeros((n, nnei + 1, 3), dtype=xp.float64)
        owner[rows, slot] = xp.where(slot < nnei, self.eowner[cs], -1)
        dd[rows, slot] = ds
        owner, dd = owner[:, :nnei], dd[:, :nnei]
        return self._finish(centers, owner, dd, overflow)

    def _finish(self, centers, owner, dd, overflow) -> NeighborChunk:
        """Model pair exclusions turn pairs into empty slots; zero displacements of empty slots."""
        xp = self.xp
        valid = owner >= 0
        if self.pair_exclude is not None:
            tslot = xp.asarray(np.repeat(np.arange(len(self.sel)), self.sel))
            ex = self.pair_exclude[self.atype[centers][:, None], tslot[None, :]]
            valid &= ~ex
            owner = xp.where(valid, owner, -1)
        dd = xp.where(valid[:, :, None], dd, 0.0)
        return NeighborChunk(centers=centers, owner=owner, d=dd, valid=valid, overflow=overflow)
