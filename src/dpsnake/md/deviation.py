"""Model deviation on the flat batch, per walker, with the engine's definitions (LAMMPS plugin's).

Force: sigma_i = norm over xyz of the population std over models of F_i; max/min/mean over the
walker's atoms. Virial: std over models of V/natoms per component; max, min, sqrt(mean of squares).
Also the minimum interatomic distance per walker, for the too-close stop.
"""

from __future__ import annotations

from dpsnake.engine.model_devi import force_deviation, virial_deviation


def batch_deviation(xp, out: dict, system, natoms, nsys: int):
    """(S, 6) columns max/min/avg virial deviation (eV), max/min/avg force deviation (eV/A).

    out: ensemble output with force (M, N, 3) and virial (M, S, 9); system (N,); natoms (S,).
    """
    mv, nv, av = virial_deviation(out["virial"].reshape(-1, nsys, 9), natoms)
    mf, nf, af = force_deviation(out["force"], system, nsys)
    return xp.stack([mv, nv, av, mf, nf, af], axis=1)


def min_distances(xp, pos, cells, pbc, natoms_host, max_pairs: int = 4_000_000):
    """(S,) shortest interatomic distance per walker (minimum image; inf for one atom).

    pos (N, 3) flat; cells (S, 3, 3); pbc (S, 3) per direction or (S,); natoms_host (S,) NumPy
    ints. Exact while the distance is below half the cell's smallest width along its periodic
    directions, which is all a too-close check needs (slabs, wires: images along those only).
    Walkers are padded to a common size in groups of at most ``max_pairs`` pairs.
    """
    import numpy as np

    from dpsnake.engine.neighbor import effective_cells

    natoms_host = np.asarray(natoms_host)
    S = len(natoms_host)
    pbc = xp.asarray(pbc, dtype=bool)
    pbc3 = pbc if pbc.ndim == 2 else xp.broadcast_to(pbc.reshape(S, 1), (S, 3))
    starts = np.concatenate([[0], np.cumsum(natoms_host)])
    out = []
    s = 0
    while s < S:
        e, nmax = s + 1, int(natoms_host[s])
        while e < S and (e - s + 1) * max(nmax, int(natoms_host[e])) ** 2 <= max_pairs:
            nmax = max(nmax, int(natoms_host[e]))
            e += 1
        n = natoms_host[s:e]
        loc = np.arange(nmax)
        valid = loc[None, :] < n[:, None]
        idx = np.where(valid, starts[s:e, None] + loc[None, :], 0)
        r = pos[xp.asarray(idx)]  # (G, nmax, 3)
        d = r[:, None, :, :] - r[:, :, None, :]
        p3 = pbc3[s:e]
        c = effective_cells(xp, cells[s:e], p3)  # non-periodic rows: unit, orthogonal, never imaged
        frac = xp.einsum("gijk,gkl->gijl", d, xp.linalg.inv(c))
        d = d - xp.einsum("gijk,gkl->gijl", xp.where(p3[:, None, None, :], xp.rint(frac), 0.0), c)
        d2 = (d * d).sum(axis=3)
        bad = ~(valid[:, None, :] & valid[:, :, None]) | np.eye(nmax, dtype=bool)[None]
        d2 = xp.where(xp.asarray(bad), xp.inf, d2)
        out.append(xp.sqrt(d2.reshape(e - s, -1).min(axis=1)))
        s = e
    return xp.concatenate(out)
