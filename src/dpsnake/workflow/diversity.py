"""Selection beyond random / highest deviation: per-frame features, farthest-point picking,
deduplication and per-condition quotas (``select.pick: diverse``, ``select.dedup_tol``,
``select.quota``). Pure functions on arrays, plus the feature makers.

Features of a frame (:func:`frame_features`): per atom type, the mean over the atoms of that type of
the se_e2_a descriptor D (M1 x axis_neuron values) of the ensemble's model 0, computed by the
built-in engine (NumPy or CuPy, one code path); models the engine cannot read fall back to
:func:`fingerprints`, a smeared radial distribution histogram per type pair within rcut.

Distances (:func:`scaled`): Euclidean in feature space divided by the median distance between two
frames of the pool (the system's candidates and, for ``diverse``, its training frames), so they are
unit-free: 1 is a typical distance between two frames, and a few outliers do not change it.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["allocate", "greedy_pick", "scaled", "frame_features", "descriptor_features", "fingerprints"]

# picks that need per-frame features (and keep away from the training frames)
FEATURE_PICKS = ("diverse", "kmeanspp")


def allocate(avail, nmax: int) -> np.ndarray:
    """Split ``nmax`` labels evenly over groups with ``avail`` (G,) candidates each: round robin, a
    group never gets more than it has (its share goes to the others), the remainder to the groups
    with the most candidates (ties: the first group). Returns (G,) ints, sum = min(nmax, sum avail)."""
    avail = np.asarray(avail, dtype=int)
    out = np.zeros(len(avail), dtype=int)
    left = int(min(nmax, avail.sum()))
    order = np.argsort(-avail, kind="stable")
    while left > 0:
        for g in order:
            if left and out[g] < avail[g]:
                out[g] += 1
                left -= 1
    return out


def proportional(weights, avail, total: int) -> np.ndarray:
    """Split ``total`` labels over groups in proportion to ``weights`` (G,), a group never getting more
    than its ``avail`` (G,) (its excess goes to the others, in proportion again), then rounded by the
    largest remainders (ties: the first group). Groups of weight 0 get labels only when the weighted
    groups are full (then evenly, :func:`allocate`). Returns (G,) ints, sum = min(total, sum avail)."""
    w = np.asarray(weights, dtype=float)
    avail = np.asarray(avail, dtype=int)
    left = int(min(total, avail.sum()))
    x = np.zeros(len(avail))
    act = (avail > 0) & (w > 0)
    share = float(min(left, avail[act].sum()))
    while act.any():  # water-filling: groups whose proportional share exceeds their room are capped
        lam = share / w[act].sum()
        full = act & (lam * w >= avail)
        if not full.any():
            x[act] = lam * w[act]
            break
        x[full] = avail[full]
        share -= float(avail[full].sum())
        act &= ~full
    out = np.minimum(np.floor(x + 1e-9).astype(int), avail)
    rem = int(round(x.sum())) - int(out.sum())
    if rem > 0:
        frac = np.where(out < avail, x - out, -1.0)
        out[np.argsort(-frac, kind="stable")[:rem]] += 1
    if out.sum() < left:  # weighted groups are full: the rest evenly over the others
        out += allocate(avail - out, left - int(out.sum()))
    return out


def scaled(features, sample: int = 1000) -> np.ndarray:
    """Features divided by the median distance between two frames of the pool (at most ``sample``
    frames, evenly spread, measured): robust to a few outliers; a pool whose median is 0 (mostly
    copies) uses the RMS spread instead; a constant pool is left as it is."""
    f = np.asarray(features, dtype=np.float64)
    if len(f) < 2:
        return f
    x = f[np.unique(np.linspace(0, len(f) - 1, min(sample, len(f))).round().astype(int))]
    d = np.sqrt(np.maximum((x**2).sum(1)[:, None] + (x**2).sum(1)[None, :] - 2.0 * x @ x.T, 0.0))
    s = float(np.median(d[np.triu_indices(len(x), 1)]))
    if not s > 0:
        s = float(np.sqrt(((f - f.mean(axis=0)) ** 2).sum(axis=1).mean()))
    return f / s if s > 0 else f


def _dist(f, x) -> np.ndarray:
    """Distances of rows of ``f`` (n, k) to one point ``x`` (k,)."""
    return np.sqrt(((f - x) ** 2).sum(axis=1))


def _min_dist(f, known, block: int = 1024) -> np.ndarray:
    """Per row of ``f`` the distance to the nearest row of ``known`` (inf if none), in blocks."""
    out = np.full(len(f), np.inf)
    if known is None or not len(known):
        return out
    known = np.asarray(known, dtype=np.float64)
    kk = (known**2).sum(axis=1)
    for a in range(0, len(f), block):
        x = f[a : a + block]
        d2 = (x**2).sum(axis=1)[:, None] + kk[None, :] - 2.0 * x @ known.T
        out[a : a + block] = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
    return out


def greedy_pick(
    devi,
    nmax: int,
    mode: str,
    rng=None,
    features=None,
    known=None,
    dedup_tol=None,
    groups=None,
    fill=None,
    random_fraction: float = 0.0,
    group_weights=None,
) -> tuple[np.ndarray, int]:
    """Pick up to ``nmax`` of n candidates; returns (positions 0..n-1 in pick order, near duplicates).

    mode ``highest``: highest deviation first; ``random``: a random order (``rng``); ``diverse``:
    farthest-point sampling in ``features`` (n, k): the highest-deviation candidate first, then each
    time the candidate farthest from everything picked and from ``known`` (m, k), the training frames
    (ties: the first candidate); ``kmeanspp``: k-means++ seeding in ``features``: each pick drawn at
    random (``rng``) with probability proportional to the squared distance to the nearest picked or
    ``known`` frame (far frames likely, crowded regions still sampled, copies of picked frames never;
    the highest deviation first when there is nothing to measure from). ``dedup_tol``: a candidate
    closer than this to a picked one is dropped (the number dropped, candidates within it of a picked
    frame, is returned). ``groups`` (n,) ints: quotas, ``nmax`` split over the groups by
    :func:`allocate` (evenly), or with ``group_weights`` (G,) (one per group id 0..G-1) by
    :func:`proportional`, redone as candidates drop out.
    ``fill`` (n,) bools: fill-ins (frames above the upper trust level, ``select.fill_from_failed``),
    picked only where a group's share is left once its other candidates are all picked or dropped;
    among them the lowest deviation first (the closest to the trust band; ``diverse``: after the first
    one, farthest point as usual; ``kmeanspp``: drawn as the others).
    ``random_fraction`` f: pick j (from 0) is drawn uniformly among the candidates that may be picked
    instead when floor((j + 1) f) > floor(j f) (f = 0.5: every second pick, the first by ``mode``), so a
    fraction f of the picks samples where the candidates are dense, as random picks do.
    """
    devi = np.asarray(devi, dtype=float)
    n = len(devi)
    if n == 0 or nmax <= 0:
        return np.zeros(0, dtype=int), 0
    if group_weights is not None:  # one weight per group id: the ids must not be renumbered
        if groups is None:
            raise ValueError("group_weights need groups")
        groups = np.asarray(groups, dtype=int)
        weights = np.asarray(group_weights, dtype=float)
        G = len(weights)
        if groups.min() < 0 or groups.max() >= G:
            raise ValueError(f"group ids must be 0..{G - 1} (one weight each), got {groups.min()}..{groups.max()}")
    else:
        groups = np.zeros(n, dtype=int) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
        G = int(groups.max()) + 1
    f = None if features is None else np.asarray(features, dtype=np.float64)
    if (mode in FEATURE_PICKS or dedup_tol is not None) and f is None:
        raise ValueError(f"pick {mode!r} / dedup_tol need features")
    if mode == "highest":
        prio = -np.argsort(np.argsort(-devi, kind="stable"), kind="stable").astype(float)  # rank order
    elif mode == "random":
        prio = -np.argsort((rng if rng is not None else np.random.default_rng()).permutation(n)).astype(float)
    elif mode in FEATURE_PICKS:
        prio = None
        rng = rng if rng is not None else np.random.default_rng()
    else:
        raise ValueError(f"pick: unknown mode {mode!r}")
    if not 0.0 <= random_fraction <= 1.0:
        raise ValueError(f"random_fraction {random_fraction} is not in [0, 1]")
    if random_fraction and rng is None:
        rng = np.random.default_rng()
    fill = np.zeros(n, dtype=bool) if fill is None else np.asarray(fill, dtype=bool)
    if fill.any():  # fill-ins rank after every in-band candidate, the lowest deviation first
        low = -np.argsort(np.argsort(devi, kind="stable"), kind="stable").astype(float)
        prio = None if prio is None else np.where(fill, low - 2 * n, prio)
    eligible = np.ones(n, dtype=bool)
    picked_mask = np.zeros(n, dtype=bool)
    count = np.zeros(G, dtype=int)
    near = np.full(n, np.inf)  # distance to the nearest picked frame
    far = _min_dist(f, known) if mode in FEATURE_PICKS else None  # ... or training frame
    picked = []
    while len(picked) < nmax:
        avail = count + np.bincount(groups[eligible], minlength=G)
        room = count < (allocate(avail, nmax) if group_weights is None else proportional(weights, avail, nmax))
        ok = eligible & room[groups]
        if not ok.any():
            break
        if (ok & ~fill).any():
            ok &= ~fill
        j = len(picked)
        if random_fraction and math.floor((j + 1) * random_fraction) > math.floor(j * random_fraction):
            i = int(rng.choice(np.flatnonzero(ok)))
            score = None
        elif mode == "kmeanspp" and np.isfinite(far[ok]).all() and far[ok].max() > 0:
            w = np.where(ok, far, 0.0) ** 2
            i = int(rng.choice(n, p=w / w.sum()))
            score = None
        elif prio is not None:
            score = prio
        elif not picked or (mode == "diverse" and not (picked_mask & (fill == fill[ok][0])).any()):
            score = np.where(fill, -devi, devi)  # the first of a tier: highest in band, lowest fill-in
        else:
            score = far
        if score is not None:
            i = int(np.flatnonzero(ok)[np.argmax(np.where(ok, score, -np.inf)[ok])])
        picked.append(i)
        picked_mask[i] = True
        eligible[i] = False
        count[groups[i]] += 1
        if f is not None:
            d = _dist(f, f[i])
            near = np.minimum(near, d)
            if far is not None:
                far = np.minimum(far, d)
            if dedup_tol is not None:
                eligible &= ~(near < dedup_tol)
    dups = 0 if dedup_tol is None else int(np.sum(~picked_mask & (near < dedup_tol)))
    return np.asarray(picked, dtype=int), dups


# --- features -------------------------------------------------------------------------------------


def _flat(frames, type_map):
    """Flat batched layout of ASE frames: coords (N, 3), atype (N,), system (N,), cells (S, 3, 3), pbc (S, 3)
    (per direction: slabs and wires are imaged along their periodic directions only)."""
    index = {s: k for k, s in enumerate(type_map)}
    coords = np.concatenate([a.positions for a in frames]).astype(np.float64)
    try:
        atype = np.concatenate([[index[s] for s in a.get_chemical_symbols()] for a in frames]).astype(np.int64)
    except KeyError as err:
        from dpsnake.errors import UserError

        raise UserError(f"element {err.args[0]} is not in the model's type_map {type_map}") from None
    system = np.repeat(np.arange(len(frames)), [len(a) for a in frames]).astype(np.int64)
    cells = np.stack([a.cell.array for a in frames]).astype(np.float64)
    pbc = np.asarray([np.asarray(a.pbc, dtype=bool) for a in frames]).reshape(len(frames), 3)
    return coords, atype, system, cells, pbc


def _per_type_mean(xp, sums, counts, ntypes):
    """(S, ntypes, k) sums and (S, ntypes) counts -> (S, ntypes * k) means (0 where a type is absent)."""
    c = xp.maximum(counts, 1)[:, :, None]
    return (sums / c).reshape(sums.shape[0], -1)


def _batches(frames, batch_atoms: int):
    """(start, stop) ranges of consecutive frames with at most ``batch_atoms`` atoms each (one frame at
    least), so a feature pass never holds more than that many atoms' neighbours at once."""
    start = 0
    while start < len(frames):
        stop, natoms = start, 0
        while stop < len(frames) and (stop == start or natoms + len(frames[stop]) <= batch_atoms):
            natoms += len(frames[stop])
            stop += 1
        yield start, stop
        start = stop


