"""CUDA kernels (CuPy RawKernel) for the hot spots of the engine on NVIDIA GPUs.

Used only for CuPy inputs and only if ``DPSNAKE_KERNELS`` is not "0"; the NumPy/CuPy array code in
neighbor.py / descriptor.py is the reference they are tested against (same selection, same math).
"""

from __future__ import annotations

import contextlib
import functools
import os

import numpy as np

# the parameters both selection kernels share (same contract: select_neighbors' docstring)
_SELECT_PARAMS = r"""
    const long long n, const double rcut,
    const double* __restrict__ cpos, const long long* __restrict__ cidx,
    const long long* __restrict__ bstart, const long long* __restrict__ bcnt,
    const double* __restrict__ epos, const long long* __restrict__ eown,
    const long long* __restrict__ etype, const long long* __restrict__ eidx,
    const int* __restrict__ sel, const int* __restrict__ sec,
    long long* __restrict__ owner, double* __restrict__ dout, bool* __restrict__ over,
    int* __restrict__ stats,"""

_SELECT_SRC = (
    r"""
#define NNEI %(nnei)d
#define NT %(ntypes)d
extern "C" __global__ void select_nb("""
    + _SELECT_PARAMS
    + r"""
    const bool* __restrict__ only, const long long use_only)
{
    long long i = (long long)blockDim.x * blockIdx.x + threadIdx.x;
    if (i >= n || (use_only && !only[i])) return;
    double rl[NNEI];
    long long jl[NNEI];
    int m = 0;
    long long within = 0;
    const double cx = cpos[3 * i], cy = cpos[3 * i + 1], cz = cpos[3 * i + 2];
    const long long self = cidx[i];
    for (int b = 0; b < 27; ++b) {
        const long long s = bstart[27 * i + b], e = s + bcnt[27 * i + b];
        for (long long k = s; k < e; ++k) {
            const double dx = epos[3 * k] - cx, dy = epos[3 * k + 1] - cy, dz = epos[3 * k + 2] - cz;
            const double r = sqrt(dx * dx + dy * dy + dz * dz);
            if (r > rcut || eidx[k] == self) continue;
            ++within;
            if (m == NNEI && r >= rl[NNEI - 1]) continue;
            int p = (m < NNEI) ? m : NNEI - 1;
            while (p > 0 && rl[p - 1] > r) { rl[p] = rl[p - 1]; jl[p] = jl[p - 1]; --p; }
            rl[p] = r; jl[p] = k;
            if (m < NNEI) ++m;
        }
    }
    int cnt[NT];
    for (int t = 0; t < NT; ++t) cnt[t] = 0;
    bool of = within > NNEI;
    for (int p = 0; p < m; ++p) {
        const long long k = jl[p];
        const int t = (int)etype[k];
        if (cnt[t] < sel[t]) {
            const long long slot = (long long)NNEI * i + sec[t] + cnt[t];
            owner[slot] = eown[k];
            dout[3 * slot] = epos[3 * k] - cx;
            dout[3 * slot + 1] = epos[3 * k + 1] - cy;
            dout[3 * slot + 2] = epos[3 * k + 2] - cz;
            ++cnt[t];
        } else {
            of = true;
        }
    }
    over[i] = of;
    for (int t = 0; t < NT; ++t) if (cnt[t]) atomicMax(&stats[t], cnt[t]);
    if (of) atomicAdd(&stats[NT], 1);
}
"""
)


