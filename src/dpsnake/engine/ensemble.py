"""Ensembles of Deep Potential models evaluated on shared neighbour data, batched over many systems.

Flat batched layout (docs/architecture.md): ``coords (N, 3)``, ``atype (N,)`` model type indices,
``system (N,)`` sorted ints 0..S-1, ``cells (S, 3, 3)`` (rows = lattice vectors, A), ``pbc (S, 3)``
per direction (slabs, wires) or ``(S,)`` for every direction or none.
Outputs live in the inputs' namespace (NumPy in, NumPy out; CuPy in, CuPy out).
"""

from __future__ import annotations

import collections
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import ThreadpoolController

from dpsnake.engine.cuda import elementwise
from dpsnake.engine.descriptor import RuntimeModel, Slots, energy_and_grad
from dpsnake.engine.model import DPModel, load_model
from dpsnake.engine.neighbor import NeighborBuilder, _CellGeometry, chunk_stats, pbc_axes
from dpsnake.engine.settings import EngineContext, EngineSettings
from dpsnake.engine.tabulate import Compression
from dpsnake.engine.verlet import KeptNeighbors
from dpsnake.engine.xp import HostCopy, array_namespace, keep_freed_memory, to_numpy
from dpsnake.errors import UserError

# Work memory per chunk on CPUs: temporaries near the caches. With keep_freed_memory on, 64 MB chunks
# beat 2048 MB ones by 1.2x (2-core EPYC, 32 MiB L3, 1,728 atoms, DeePMD-kit's example sizes:
# se_atten_v2 attn_layer 2 2184 -> 1826, attn_layer 0 373 -> 303, se_e2_a 317 -> 258 us/atom);
# NumPy's elementwise work is single-threaded, so more cores do not call for larger chunks.
CPU_CHUNK_MB = 64.0
# with cpu_workers None: calls of less work memory than two chunks run their chunks one after the other
# (BLAS threaded). The demo's model (se_e2_a, 96 slots, candidates kept between calls), one thread vs two,
# ms per force call on 2 cores (2026-12-05): 256 atoms (49 MB) 9.8 vs 14.7; 512 (98 MB) 20.7 vs 24.2;
# 1,024 (195 MB) 40.3 vs 36.4 (4 models: 127.6 vs 99.9)
CPU_POOL_MIN_MB = 2 * CPU_CHUNK_MB


def _compression(compress):
    """None, or a Compression from a Compression / dict (one UserError line on bad input)."""
    if compress is None or compress is False:
        return None
    if isinstance(compress, Compression):
        return compress
    if isinstance(compress, dict):
        unknown = set(compress) - {"min_nbor_dist", "stride", "extrapolate"}
        if unknown or "min_nbor_dist" not in compress:
            raise UserError(
                f"compress: needs min_nbor_dist (and optionally stride, extrapolate); got {sorted(compress)}"
            )
        try:
            values = {k: float(v) for k, v in compress.items()}
        except (TypeError, ValueError):
            raise UserError(f"compress: values must be numbers, got {compress!r}") from None
        return Compression(**values)
    raise UserError(f"compress: {compress!r} is not a dict with min_nbor_dist")


class Layout:
    """What stays fixed while a batch's atoms move: types, systems, periodicity, with the host
    copies and the centre order a call needs (made with one round of host copies; a call given
    it copies nothing to the host before it starts the device's work).

    Made by :meth:`Ensemble.layout` from device (or host) arrays ``atype`` (N,), ``system`` (N,),
    ``pbc`` (S, 3) or (S,); it holds them and is used only for those very arrays (identity), which must not
    be changed in place while it is in use (an MD batch's are not).
    """

    def __init__(self, xp, atype, system, pbc, ntypes: int):
        self.given = (atype, system, pbc)  # held: their ids stay unique while this lives
        self.atype = xp.asarray(atype).astype(xp.int64, copy=False).reshape(-1)
        self.system = xp.asarray(system).astype(xp.int64, copy=False).reshape(-1)
        self.pbc_h = pbc_axes(pbc)  # (S, 3) host
        self.pbc = xp.asarray(self.pbc_h)
        self.N, self.S = self.atype.shape[0], self.pbc_h.shape[0]
        if self.system.shape[0] != self.N:
            raise UserError(f"atype/system: lengths {self.N}/{self.system.shape[0]} differ")
        ta = to_numpy(self.atype)
        if self.N and (ta.min() < 0 or ta.max() >= ntypes):
            raise UserError(f"atype: type indices must be in 0..{ntypes - 1}")
        self.counts = np.bincount(ta, minlength=ntypes)
        # centres sorted by type, one copy made now (chunks are slices of it)
        self.order = xp.arange(self.N, dtype=xp.int64) if ntypes == 1 else xp.asarray(np.argsort(ta, kind="stable"))

    def made_from(self, atype, system, pbc) -> bool:
        return all(a is b for a, b in zip(self.given, (atype, system, pbc)))


