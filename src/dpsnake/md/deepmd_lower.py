"""Ghost atoms and a Verlet neighbour list for DeePMD-kit's ``forward_lower``, kept between MD steps.

DeePMD-kit's ``model.forward(coord, atype, box)`` builds its periodic images and a neighbour list on
every call: for G frames of n atoms, the distances of every atom to all (2c+1)^3 n images and a
``topk`` over them. :class:`VerletGhosts` builds the same images and a list of the neighbours
within ``rcut + skin`` once, and reuses both while no pair can have come within ``rcut`` unseen (the
Verlet-list rule LAMMPS uses with ``neighbor SKIN``): the model's ``forward_lower(extended_coord,
extended_atype, nlist, mapping)`` then gets ghosts at the current positions and the kept list, and
DeePMD-kit's own ``format_nlist`` drops the pairs beyond each model's rcut, sorts by distance where
the descriptor needs it (DPA-2/3: ``need_sorted_nlist_for_lower``) and keeps the nearest ``sel``:
the same neighbours as its ``forward`` (the order of unsorted lists may differ: rounding only).

Layout, as DeePMD-kit's ``extend_coord_with_ghosts``: extended atom ``j`` of a frame is local atom
``owner[j]`` shifted by the integer cell vector ``t[j]``: ``x_ext[j] = x[owner[j]] + t[j] @ H``
(H (3, 3), rows = cell vectors, A); the first n are the local atoms themselves wrapped into the
cell at build time (t = -floor(fractional coordinates)), the rest their images by every shift in
[-c, c]^3 along periodic directions (c = ceil((rcut + skin) / plane spacing)). A lattice shift
changes no energy, force or virial of a periodic system.

Rebuild rule (per call, per frame; sufficient): the one of :mod:`dpsnake.engine.verlet`
(:func:`~dpsnake.engine.verlet.skin_holds`), in fractional coordinates f = x H^-1: a pair of local atom
i and extended atom j has displacement (f[owner j] + t[j] - f[i] - t[i]) @ H, integers fixed at the
build, so the list is kept while the atoms' motion beyond the cell's own strain (an NPT barostat's
scaling of positions is no motion here) plus the strain over a pair's span stays below the skin.
Without periodic directions: while twice the largest motion stays below it.
"""

from __future__ import annotations

import math

from dpsnake.engine.verlet import skin_holds


class VerletGhosts:
    """Images + neighbour list of one group of G frames of n atoms (see the module docstring).

    rcut: the largest cutoff of the models (A); skin (A); pbc: periodic directions (3 bools).
    ``update(coord (G, n, 3), h (G, 3, 3) | None)`` (float64, A) returns ``(ext_coord (G, nall, 3),
    mapping (G, nall) long, nlist (G, n, K) long, -1 padded)``; ``h`` holds the cell vectors as rows
    (non-periodic rows: any vectors that keep it invertible; None when no direction is periodic).
    ``builds`` counts the lists built."""

    def __init__(self, torch, rcut: float, skin: float, pbc: tuple):
        self.torch, self.rcut, self.skin = torch, float(rcut), float(skin)
        self.pbc = tuple(bool(p) for p in pbc)
        self.builds = 0
        self._ref = None  # (coord, h) at the last build

    # ------------------------------------------------------------------ build
    def _shifts(self, h):
        """Integer shifts (ns, 3) float64, 0 first then by length (DeePMD-kit's order), and c."""
        torch = self.torch
        c = [0, 0, 0]
        if h is not None:
            vol = torch.linalg.det(h).abs()  # (G,)
            for k in range(3):
                if self.pbc[k]:
                    a, b = h[:, (k + 1) % 3], h[:, (k + 2) % 3]
                    spacing = vol / torch.linalg.cross(a, b).norm(dim=1)  # distance between the k planes
                    c[k] = int(math.ceil(float(((self.rcut + self.skin) / spacing).max())))
        r = [torch.arange(-ck, ck + 1, dtype=torch.float64) for ck in c]
        s = torch.cartesian_prod(*r).reshape(-1, 3)
        s = s[torch.argsort(s.norm(dim=1), stable=True)]
        return s, max(c)

    def _build(self, coord, h):
        torch = self.torch
        G, n, _ = coord.shape
        dev = coord.device
        if h is None:
            t = torch.zeros((G, n, 3), dtype=coord.dtype, device=dev)
            owner = torch.arange(n, device=dev).expand(G, n)
            self._c = 0
        else:
            frac = torch.bmm(coord, torch.linalg.inv(h))  # (G, n, 3), as stale() computes it
            w = torch.floor(frac)
            w[..., [not p for p in self.pbc]] = 0.0  # no wrapping along vacuum directions
            s, self._c = self._shifts(h)
            s = s.to(dev)
            ns = s.shape[0]
            t = (s[None, :, None, :] - w[:, None, :, :]).reshape(G, ns * n, 3)  # (G, nall, 3)
            owner = torch.arange(n, device=dev).repeat(ns).expand(G, ns * n)
        self.t, self.mapping = t, owner.contiguous()
        ext = self._extended(coord, h)
        # distances of every local atom to every extended atom: what DeePMD-kit computes on each call
        d = torch.cdist(coord if h is None else ext[:, :n], ext)  # (G, n, nall)
        d.diagonal(dim1=1, dim2=2).fill_(float("inf"))  # not its own neighbour
        within = d < self.rcut + self.skin
        K = max(1, int(within.sum(dim=2).max()))
        dk, idx = torch.topk(d, K, dim=2, largest=False)  # nearest first
        self.nlist = torch.where(dk < self.rcut + self.skin, idx, -1)
        # positions at the build: Cartesian without periodic directions, else fractional
        self._ref = (coord.clone(), None) if h is None else (frac, h.clone())
        self.builds += 1

    def _extended(self, coord, h):
        torch = self.torch
        x = torch.gather(coord, 1, self.mapping[..., None].expand(-1, -1, 3))
        return x if h is None else x + torch.bmm(self.t, h)

    # ------------------------------------------------------------------ per call
    def stale(self, coord, h) -> bool:
        """True when some pair may have come within rcut since the build (the module's rule)."""
        torch = self.torch
        if self._ref is None or self._ref[0].shape != coord.shape or (h is None) != (self._ref[1] is None):
            return True
        x0, h0 = self._ref
        if h is None:
            return not bool((2.0 * (coord - x0).norm(dim=2).amax(dim=1) < self.skin).all())  # NaN: rebuild
        inv, info = torch.linalg.inv_ex(h)
        if bool(info.any()):  # a singular cell: the build says so
            return True
        df = torch.bmm(coord, inv) - x0  # fractional motion (G, n, 3)
        move = torch.bmm(df, h).norm(dim=2).amax(dim=1)  # beyond the cell's own strain, A
        dh = (h - h0).flatten(1).norm(dim=1)
        return not skin_holds(move, df.abs().amax(dim=1), inv, dh, self.rcut, self.skin)

    def update(self, coord, h):
        if self.stale(coord, h):
            self._build(coord, h)
        return self._extended(coord, h), self.mapping, self.nlist


def scatter_to_local(torch, ext_force, mapping, n: int):
    """Forces (G, n, 3) of local atoms: extended forces (G, nall, 3) summed onto their owners
    (DeePMD-kit's ``communicate_extended_output``)."""
    out = torch.zeros((ext_force.shape[0], n, 3), dtype=ext_force.dtype, device=ext_force.device)
    return out.scatter_add_(1, mapping[..., None].expand(-1, -1, 3), ext_force)