# Default (DPSNAKE_SELECT=thread falls back to one thread per centre; checked on an H100 2026-11-21:
# NumPy vs CuPy 7.2e-15 FP64 / 1.6e-6 mixed on five models, 12% faster batched): one 32-thread block per
# centre. Lanes test the candidates in parallel and append those within rcut to shared memory with
# their enumeration order; each kept candidate's rank by (r, order) and its rank within its type are
# counted, which reproduces select_nb's stable insertion sort exactly. A centre with more than CAP
# candidates within rcut is flagged in ``spill`` and redone by select_nb.
_SELECT_WARP_SRC = (
    r"""
#define NNEI %(nnei)d
#define NT %(ntypes)d
#define CAP %(cap)d
#define LANES %(lanes)d
extern "C" __global__ void select_nb_warp("""
    + _SELECT_PARAMS
    + r"""
    bool* __restrict__ spill)
{
    __shared__ double sr[CAP];
    __shared__ long long sk[CAP];
    __shared__ int so[CAP];
    __shared__ int st[CAP];
    __shared__ int srank[CAP];
    __shared__ int scnt;
    __shared__ int sof;
    __shared__ int skept[NT];
    const long long i = blockIdx.x;
    const int lane = threadIdx.x;
    if (i >= n) return;
    if (lane == 0) { scnt = 0; sof = 0; }
    for (int t = lane; t < NT; t += LANES) skept[t] = 0;
    __syncthreads();
    const double cx = cpos[3 * i], cy = cpos[3 * i + 1], cz = cpos[3 * i + 2];
    const long long self = cidx[i];
    long long base = 0;
    for (int b = 0; b < 27; ++b) {
        const long long s = bstart[27 * i + b], c = bcnt[27 * i + b];
        for (long long q = lane; q < c; q += LANES) {
            const long long k = s + q;
            const double dx = epos[3 * k] - cx, dy = epos[3 * k + 1] - cy, dz = epos[3 * k + 2] - cz;
            const double r = sqrt(dx * dx + dy * dy + dz * dz);
            if (r > rcut || eidx[k] == self) continue;
            const int p = atomicAdd(&scnt, 1);
            if (p < CAP) { sr[p] = r; sk[p] = k; so[p] = (int)(base + q); st[p] = (int)etype[k]; }
        }
        base += c;
    }
    __syncthreads();
    const int m = scnt;
    if (m > CAP) {  // uniform over the block: every lane leaves here (select_nb fills the row)
        for (int q = lane; q < NNEI; q += LANES) {
            const long long slot = (long long)NNEI * i + q;
            owner[slot] = -1;
            dout[3 * slot] = 0.0; dout[3 * slot + 1] = 0.0; dout[3 * slot + 2] = 0.0;
        }
        if (lane == 0) spill[i] = true;
        return;
    }
    for (int j = lane; j < m; j += LANES) {
        const double rj = sr[j];
        const int oj = so[j];
        int rank = 0;
        for (int l = 0; l < m; ++l) rank += (sr[l] < rj || (sr[l] == rj && so[l] < oj)) ? 1 : 0;
        srank[j] = rank;
    }
    __syncthreads();
    for (int j = lane; j < m; j += LANES) {
        const int rj = srank[j];
        if (rj >= NNEI) continue;
        const int t = st[j];
        int c = 0;
        for (int l = 0; l < m; ++l) c += (st[l] == t && srank[l] < rj) ? 1 : 0;
        if (c < sel[t]) {
            const long long k = sk[j];
            const long long slot = (long long)NNEI * i + sec[t] + c;
            owner[slot] = eown[k];
            dout[3 * slot] = epos[3 * k] - cx;
            dout[3 * slot + 1] = epos[3 * k + 1] - cy;
            dout[3 * slot + 2] = epos[3 * k + 2] - cz;
            atomicMax(&skept[t], c + 1);
        } else {
            sof = 1;
        }
    }
    __syncthreads();
    // the empty slots of the row (the outputs are not prefilled): block t keeps skept[t] slots
    for (int q = lane; q < NNEI; q += LANES) {
        int t = 0;
        while (t < NT - 1 && q >= sec[t + 1]) ++t;
        if (q - sec[t] >= skept[t]) {
            const long long slot = (long long)NNEI * i + q;
            owner[slot] = -1;
            dout[3 * slot] = 0.0; dout[3 * slot + 1] = 0.0; dout[3 * slot + 2] = 0.0;
        }
    }
    const bool of = (m > NNEI) || (sof != 0);
    if (lane == 0) over[i] = of;
    if (lane == 0 && of) atomicAdd(&stats[NT], 1);
    for (int t = lane; t < NT; t += LANES) if (skept[t]) atomicMax(&stats[t], skept[t]);
}
"""
)
WARP_LANES = 32
WARP_CAP = 256


def select_mode() -> str:
    """Neighbour-selection kernel: "warp" (default, one 32-thread block per centre) or "thread"
    (DPSNAKE_SELECT=thread, one thread per centre)."""
    from dpsnake.engine.elementwise import _broken

    if "select_warp" in _broken:
        return "thread"
    return "thread" if os.environ.get("DPSNAKE_SELECT", "warp") == "thread" else "warp"


def enabled(xp) -> bool:
    """Custom kernels are used for CuPy arrays unless DPSNAKE_KERNELS=0."""
    return xp.__name__ == "cupy" and os.environ.get("DPSNAKE_KERNELS", "1") != "0"


