"""Ensembles of se_atten / se_atten_v2 (DPA-1) models on shared neighbour data, batched over systems.

The same constructor, ``evaluate`` contract and outputs as :class:`dpsnake.engine.ensemble.Ensemble`
(flat layout: ``coords (N, 3)``, ``atype (N,)``, ``system (N,)`` sorted, ``cells (S, 3, 3)``, ``pbc
(S, 3)`` or ``(S,)``; NumPy in, NumPy out; CuPy in, CuPy out). Neighbours are DeePMD-kit's mixed-type
list: the nearest ``nnei`` atoms within rcut of any type, sorted by distance (the neighbour search of
:mod:`dpsnake.engine.neighbor` with one type block), built once per call for all models. Centres
run in chunks of one type. A chunk runs only the slots up to its most filled one (rounded up to a
multiple of 8, :func:`_trim_width`; the rest are empty): what the empty slots left out add is added
analytically (descriptor.py, attention.py), so results equal every slot's to rounding; settings
``compact`` False runs all nnei. fcc Cu at rcut 6 A fills about 80 of sel 120: the attention's
(n, n) work falls by half. As ``Ensemble``'s compaction widths, on CuPy a chunk reuses the last
call's width and the call is redone if a chunk filled more (``width_misses``). From a batch shape's
second call a type's centres run in the order of the slots they filled in the last one (settings
``fill_order``), so a few fuller centres widen one chunk, not every chunk they would fall in.
"""

from __future__ import annotations

import warnings

from dpsnake.engine.attn.descriptor import AttnRuntime, check_compressible, energy_and_grad
from dpsnake.engine.attn.model import AttnModel, load_attn_model
from dpsnake.engine.ensemble import (
    EnsembleBase,
    Layout,
    _guess_widths,
    _scatter_add,
    _segment,
)
from dpsnake.engine.neighbor import chunk_stats
from dpsnake.engine.xp import HostCopy, to_numpy