def descriptor_features(model, frames, xp=np, batch_atoms: int = 20000) -> np.ndarray:
    """(n frames, ntypes * M1 * axis) per-type mean se_e2_a descriptor of model ``model`` (a path or a
    :class:`~dpsnake.engine.model.DPModel`), computed with the engine's neighbour search and nets in
    namespace ``xp`` (numpy or cupy). Raises UserError for a model the engine cannot read."""
    from dpsnake.engine.descriptor import _env_mat
    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.engine.neighbor import NeighborBuilder
    from dpsnake.engine.xp import segment_sum, to_numpy

    ens = Ensemble([model], precision="double", xp=xp)
    ctx = ens.ctx
    m = ens.models[0]
    rm = ens._rt(xp, 0)
    csize = ens.chunk_size(xp)
    T, M1, A = m.ntypes, m.neuron[-1], m.axis_neuron
    out = np.zeros((len(frames), T * M1 * A))
    for start, stop in _batches(frames, batch_atoms):
        coords, atype, system, cells, pbc = _flat(frames[start:stop], m.type_map)
        S = stop - start
        xc, xa, xs, xcell = (xp.asarray(v) for v in (coords, atype, system, cells))
        nb = NeighborBuilder(xp, xc, xa, xs, xcell, pbc, m.rcut, m.sel, m.pair_exclude, ctx=ctx)
        sums = xp.zeros((S, T, M1 * A))
        counts = np.bincount(system * T + atype, minlength=S * T).reshape(S, T)
        for ti in range(T):
            idx = np.flatnonzero(atype == ti)
            for a in range(0, len(idx), csize):
                centers = xp.asarray(idx[a : a + csize])
                ch = nb.chunk(centers)
                keep = None
                if m.desc_exclude[ti].any():  # as descriptor.energy_and_grad
                    exrow = ctx.device_const(xp, m.desc_exclude[ti][np.repeat(np.arange(T), m.sel)])[None, :]
                    exrow = exrow & (True if m.exclude_padding else ch.valid)
                    keep = (~exrow).astype(xp.float64)
                Rn, _ = _env_mat(xp, rm, ch.d, ch.valid, keep, rm.davg[ti], rm.rstd[ti])
                gr = xp.zeros((Rn.shape[0], 4, M1))
                for tt in range(T):
                    a0, b0 = int(m.sec[tt]), int(m.sec[tt + 1])
                    if a0 == b0:
                        continue
                    G, _ = rm.embeddings[rm.net_index(ti, tt)].forward(xp, Rn[:, a0:b0, 0:1], keep=False)
                    gr += xp.matmul(Rn[:, a0:b0, :].transpose(0, 2, 1), G)
                gr *= 1.0 / m.nnei
                D = xp.matmul(gr.transpose(0, 2, 1), gr[:, :, :A]).reshape(-1, M1 * A)
                sums[:, ti] += segment_sum(xp, xs[centers], D, S)
        out[start:stop] = to_numpy(_per_type_mean(xp, sums, xp.asarray(counts), T))
    return out