def fused_enabled(xp, dtype: str) -> bool:
    """Fused embedding kernels (fused.py): DPSNAKE_FUSED = "auto" (default: FP32 nets only),
    "1" (FP32 and FP64), "0" (the cuBLAS array code). H100, 2026-11-21, 256 x 108 atoms: FP32
    20.2 -> 15.9 ms per call with them; FP64 24.9 -> 36.5 ms, hence off there."""
    if not enabled(xp):
        return False
    mode = os.environ.get("DPSNAKE_FUSED", "auto")
    return mode == "1" or (mode == "auto" and dtype == "float32")


def tabulate_enabled(xp) -> bool:
    """Kernels for tabulated embedding nets (tabulate_kernels.py): on with the CUDA kernels unless
    DPSNAKE_FUSED = "0" (then the array code of tabulate.py runs)."""
    return enabled(xp) and os.environ.get("DPSNAKE_FUSED", "auto") != "0"


@contextlib.contextmanager
def tf32_gemms(xp, dtype):
    """Within: FP32 cuBLAS GEMMs of CuPy may use TF32 tensor cores, if DPSNAKE_TF32=1 (off by
    default; the fitting nets use it; accuracy in docs/benchmarks.md). A no-op otherwise."""
    if not (os.environ.get("DPSNAKE_TF32") == "1" and enabled(xp) and np.dtype(dtype) == np.float32):
        yield
        return
    from cupy._core import _routines_linalg as linalg

    old = linalg.get_compute_type(np.float32)
    linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32)
    try:
        yield
    finally:
        linalg.set_compute_type(np.float32, old)


@functools.cache
def _select_kernel(nnei: int, ntypes: int):
    import cupy

    return cupy.RawKernel(_SELECT_SRC % {"nnei": nnei, "ntypes": ntypes}, "select_nb")


def _consts(xp, sel, sec):
    """sel, sec[:-1] as int32 device arrays, copied once (:func:`xp.device_const`)."""
    from dpsnake.engine.xp import device_const  # NumPy: the kernels' CPU emulation (tests)

    return (device_const(xp, np.asarray(sel, dtype=np.int32)), device_const(xp, np.asarray(sec[:-1], dtype=np.int32)))


def select_neighbors(xp, rcut, sel, sec, cpos, cidx, bstart, bcnt, epos, eown, etype, eidx, only=None, out=None):
    """Kernel version of the distance-sorted, type-split selection of NeighborBuilder.chunk.

    cpos (n, 3) centre positions; cidx (n,) their ext indices; bstart/bcnt (n, 27) candidate ranges
    in the bin-sorted ext arrays epos (E, 3), eown, etype, eidx (E,). Returns owner (n, nnei) int64
    (-1 empty), d (n, nnei, 3) float64, overflow (n,) bool, stats (ntypes + 1,) int32: the most
    slots any centre fills in each type block, then the number of centres that lost neighbours
    (what compaction and the overflow warning need, read in one copy). ``only`` (n,) bool: do just
    those centres, writing into ``out`` = (owner, d, overflow, stats) (no host sync to find them).
    """
    n = int(cpos.shape[0])
    nnei = int(sum(sel))
    if out is None:
        out = (
            xp.full((n, nnei), -1, dtype=xp.int64),
            xp.zeros((n, nnei, 3), dtype=xp.float64),
            xp.zeros(n, dtype=bool),
            xp.zeros(len(sel) + 1, dtype=xp.int32),
        )
    owner, d, over, stats = out
    if n == 0:
        return owner, d, over, stats
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
        *_consts(xp, sel, sec),
        owner,
        d,
        over,
        stats,
        over if only is None else only,
        xp.int64(only is not None),
    )
    k(((n + threads - 1) // threads,), (threads,), args)
    return owner, d, over, stats


@functools.cache
def _select_warp_kernel(nnei: int, cap: int, lanes: int, ntypes: int):
    import cupy

    return cupy.RawKernel(
        _SELECT_WARP_SRC % {"nnei": nnei, "cap": cap, "lanes": lanes, "ntypes": ntypes}, "select_nb_warp"
    )


def select_neighbors_warp(xp, rcut, sel, sec, cpos, cidx, bstart, bcnt, epos, eown, etype, eidx, cap: int = WARP_CAP):
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
        return owner, d, over, stats
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
            *_consts(xp, sel, sec),
            owner,
            d,
            over,
            stats,
            spill,
        ),
    )
    # centres that spilled are redone by the one-thread kernel, masked: no host sync to find them
    return select_neighbors(
        xp, rcut, sel, sec, cpos, cidx, bstart, bcnt, epos, eown, etype, eidx, only=spill, out=(owner, d, over, stats)
    )