class AttnEnsemble(EnsembleBase):
    """M se_atten(_v2) models sharing type_map / rcut / sel; arguments as ``Ensemble``'s.

    ``compress`` (as ``Ensemble``'s: a :class:`~dpsnake.engine.tabulate.Compression` or a dict with
    min_nbor_dist): the geometric net Gs(s) of strip-mode models (se_atten_v2, se_atten with
    tebd_input_mode strip) runs from DeePMD-kit's table (``dp --pt compress``'s grid and polynomials;
    the type part is already a table). DeePMD-kit tabulates only models without attention layers;
    here Gs is tabulated for attn_layer > 0 too (the attention then runs as before on G). Concat
    mode or descriptor resnet_dt: one UserError line. On CUDA with attn_layer 0, the kernels of
    cuda/tab.py (STRIP) evaluate G in registers (EngineSettings tab_kernels, tab_lps): on an H200,
    DeePMD-kit's example se_atten_v2 without attention, 13824 atoms, a force call took 0.78 us/atom
    against 1.69 (nets, FP64) and 1.49 (nets, mixed). With attention layers the table runs as
    array code and is slower than the nets on a GPU (15.4 against 13.5 us/atom, attn_layer 2).
    ``settings``: the EngineSettings used are ``chunk_mb``, ``widths`` (grid and slot-count reuse
    on GPUs), ``compact`` (left-out empty slots, the module doc), the two above, and on CPUs
    ``keep_heap`` and ``cpu_workers`` (chunks in threads); the nets run as array code.
    """

    runtime_cls = AttnRuntime
    models: list[AttnModel]
    geometry_keys = "descriptor, type_map, rcut, sel or pair_exclude_types"
    min_chunk = 16

    def __init__(self, models, *args, **kwargs):
        super().__init__(models, *args, **kwargs)
        self._last_fill = (None, None)  # ((N, S), (N,) slots each centre filled) of the last call (fill_order)
        self.last_chunks = []  # (centres, slots) of each chunk the last call ran
        if self.compress is not None:
            for m in self.models:
                check_compressible(m)

    def _load(self, model) -> AttnModel:
        return model if isinstance(model, AttnModel) else load_attn_model(model)

    def _bytes_per_atom(self, nbytes: int) -> float:
        m, nn = self.models[0], self.models[0].nnei
        per_slot = (3 * sum(m.neuron) + 2 * m.tebd_dim + 4 * m.neuron[-1]) * nbytes + 64 * 8
        return nn * per_slot + 8 * m.attn_layer * nn * (nn + 3 * m.neuron[-1]) * nbytes + 2000 * 48

    def _check_widths(self, checks) -> bool:
        """Whether a chunk filled more slots than the width it ran; keeps each chunk's width for
        the next call."""
        missed = False
        for key, filled, guess in checks:
            filled = filled if isinstance(filled, int) else int(filled.result())
            missed |= guess is not None and filled > guess
            self._widths[key] = _trim_width(filled, self.models[0].nnei, guess)
        if len(self._widths) > 4096:  # many layouts seen (a long-lived server): start over
            self._widths = {}
        return missed

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
        """Energies, forces, virials of every model on every system (``Ensemble.evaluate``'s
        contract): ``energy`` (M, S) eV, ``force`` (M, N, 3) eV/A, ``virial`` (M, S, 9) eV and, if
        ``atomic``, ``atom_energy`` (M, N), ``atom_virial`` (M, N, 9); ``last_overflow`` the centres
        that lost neighbours."""
        xp, coords, cells, layout, idx = self._inputs(coords, atype, system, cells, pbc, model_indices, layout)
        atype, system = layout.atype, layout.system
        N, S, M = coords.shape[0], cells.shape[0], len(idx)
        if N == 0:
            return self._no_atoms(xp, cells, layout, M, atomic)
        energy_atom = xp.zeros((M, N))
        force = xp.zeros((M, N, 3))
        virial = xp.zeros((M, S, 9))
        atom_virial = xp.zeros((M, N, 9)) if atomic else None
        rts = [self._rt(xp, k) for k in idx]
        m0 = self.models[0]
        guessing = _guess_widths(xp, self.settings.widths) and not exact
        # one type block of nnei slots: the nearest nnei atoms of any type, in distance order
        nb = self._neighbors(
            xp, coords, xp.zeros(N, dtype=xp.int64), system, cells, layout.pbc_h, [m0.nnei], None, guessing
        )
        nb_check = None if nb.check is None else HostCopy(nb.check)
        # the type of each system's first atom (DeePMD-kit's type for empty slots)
        firsts = xp.searchsorted(system, xp.arange(S, dtype=system.dtype))
        first_type = atype[xp.clip(firsts, 0, N - 1)]
        pex = xp.asarray(m0.pair_exclude) if m0.pair_exclude.any() else None
        order, counts = layout.order, layout.counts
        csize = self.chunk_size(xp)
        overflow = []
        checks = []  # (key, the chunk's most filled slots (host int or HostCopy), the width it was given)
        trim = self.settings.compact
        jobs = self._jobs(counts, csize)
        fill_key = (N, S) if trim and self.settings.fill_order and len(jobs) > 1 else None
        last_fill = self._last_fill[1] if fill_key and self._last_fill[0] == fill_key else None
        if last_fill is not None:  # by type, then by the slots each centre filled last time
            order = xp.argsort(layout.atype * (m0.nnei + 1) + last_fill, kind="stable")
        fill = xp.zeros(N, dtype=xp.int64) if fill_key else None

        def work(job):
            """Neighbours, trimmed slots and every model's (e, g) of one chunk (may run in a thread)."""
            ti, a, b = job
            centers = order[a:b]
            ch, check = nb.chunk(centers), None
            if trim:  # the selection fills slots from the first: later ones are empty
                key = (N, S, ti, a, last_fill is not None)  # sorted chunks hold other centres: widths of their own
                filled = chunk_stats(xp, ch, [m0.nnei])[0]  # before pair exclusions: an upper bound
                guess = self._widths.get(key) if guessing else None
                if guess is None:  # the chunk's own: one host sync
                    filled = int(to_numpy(filled))
                    ns = _trim_width(filled, m0.nnei, None)
                else:  # last call's, checked once the call is issued
                    filled, ns = HostCopy(filled), guess
                check = (key, filled, guess)
                if ns < m0.nnei:
                    ch = _first_slots(xp, ch, ns)
            valid = ch.valid
            ntype = atype[xp.where(valid, ch.owner, 0)]
            if pex is not None:  # model pair exclusions: empty slots (after the selection)
                valid = valid & ~pex[ti][ntype]
            first = first_type[system[centers]]
            return check, ch, valid, [energy_and_grad(rt, ti, ch.d, valid, ntype, first) for rt in rts]

        ran = []
        for check, ch, valid, results in self._map_chunks(xp, work, jobs):
            if check is not None:
                checks.append(check)
            centers = ch.centers
            ran.append((int(centers.shape[0]), int(ch.d.shape[1])))
            if fill is not None:
                fill[centers] = ch.valid.sum(axis=1)
            overflow.append(ch.overflow.sum())
            own = xp.where(valid, ch.owner, centers[:, None])
            sysc = system[centers]
            for j, (e, g) in enumerate(results):
                energy_atom[j, centers] = e
                force[j, centers] += g.sum(axis=1)
                _scatter_add(xp, force[j], own.reshape(-1), -g.reshape(-1, 3))
                if atomic:
                    w = -(g[:, :, :, None] * ch.d[:, :, None, :]).reshape(g.shape[0], -1, 9)
                    _scatter_add(xp, virial[j], sysc, w.sum(axis=1))
                    _scatter_add(xp, atom_virial[j], own.reshape(-1), w.reshape(-1, 9))
                else:
                    wc = -xp.matmul(g.transpose(0, 2, 1), ch.d).reshape(g.shape[0], 9)
                    _scatter_add(xp, virial[j], sysc, wc)
        missed = self._check_widths(checks)
        if fill_key:
            self._last_fill = (fill_key, fill)
        self.last_chunks = ran
        grid_ok = nb_check is None or nb.settle(nb_check.result())
        if missed or not grid_ok:  # a chunk filled more slots than it ran, cells moved beyond the
            self.width_misses += bool(missed)  # kept bin grid, or more ghosts than room: redo
            self.grid_misses += not grid_ok
            a0, s0, p0 = layout.given
            return self.evaluate(coords, a0, s0, cells, p0, model_indices, atomic, exact=True, layout=layout)
        self.last_overflow = int(to_numpy(xp.stack(overflow).sum())) if overflow else 0
        if self.last_overflow:
            warnings.warn(
                f"{self.last_overflow} atoms have more neighbours within rcut than sel allows "
                f"(sel={m0.nnei}); extra neighbours were dropped as DeePMD-kit does",
                RuntimeWarning,
                stacklevel=2,
            )
        out = {"energy": _segment(xp, energy_atom, system, S), "force": force, "virial": virial}
        if atomic:
            out["atom_energy"] = energy_atom
            out["atom_virial"] = atom_virial
        return out


def _trim_width(filled: int, nnei: int, guess: int | None) -> int:
    """Slots a chunk runs when its centres fill at most ``filled``: a multiple of 8 (few kernel
    variants) with room for 2 more (thermal motion moves atoms across rcut between calls), at
    most nnei; ``guess`` (the last call's) again while it holds them and wastes under 16 slots."""
    if guess is not None and filled <= guess and guess - filled < 16:
        return guess
    return min(nnei, max(8, -(-(filled + 2) // 8) * 8))


def _first_slots(xp, ch, ns: int):
    """The chunk with only its first ``ns`` slots (contiguous copies)."""
    return type(ch)(
        centers=ch.centers,
        owner=xp.ascontiguousarray(ch.owner[:, :ns]),
        d=xp.ascontiguousarray(ch.d[:, :ns]),
        valid=xp.ascontiguousarray(ch.valid[:, :ns]),
        overflow=ch.overflow,
        stats=ch.stats,
    )