def fingerprints(
    frames, type_map, rcut: float = 6.0, width: float = 0.1, xp=np, batch_atoms: int = 20000
) -> np.ndarray:
    """(n frames, ntypes^2 * nbins) radial distribution per type pair within ``rcut``: pair distances
    spread linearly over bins of ``width`` A, per centre of the first type (a smooth structural
    fingerprint for models the built-in engine cannot read; the engine's neighbour search)."""
    from dpsnake.engine.neighbor import NeighborBuilder
    from dpsnake.engine.xp import segment_sum, to_numpy

    T, nb = len(type_map), int(np.ceil(rcut / width)) + 2
    out = np.zeros((len(frames), T * T * nb))
    for start, stop in _batches(frames, batch_atoms):
        coords, atype, system, cells, pbc = _flat(frames[start:stop], type_map)
        S = stop - start
        # room for every neighbour: 1.4 x the densest frame's atoms per rcut sphere, per type
        vol = np.array(
            [abs(np.linalg.det(c)) if p.all() and abs(np.linalg.det(c)) > 0 else 0.0 for c, p in zip(cells, pbc)]
        )
        nat = np.bincount(system, minlength=S)
        dens = np.max(np.where(vol > 0, nat / np.where(vol > 0, vol, 1.0), 0.0)) if vol.any() else 0.0
        sel = [int(max(1.4 * dens * 4.19 * rcut**3, nat.max()) + 8)] * T
        xc, xa, xs, xcell = (xp.asarray(v) for v in (coords, atype, system, cells))
        nbr = NeighborBuilder(xp, xc, xa, xs, xcell, pbc, rcut, sel)
        hist = xp.zeros((S, T, T * nb))
        counts = np.bincount(system * T + atype, minlength=S * T).reshape(S, T)
        for ti in range(T):
            idx = np.flatnonzero(atype == ti)
            for a in range(0, len(idx), max(1, 2_000_000 // sum(sel))):
                centers = xp.asarray(idx[a : a + max(1, 2_000_000 // sum(sel))])
                ch = nbr.chunk(centers)
                r = xp.sqrt((ch.d**2).sum(axis=2)) / width
                lo = xp.floor(r).astype(xp.int64)
                w = (r - lo) * ch.valid
                tt = xp.asarray(np.repeat(np.arange(T), sel))[None, :]
                col = tt * nb + lo
                sysc = xs[centers][:, None]
                vf = ch.valid.astype(xp.float64)
                for c, wt in ((col, vf - w), (xp.minimum(col + 1, tt * nb + nb - 1), w)):
                    idx2 = (sysc * (T * nb) + c).reshape(-1)
                    hist[:, ti] += segment_sum(xp, idx2, wt.reshape(-1), S * T * nb).reshape(S, T * nb)
        out[start:stop] = to_numpy(_per_type_mean(xp, hist, xp.asarray(counts), T))
    return out


def frame_features(model_path, frames, type_map, xp=np) -> tuple[np.ndarray, str]:
    """Features of ``frames`` and how they were made (a sentence for the select log): the engine's
    descriptor of ``model_path``, or :func:`fingerprints` when there is no model or the engine cannot
    read it."""
    import pathlib

    from dpsnake.errors import UserError

    if model_path is not None and pathlib.Path(model_path).is_file():
        try:
            from dpsnake.engine.model import load_model

            model = load_model(model_path)
        except UserError as err:
            why = f"the built-in engine cannot read it ({err})"
        else:
            return descriptor_features(model, frames, xp), f"se_e2_a descriptor of {model_path} ({xp.__name__})"
        rcut = _rcut_of(model_path)
    else:
        why, rcut = f"no model file {model_path}", 6.0
    return fingerprints(
        frames, type_map, rcut
    ), f"radial distribution fingerprint (rcut {rcut:g} A, numpy), not the descriptor: {why}"


def _rcut_of(path) -> float:
    """rcut of a .dp model's descriptor (6.0 when it cannot be read)."""
    try:
        import json

        import h5py

        with h5py.File(path, "r") as h5:
            root = json.loads(h5.attrs["json"])
        desc = root.get("model", {}).get("descriptor", {})
        return float(desc.get("rcut", desc.get("repinit", {}).get("rcut", 6.0)))
    except Exception:  # noqa: BLE001 - any damage: the default
        return 6.0
