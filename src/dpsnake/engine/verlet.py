"""Neighbour candidates kept between the calls of an MD run on NumPy: a Verlet list with a skin.

The array-code neighbour search (:class:`~dpsnake.engine.neighbor.NeighborBuilder`) makes ghost images
and bins and looks at every atom of the 27 bins around each centre on every call: ~6 of the ~13 ms of a
force call of the CPU demo's 256 atoms. With ``EngineSettings.skin`` > 0 an ensemble keeps, per
layout, every pair within ``rcut + skin`` (LAMMPS's ``neighbor SKIN``) as (centre, atom, integer
lattice translation T): the pair's displacement now is ``x[atom] - x[centre] + T @ h`` with the
current positions and (effective) cells, so a call only measures its ~1.6x more candidates than
neighbours and runs the same selection (:func:`~dpsnake.engine.neighbor.select`). The same neighbours
as a fresh search; displacements equal to rounding (the fresh search subtracts wrapped positions).

Rebuild rule (per call, per system; sufficient): with f the fractional coordinates (x = f h), a pair's
displacement is d = F h with F = f_atom - f_centre + T. Between the build (h0) and now (h),
d - d0 = dF h + F0 (h - h0); for a pair within rcut now |F_k| <= rcut |column k of h^-1|, and F0 differs
by dF, at most 2 max |df_k|. So every such pair was within rcut + skin at the build (a candidate) while
``2 max_i |df_i h| + |F0 bound| |h - h0|_F < skin``: atoms' motion beyond the cell's own strain (an NPT
barostat's scaling of positions is no motion here), plus the strain over the pair's span. Other atoms,
types, systems or periodicity: a new build.
"""

from __future__ import annotations

import numpy as np

from dpsnake.engine.neighbor import NeighborBuilder, NeighborChunk, effective_cells, select
from dpsnake.engine.xp import dot3, take_rows

_BUILD_CENTRES = 4096  # centres per candidate gather while building (bounded memory)


def skin_holds(move, dfmax, inv, dh, rcut: float, skin: float) -> bool:
    """The module's rule for S systems, on NumPy or torch arrays: True while every pair within ``rcut``
    now was within ``rcut + skin`` at the build (the kept list still holds all neighbours).

    move (S,): max over atoms of |df h| (A, motion beyond the cell's strain); dfmax (S, 3): max |df_k|;
    inv (S, 3, 3): h^-1 now; dh (S,): |h - h0|_F (A). NaN anywhere gives False (rebuild)."""
    # a pair within rcut now spans at most rcut |column k of inv| + 2 max |df_k| cells along k
    span = rcut * ((inv * inv).sum(axis=1)) ** 0.5 + 2.0 * dfmax
    # written as "all below" so that NaN positions or cells fail it (as a full search would run)
    return bool((2.0 * move + ((span * span).sum(axis=1)) ** 0.5 * dh < skin).all())