class EnsembleBase:
    """What every ensemble (se_e2_a :class:`Ensemble`, se_atten ``AttnEnsemble``) shares: the
    constructor's checks and state, one runtime per (namespace, model), the chunk size, the layout
    and what it derives from its ``models`` (which share type_map / rcut / sel). A subclass gives
    ``runtime_cls`` (``build(model, xp, dtype, compress=, ctx=)``), ``_load`` (a model or a path ->
    model), ``_bytes_per_atom`` (work memory per centre of a chunk) and ``evaluate``."""

    models: list
    runtime_cls: type
    geometry_keys = "type_map, rcut, sel or pair_exclude_types"  # what same_geometry compares
    min_chunk = 64  # centres per chunk at the least

    def __init__(
        self,
        models,
        precision: str = "double",
        xp=None,
        chunk_atoms: int | None = None,
        compress=None,
        settings: EngineSettings | dict | None = None,
        tf32: bool | None = None,
    ):
        if not models:
            raise UserError("models: an ensemble needs at least one model")
        if precision not in ("double", "mixed"):
            raise UserError(f"precision: {precision!r} is not 'double' or 'mixed'")
        self.models = [self._load(m) for m in models]
        m0 = self.models[0]
        for m in self.models[1:]:
            if not m0.same_geometry(m):
                raise UserError(
                    f"models: {m.path} differs from {m0.path} in {self.geometry_keys}, so they cannot "
                    "share neighbour lists"
                )
        self.precision = precision
        self.compress = _compression(compress)
        self.settings = _settings(settings, tf32)
        self.ctx = EngineContext(self.settings)
        self.chunk_atoms = chunk_atoms
        self._runtime = {}
        self._xp = xp
        self.last_overflow = 0
        self._widths = {}  # (N, S, type, chunk start) -> widths given to the next call's chunk
        self.width_misses = 0
        self.width_changes = 0  # guesses replaced (a miss, or far too wide)
        self.grid_misses = 0  # calls redone: cells moved beyond the kept bin grid, or ghosts beyond room
        self._csize = {}
        self._nworkers = None  # threads running chunks on CPUs (_workers)
        self._kept = None  # KeptNeighbors on NumPy with settings.skin (_neighbors)
        self._blas = None  # threadpoolctl's controller of the BLAS libraries (_workers)

    def _load(self, model):
        raise NotImplementedError

    def _bytes_per_atom(self, nbytes: int) -> float:
        """Work memory (bytes) per centre of a chunk, nets in ``nbytes``-byte floats."""
        raise NotImplementedError

    def _rt(self, xp, k: int):
        key = (xp.__name__, k)
        if key not in self._runtime:
            if xp is np and self.settings.keep_heap:
                keep_freed_memory()
            dtype = xp.float64 if self.precision == "double" else xp.float32
            self._runtime[key] = self.runtime_cls.build(self.models[k], xp, dtype, compress=self.compress, ctx=self.ctx)
        return self._runtime[key]

    def _map_chunks(self, xp, work, jobs):
        """``work(job)`` for each of ``jobs``, yielded in order. On NumPy with more than one worker
        (settings ``cpu_workers``; None: BLAS's thread count) in a pool of threads with BLAS
        single-threaded inside them (BLAS's own threads on top oversubscribe the cores: 1.4-2.2x
        slower than one worker on 2 cores), at most two chunks per worker in flight (bounded memory); else one
        after the other; also with ``cpu_workers`` None when the jobs' work memory is below
        :data:`CPU_POOL_MIN_MB` (small calls: threads cost more than they give). The caller adds each
        chunk's sums in this order, so results do not depend on the workers."""
        workers = self._workers(xp)
        if workers > 1 and self.settings.cpu_workers is None:
            nbytes = 4 if self.precision == "mixed" else 8
            if sum(b - a for _, a, b in jobs) * self._bytes_per_atom(nbytes) < CPU_POOL_MIN_MB * 1e6:
                workers = 1
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield work(job)
            return
        with self._blas.limit(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
            pending = collections.deque()
            for job in jobs:
                pending.append(pool.submit(work, job))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def _neighbors(self, xp, coords, atype, system, cells, pbc_h, sel, pair_exclude, reuse_grid):
        """This call's neighbour search (``chunk(centers)``): a NeighborBuilder, or on NumPy with
        settings.skin > 0 the candidates kept between calls (engine/verlet.py)."""
        rcut = self.models[0].rcut
        if xp is np and self.settings.skin > 0:
            if self._kept is None:
                self._kept = KeptNeighbors(self.settings.skin)
            return self._kept.builder(coords, atype, system, cells, pbc_h, rcut, sel, pair_exclude, self.ctx)
        return NeighborBuilder(xp, coords, atype, system, cells, pbc_h, rcut, sel, pair_exclude, reuse_grid, self.ctx)

    def _jobs(self, counts, csize: int) -> list:
        """(centre type, first, end) positions in a layout's type order, chunks of ``csize`` centres."""
        jobs, start = [], 0
        for ti in range(self.ntypes):
            stop = start + int(counts[ti])
            jobs += [(ti, a, min(stop, a + csize)) for a in range(start, stop, csize)]
            start = stop
        return jobs

    def _workers(self, xp) -> int:
        if xp is not np:
            return 1
        if self._nworkers is None:
            # the BLAS libraries, scanned once (a scan per call costs 0.7-1.5 ms; the controller 0.01)
            self._blas = ThreadpoolController()
            n = self.settings.cpu_workers
            if n is None:  # the BLAS threads the process was given (OMP_NUM_THREADS, ...)
                n = max([i.get("num_threads", 1) for i in self._blas.info() if i.get("user_api") == "blas"] or [1])
            self._nworkers = max(1, int(n))
        return self._nworkers

    def chunk_size(self, xp) -> int:
        """Centres per chunk: work memory ~ settings.chunk_mb (default :data:`CPU_CHUNK_MB` on CPUs; on
        GPUs a third of the free device memory), so any number of atoms runs in bounded memory."""
        if self.chunk_atoms:
            return int(self.chunk_atoms)
        key = xp.__name__
        if key not in self._csize:  # once: the free memory of the first call (a driver query)
            self._csize[key] = self._chunk_size_of(xp, self.settings.chunk_mb)
        return self._csize[key]

    def _chunk_size_of(self, xp, chunk_mb) -> int:
        if chunk_mb:
            mb = float(chunk_mb)
        elif xp.__name__ == "cupy":
            free, _ = xp.cuda.runtime.memGetInfo()
            pool = xp.get_default_memory_pool()
            mb = (free + pool.free_bytes()) / 3e6
        else:
            mb = CPU_CHUNK_MB
        nbytes = 4 if self.precision == "mixed" else 8
        return max(self.min_chunk, int(mb * 1e6 / self._bytes_per_atom(nbytes)))

    def layout(self, atype, system, pbc) -> Layout:
        """A :class:`Layout` of these arrays for ``evaluate`` (MD: once per batch)."""
        return Layout(array_namespace(atype), atype, system, pbc, self.ntypes)

    def _inputs(self, coords, atype, system, cells, pbc, model_indices, layout):
        """``evaluate``'s arguments checked and converted: (xp, coords (N, 3), cells (S, 3, 3), the
        layout (the caller's when it was made from these atype/system/pbc), model indices)."""
        xp = array_namespace(coords)
        coords = xp.asarray(coords, dtype=xp.float64).reshape(-1, 3)
        cells = xp.asarray(cells, dtype=xp.float64).reshape(-1, 3, 3)
        if layout is None or not layout.made_from(atype, system, pbc):
            layout = Layout(xp, atype, system, pbc, self.ntypes)
        N, S = coords.shape[0], cells.shape[0]
        if layout.N != N:
            raise UserError(f"atype/system: {layout.N} entries for {N} atoms")
        if layout.S != S:
            raise UserError(f"pbc: {layout.S} entries for {S} systems")
        idx = list(range(self.nmodels)) if model_indices is None else [int(i) for i in model_indices]
        return xp, coords, cells, layout, idx

    def _no_atoms(self, xp, cells, layout, M: int, atomic: bool) -> dict:
        """``evaluate``'s outputs for systems without atoms (singular cells are still an error)."""
        _CellGeometry(to_numpy(cells).reshape(-1, 3, 3), layout.pbc_h, self.rcut)
        S = cells.shape[0]
        out = {"energy": xp.zeros((M, S)), "force": xp.zeros((M, 0, 3)), "virial": xp.zeros((M, S, 9))}
        if atomic:
            out.update(atom_energy=xp.zeros((M, 0)), atom_virial=xp.zeros((M, 0, 9)))
        return out

    @property
    def type_map(self) -> list[str]:
        return list(self.models[0].type_map)

    @property
    def rcut(self) -> float:
        return self.models[0].rcut

    @property
    def sel(self) -> list[int]:
        return list(self.models[0].sel)

    @property
    def ntypes(self) -> int:
        return self.models[0].ntypes

    @property
    def nmodels(self) -> int:
        return len(self.models)


class Ensemble(EnsembleBase):
    """M models sharing type_map / rcut / sel; ``evaluate`` builds neighbours once for all of them.

    precision: "double" (FP64 nets and geometry) or "mixed" (FP64 geometry, FP32 nets).
    xp: array namespace to hold the weights (numpy or cupy); None = chosen from the first inputs.
    chunk_atoms: centres per chunk (None = sized from ``settings.chunk_mb``).
    compress: tabulated embedding nets (DeePMD-kit's model compression): a
    :class:`~dpsnake.engine.tabulate.Compression`, a dict of its fields, or None (the nets).
    settings: an :class:`~dpsnake.engine.settings.EngineSettings` (None: the defaults), or a dict
    of its fields; ``tf32=True`` is shorthand for ``settings.tf32``. The ensemble's
    :class:`~dpsnake.engine.settings.EngineContext` (``ctx``) carries them to every call.
    """

    runtime_cls = RuntimeModel
    models: list[DPModel]

    def _load(self, model) -> DPModel:
        return model if isinstance(model, DPModel) else load_model(model)

    def _bytes_per_atom(self, nbytes: int) -> float:
        m = self.models[0]
        # per slot: cached activations + gradients of the nets, env-mat and chain-rule work (FP64)
        per_slot = 3 * sum(m.neuron) * nbytes + 48 * 8
        fit = max(sum(l.nout for l in f.layers) for f in m.fittings if f is not None)
        per_atom = m.nnei * per_slot + 3 * (m.neuron[-1] * m.axis_neuron + fit) * nbytes
        return per_atom + 2000 * 48  # candidate arrays of the array-code neighbour search

    def _check_widths(self, checks):
        """Overflowing centres of the call, and whether a chunk filled more slots than its given
        widths; keeps each chunk's widths for the next call."""
        overflow, missed = 0, False
        for key, stats, guess in checks:
            stats = stats if isinstance(stats, np.ndarray) else stats.result().astype(int)
            got, sel = stats[:-1], self.models[0].sel
            overflow += int(stats[-1])
            missed |= guess is not None and bool(np.any(got > guess))
            self._widths[key] = _padded(got, sel, guess)
            self.width_changes += guess is not None and self._widths[key] is not guess
        if len(self._widths) > 4096:  # many layouts seen (a long-lived server): start over
            self._widths = {}
        return overflow, missed

    def evaluate(
        self,
        coords,
        atype,
        system,
        cells,
        pbc,
        model_indices=None,
        atomic: bool = False,
        exact: bool = False,
        layout: Layout | None = None,
    ):
        """Energies, forces, virials of every model on every system.

        coords (N, 3) A; atype (N,) int; system (N,) sorted ints 0..S-1; cells (S, 3, 3) A;
        pbc (S, 3) bool per direction, or (S,) for every direction or none (slabs, wires: the
        cell rows along non-periodic directions play no part). Returns dict with ``energy`` (M, S) eV, ``force`` (M, N, 3) eV/A,
        ``virial`` (M, S, 9) eV and, if ``atomic``, ``atom_energy`` (M, N), ``atom_virial`` (M, N, 9).
        ``last_overflow``: centres that lost neighbours in this call. ``layout``: the
        :meth:`layout` of these atype/system/pbc, kept by the caller (MD), so the call starts
        without host copies (a layout of other arrays is ignored).

        Compaction widths (:func:`_compact`): on a GPU each chunk reuses the widths of the last call
        with the same layout, padded (:func:`_padded`), so the host issues the whole call without
        waiting for the device; the chunk's real widths come back in a copy that is checked once
        everything is issued, and a call that needed more is redone with its own widths
        (``width_misses`` counts them; ``exact`` or settings.widths "exact": always the chunk's own,
        one host sync per chunk). Likewise periodic batches' bin grid and ghost images: the last
        host-made grid of the layout, its geometry remade on the device from the cells (no copy
        of cells that change every step under NPT), and room for the last call's ghosts plus a
        margin (no count copied back before the ghosts are made), checked with the widths
        (``grid_misses``).
        The call returns without waiting for the device's last kernels.
        """
        xp, coords, cells, layout, idx = self._inputs(coords, atype, system, cells, pbc, model_indices, layout)
        atype, system, pbc = layout.atype, layout.system, layout.pbc
        N, S, M = coords.shape[0], cells.shape[0], len(idx)
        if N == 0:
            return self._no_atoms(xp, cells, layout, M, atomic)
        energy_atom = xp.zeros((M, N))
        force = xp.zeros((M, N, 3))
        virial = xp.zeros((M, S, 9))
        atom_virial = xp.zeros((M, N, 9)) if atomic else None
        rts = [self._rt(xp, k) for k in idx]
        m0 = self.models[0]
        ctx = self.ctx
        guessing = _guess_widths(xp, self.settings.widths) and not exact
        nb = self._neighbors(xp, coords, atype, system, cells, layout.pbc_h, m0.sel, m0.pair_exclude, guessing)
        nb_check = None if nb.check is None else HostCopy(nb.check)
        order_dev, counts = layout.order, layout.counts
        csize = self.chunk_size(xp)
        fast_scatter = ctx.fast(xp, "scatter")
        checks = []  # (key, the chunk's stats (host array or HostCopy), the widths it was given)
        jobs = self._jobs(counts, csize)

        def work(job):
            """Neighbours, compaction and every model's (e, g) of one chunk (may run in a thread)."""
            ti, a, b = job
            ch = nb.chunk(order_dev[a:b])
            key = (N, S, ti, a)
            stats = chunk_stats(xp, ch, m0.sel)
            guess = self._widths.get(key) if guessing else None
            if guess is None:  # the chunk's own widths: one host sync
                stats = to_numpy(stats).astype(int)
                widths = stats[:-1]
            else:  # last call's widths, checked when the call is issued (no sync now)
                stats, widths = HostCopy(stats), guess
            ch, slots, own = _compact(ctx, xp, ch, m0.sel, widths)
            # g 0 in empty slots
            return (key, stats, guess), ch, own, [energy_and_grad(rt, ti, ch.d, ch.valid, slots=slots) for rt in rts]

        for (_, a, b), (check, ch, own, results) in zip(jobs, self._map_chunks(xp, work, jobs)):
            checks.append(check)
            # one type: the centres are a range, and a slice indexes without gather/scatter kernels
            at = slice(a, b) if self.ntypes == 1 else ch.centers
            # empty slots point at their own centre (with g masked to 0 there) rather than at
            # atom 0: no NaN can reach another system, and no atomics pile up on one address
            sysc = system[at]
            for j, (e, g) in enumerate(results):
                energy_atom[j, at] = e
                # F = -dE/dr with d = r_nb - r_c: centre gets +sum g, neighbour gets -g
                sums = None
                if fast_scatter and not atomic:  # sum g and virial -g^T d in one pass
                    sums = ctx.guarded("scatter", elementwise.centre_sums, xp, g, ch.d)
                force[j, at] += g.sum(axis=1) if sums is None else sums[:, :3]
                if not (
                    fast_scatter
                    and ctx.guarded("scatter", elementwise.scatter_neg, xp, force[j], own, ch.valid, g) is not None
                ):
                    _scatter_add(xp, force[j], own.reshape(-1), -g.reshape(-1, 3))
                if atomic:
                    w = -(g[:, :, :, None] * ch.d[:, :, None, :]).reshape(g.shape[0], -1, 9)
                    _scatter_add(xp, virial[j], sysc, w.sum(axis=1))
                    _scatter_add(xp, atom_virial[j], own.reshape(-1), w.reshape(-1, 9))
                else:  # per-centre virial -g^T d as a batched product: no (n, nnei, 9) temporary
                    wc = -xp.matmul(g.transpose(0, 2, 1), ch.d).reshape(g.shape[0], 9) if sums is None else sums[:, 3:]
                    _scatter_add(xp, virial[j], sysc, wc)
        overflow, missed = self._check_widths(checks)
        grid_ok = nb_check is None or nb.settle(nb_check.result())
        if missed or not grid_ok:  # more slots than the widths kept, bins too small or more ghosts
            self.width_misses += bool(missed)  # than room: redo with the call's own sizes
            self.grid_misses += not grid_ok
            a0, s0, p0 = layout.given
            return self.evaluate(coords, a0, s0, cells, p0, model_indices, atomic, exact=True, layout=layout)
        self.last_overflow = overflow
        if overflow:
            warnings.warn(
                f"{overflow} atoms have more neighbours within rcut than sel allows "
                f"(sel={m0.sel}); extra neighbours were dropped as DeePMD-kit does",
                RuntimeWarning,
                stacklevel=2,
            )
        out = {"energy": _segment(xp, energy_atom, system, S), "force": force, "virial": virial}
        if atomic:
            out["atom_energy"] = energy_atom
            out["atom_virial"] = atom_virial
        return out


def _settings(settings, tf32) -> EngineSettings:
    """EngineSettings from the Ensemble's arguments (one UserError line on bad input)."""
    try:
        if settings is None:
            settings = EngineSettings()
        elif isinstance(settings, dict):
            settings = EngineSettings.from_dict(settings)
        elif not isinstance(settings, EngineSettings):
            raise ValueError(f"{settings!r} is not an EngineSettings or a dict")
        return settings if tf32 is None else settings.replace(tf32=bool(tf32))
    except (TypeError, ValueError) as err:
        raise UserError(f"settings: {err}") from None


def _guess_widths(xp, mode: str) -> bool:
    """Whether chunks reuse the last call's compaction widths (settings.widths: "auto", the default:
    on CuPy, where a host sync costs the launch queue; "guess": also on NumPy (tests); "exact")."""
    return mode == "guess" or (mode == "auto" and xp.__name__ == "cupy")


def _padded(got, sel, guess):
    """Widths for the next call of a chunk that filled ``got`` (ntypes,) slots per type block:
    ``guess`` again if it still holds them without wasting more than two pads, else ``got`` plus a
    pad of 4% (at least 2 slots: thermal motion moves atoms across rcut), at most ``sel``."""
    got = np.asarray(got, dtype=int)
    pad = np.maximum(2, np.ceil(0.04 * got)).astype(int)
    if guess is not None and np.all(got <= guess) and np.all(guess - got <= 2 * pad):
        return guess
    return np.minimum(np.asarray(sel, dtype=int), got + pad)


def _compact(ctx, xp, ch, sel, widths):
    """Drop the trailing slots of each type block beyond ``widths`` (ntypes,) slots.

    Selection fills each block from its start, so block t needs only max_i(count_i,t) columns (the
    chunk's stats, :func:`chunk_stats`); wider is also right (the extra slots are empty).
    Returns the narrower chunk, its :class:`Slots` and ``own`` (n, nc) the owner of each slot (the
    centre itself in empty slots). ``ctx.settings.compact`` False: every slot (timings of both in
    docs/benchmarks.md, History).
    """
    kept = np.minimum(np.asarray(widths, dtype=int), sel)
    if not ctx.settings.compact or np.array_equal(kept, sel):
        own = xp.where(ch.valid, ch.owner, ch.centers[:, None])
        return ch, Slots.full(sel), own
    slots = Slots.cached(sel, kept, xp, ctx.slots)
    out = ctx.guarded("nbr", elementwise.compact, xp, ch, slots.xcols) if ctx.fast(xp, "nbr") else None
    if out is None:
        cols = slots.xcols
        owner, valid = ch.owner[:, cols], ch.valid[:, cols]
        out = owner, xp.where(valid, owner, ch.centers[:, None]), ch.d[:, cols], valid
    owner, own, d, valid = out
    return type(ch)(centers=ch.centers, owner=owner, d=d, valid=valid, overflow=ch.overflow), slots, own


def _scatter_add(xp, target, index, values):
    """target[index] += values, with repeated indices accumulated."""
    if xp is np:
        np.add.at(target, index, values)
    else:
        import cupyx

        cupyx.scatter_add(target, index, values)


def _segment(xp, per_atom, system, S):
    """(M, N) -> (M, S) sums over the atoms of each system."""
    out = xp.zeros((per_atom.shape[0], S))
    for j in range(per_atom.shape[0]):
        _scatter_add(xp, out[j], system, per_atom[j])
    return out
