"""Neighbour-selection kernels (CuPy RawKernel; sources select_nb.cu, select_nb_warp.cu).

Used for CuPy inputs when ``EngineSettings.kernels`` is on; the array code of neighbor.py is the
reference they are tested against (same selection). ``EngineSettings.select`` picks the kernel:
"warp" (default; checked against NumPy on a GPU and faster than "thread": docs/benchmarks.md,
History), one 32-thread block per centre: lanes test the candidates in parallel and append those
within rcut to shared memory with their enumeration order; each kept candidate's
rank by (r, order) and its rank within its type are counted, which reproduces select_nb's stable
insertion sort exactly. A centre with more than CAP candidates within rcut is flagged in ``spill``
and redone by select_nb, the one-thread-per-centre kernel ("thread").
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from dpsnake.engine import cuda

WARP_LANES = 32
WARP_CAP = 256


class Selection(NamedTuple):
    """Output of the selection kernels: owner (n, nnei) int64 (-1 empty), d (n, nnei, 3) float64,
    overflow (n,) bool, stats (ntypes + 1,) int32 (the most slots any centre fills in each type
    block, then the number of centres that lost neighbours)."""

    owner: object
    d: object
    overflow: object
    stats: object


def select_defines(nnei: int, ntypes: int, cap: int | None = None, lanes: int | None = None) -> dict:
    """Compile-time sizes of select_nb.cu (and, with cap and lanes, select_nb_warp.cu)."""
    d = {"NNEI": int(nnei), "NT": int(ntypes)}
    if cap is not None:
        d.update(CAP=int(cap), LANES=int(lanes))
    return d


def select_source(nnei: int, ntypes: int) -> str:
    """select_nb.cu with its sizes as ``#define`` lines (one self-contained text, for the tests)."""
    return cuda.with_defines(cuda.load("select_nb.cu"), **select_defines(nnei, ntypes))


def warp_source(nnei: int, ntypes: int, cap: int = WARP_CAP, lanes: int = WARP_LANES) -> str:
    """select_nb_warp.cu with its sizes as ``#define`` lines."""
    return cuda.with_defines(cuda.load("select_nb_warp.cu"), **select_defines(nnei, ntypes, cap, lanes))


@functools.cache  # compiled once per size (a compile cache: keyed by everything the source depends on)
def _select_kernel(nnei: int, ntypes: int):
    import cupy

    opts = cuda.options(**select_defines(nnei, ntypes))
    return cupy.RawKernel(cuda.load("select_nb.cu"), "select_nb", options=opts)


def _consts(xp, sel, sec, consts):
    """sel, sec[:-1] as int32 arrays of ``xp``: ``consts`` if given (EngineContext.device_const,
    copied once per device), else copied now."""
    if consts is not None:
        return consts
    return xp.asarray(np.asarray(sel, dtype=np.int32)), xp.asarray(np.asarray(sec[:-1], dtype=np.int32))


def select_neighbors(
    xp, rcut, sel, sec, cpos, cidx, bstart, bcnt, epos, eown, etype, eidx, only=None, out=None, consts=None
):
    """Kernel version of the distance-sorted, type-split selection of NeighborBuilder.chunk.

    cpos (n, 3) centre positions; cidx (n,) their ext indices; bstart/bcnt (n, 27) candidate ranges
    in the bin-sorted ext arrays epos (E, 3), eown, etype, eidx (E,). Returns owner (n, nnei) int64
    (-1 empty), d (n, nnei, 3) float64, overflow (n,) bool, stats (ntypes + 1,) int32: the most
    slots any centre fills in each type block, then the number of centres that lost neighbours
    (what compaction and the overflow warning need, read in one copy): a :class:`Selection`.
    ``only`` (n,) bool: do just those centres, writing into ``out`` (a Selection; no host sync to
    find them). ``consts``: sel, sec[:-1] as int32 device arrays (:func:`_consts`).
    """
    n = int(cpos.shape[0])
    nnei = int(sum(sel))
    if out is None:
        out = Selection(
            xp.full((n, nnei), -1, dtype=xp.int64),
            xp.zeros((n, nnei, 3), dtype=xp.float64),
            xp.zeros(n, dtype=bool),
            xp.zeros(len(sel) + 1, dtype=xp.int32),
        )
    owner, d, over, stats = out
    if n == 0:
        return Selection(owner, d, over, stats)
    k = _select_kernel(nnei, len(sel))
    threads = 128
    args = (
        xp.int64(n),
        xp.float64(rcut),
        xp.ascontiguousarray(cpos, dtype=xp.float64),
        xp.ascontiguousarray(cidx, dtype=xp.int64),
        xp.ascontiguousarray(bstart, dtype=xp.int64),
        xp.ascontiguousarray(bcnt, dtype=xp.int64),
        epos,
        eown,
        etype,
        eidx,
        *_consts(xp, sel, sec, consts),
        owner,
        d,
        over,
        stats,
        over if only is None else only,
        xp.int64(only is not None),
    )
    k(((n + threads - 1) // threads,), (threads,), args)
    return Selection(owner, d, over, stats)


@functools.cache
def _select_warp_kernel(nnei: int, cap: int, lanes: int, ntypes: int):
    import cupy

    opts = cuda.options(**select_defines(nnei, ntypes, cap, lanes))
    return cupy.RawKernel(cuda.load("select_nb_warp.cu"), "select_nb_warp", options=opts)


def select_neighbors_warp(
    xp, rcut, sel, sec, cpos, cidx, bstart, bcnt, epos, eown, etype, eidx, cap: int = WARP_CAP, consts=None
):
    """Same contract and results as :func:`select_neighbors`, one 32-thread block per centre.
    Centres with more than ``cap`` candidates within rcut are redone by select_neighbors."""
    n = int(cpos.shape[0])
    nnei = int(sum(sel))
    # every slot and flag is written by the kernel (spilled rows: emptied, then select_nb)
    owner = xp.empty((n, nnei), dtype=xp.int64)
    d = xp.empty((n, nnei, 3), dtype=xp.float64)
    over = xp.empty(n, dtype=bool)
    stats = xp.zeros(len(sel) + 1, dtype=xp.int32)
    if n == 0:
        return Selection(owner, d, over, stats)
    consts = _consts(xp, sel, sec, consts)
    spill = xp.zeros(n, dtype=bool)
    cpos = xp.ascontiguousarray(cpos, dtype=xp.float64)
    cidx = xp.ascontiguousarray(cidx, dtype=xp.int64)
    bstart = xp.ascontiguousarray(bstart, dtype=xp.int64)
    bcnt = xp.ascontiguousarray(bcnt, dtype=xp.int64)
    k = _select_warp_kernel(nnei, int(cap), WARP_LANES, len(sel))
    k(
        (n,),
        (WARP_LANES,),
        (
            xp.int64(n),
            xp.float64(rcut),
            cpos,
            cidx,
            bstart,
            bcnt,
            epos,
            eown,
            etype,
            eidx,
            *consts,
            owner,
            d,
            over,
            stats,
            spill,
        ),
    )
    # centres that spilled are redone by the one-thread kernel, masked: no host sync to find them
    return select_neighbors(
        xp,
        rcut,
        sel,
        sec,
        cpos,
        cidx,
        bstart,
        bcnt,
        epos,
        eown,
        etype,
        eidx,
        only=spill,
        out=Selection(owner, d, over, stats),
        consts=consts,
    )