class KeptNeighbors:
    """The kept candidates of one ensemble (NumPy only); :meth:`builder` replaces a NeighborBuilder.

    ``builds`` counts the lists built, ``calls`` the calls served."""

    def __init__(self, skin: float):
        self.skin = float(skin)
        self.builds = self.calls = 0
        self._key = None

    def builder(self, coords, atype, system, cells, pbc_h, rcut, sel, pair_exclude, ctx):
        """An object with NeighborBuilder's ``chunk(centers)`` for this call (a new list when stale)."""
        h = np.asarray(cells, dtype=np.float64) if pbc_h.all() else effective_cells(np, cells, pbc_h)
        key = (pbc_h.tobytes(), float(rcut), tuple(int(s) for s in sel), coords.shape[0], cells.shape[0])
        if self._stale(key, coords, atype, system, h):
            self._build(key, coords, atype, system, cells, pbc_h, h, rcut, sel, pair_exclude, ctx)
        self.calls += 1
        return _KeptView(self, coords, h, system, rcut)

    def _stale(self, key, coords, atype, system, h) -> bool:
        """The module's rule: True when a pair now within rcut may have been beyond rcut + skin at the build."""
        if key != self._key or not (np.array_equal(atype, self.atype) and np.array_equal(system, self.system)):
            return True
        try:
            inv = np.linalg.inv(h)
        except np.linalg.LinAlgError:  # a singular cell: the build says which, in one line
            return True
        df = np.matmul(coords[:, None, :], inv[system])[:, 0] - self.f0  # fractional motion (N, 3)
        S = h.shape[0]
        move, dfmax = np.zeros(S), np.zeros((S, 3))
        dx = np.matmul(df[:, None, :], h[system])[:, 0]  # the motion beyond the cell's own strain, A
        np.maximum.at(move, system, np.sqrt(dot3(dx, dx)))
        np.maximum.at(dfmax, system, np.abs(df))
        dh = np.sqrt(((h - self.h0) ** 2).sum(axis=(1, 2)))
        return not skin_holds(move, dfmax, inv, dh, self.rcut, self.skin)

    def _build(self, key, coords, atype, system, cells, pbc_h, h, rcut, sel, pair_exclude, ctx):
        nb = NeighborBuilder(np, coords, atype, system, cells, pbc_h, rcut + self.skin, sel, pair_exclude, ctx=ctx)
        N, inv = coords.shape[0], nb.geo.inv
        parts = []
        for a in range(0, N, _BUILD_CENTRES):
            centers = np.arange(a, min(N, a + _BUILD_CENTRES))
            cand, d, _, ok = nb.candidates(centers, *nb.bin_ranges(centers))
            # the candidates within rcut + skin first, then cut to the most any centre has
            first = np.argsort(~ok, axis=1, kind="stable")[:, : max(1, int(ok.sum(axis=1).max(initial=0)))]
            ok = np.take_along_axis(ok, first, 1)
            cand = np.take_along_axis(cand, first, 1)
            d = np.take_along_axis(d, first[:, :, None], 1)
            atom = np.where(ok, nb.eowner[cand], centers[:, None])
            # d = x[atom] - x[centre] + T h: T, integers, from the build's displacement
            frac = np.matmul(d - (coords[atom] - coords[centers][:, None, :]), inv[system[centers]])
            parts.append((atom, np.where(ok[..., None], np.rint(frac), 0.0), ok))
        C = max(p[0].shape[1] for p in parts)
        # ~1 KB per atom for ~100 candidates: int32 atoms, int16 translations (|T| is a few cells)
        self.atom = np.zeros((N, C), dtype=np.int32)
        self.T, self.ok = np.zeros((N, C, 3), dtype=np.int16), np.zeros((N, C), dtype=bool)
        for (atom, T, ok), a in zip(parts, range(0, N, _BUILD_CENTRES)):
            b, c = a + atom.shape[0], atom.shape[1]
            self.atom[a:b, :c], self.T[a:b, :c], self.ok[a:b, :c] = atom, T, ok
            self.atom[a:b, c:] = np.arange(a, b)[:, None]  # padding points at the centre (never ok)
        self.f0 = np.matmul(coords[:, None, :], np.linalg.inv(h)[system])[:, 0]  # fractional positions
        self.h0, self.rcut, self._key = h.copy(), float(rcut), key
        self.atype, self.system = atype.copy(), system.copy()
        self.nb, self.sel = nb, [int(s) for s in sel]
        self.builds += 1


class _KeptView:
    """One call's neighbour selection from the kept candidates (NeighborBuilder's ``chunk``)."""

    def __init__(self, kept: KeptNeighbors, coords, h, system, rcut):
        self.kept, self.coords, self.h, self.system, self.rcut = kept, coords, h, system, float(rcut)
        self.check = None  # nothing guessed: no device check (NeighborBuilder's contract)

    def chunk(self, centers) -> NeighborChunk:
        k = self.kept
        atom, ok = k.atom[centers], k.ok[centers]
        d = take_rows(np, self.coords, atom)
        d -= self.coords[centers][:, None, :]
        d += np.matmul(k.T[centers].astype(np.float64), self.h[self.system[centers]])
        r = np.sqrt(dot3(d, d))
        ok = ok & (r <= self.rcut)
        return k.nb._finish(centers, *select(np, atom, d, r, ok, None, k.nb.atype, k.sel))
