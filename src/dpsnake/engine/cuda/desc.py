"""CUDA kernels (CuPy RawModule, desc.cu) for the se_e2_a descriptor D = gr^T gr[:, :axis] and its backward,
one block per centre with the centre's gr (4, M1) and dE/dD (M1, A) staged in shared memory.

They replace the elementwise kernels ``desc_D``, ``desc_ggr`` and ``desc_ggr_add`` of
elementwise.py (same sums in the same order), whose threads each re-read gr and dE/dD from global
memory with strided, uncoalesced loads (1.0 ms of a 256 x 108 atom call on an H200, ncu): here
every value is read from global memory once, coalesced, and the 3 launches become 2.

- forward ``desc_fwd``: D[c, p, q] = sum_k gr[c, k, p] gr[c, k, q] (p < M1, q < A).
- backward ``desc_bwd``: ggr[c, k, p] = scale (sum_q gr[c, k, q] gD[c, p, q]
  + [p < A] sum_m gr[c, k, m] gD[c, m, q=p]).
  Rows of gD are padded to A + 1 in shared memory, so the 32 threads of a warp (consecutive p)
  read 32 different banks.

Sizes are compile-time constants (one module per (dtype, M1, A), cached); ``supported`` says
whether the shared memory fits (48 KiB), else the elementwise kernels run. Tested without a GPU
like tab.py (tests/test_engine_descriptor_kernels.py: g++ with threaded blocks, and
NVRTC for sm_90).
"""

from __future__ import annotations

import functools

import numpy as np

from dpsnake.engine import cuda

THREADS = 128
SHARED_LIMIT = 48 * 1024


def shared_bytes(dtype: str, M1: int, A: int) -> int:
    return (4 * M1 + M1 * (A + 1)) * np.dtype(dtype).itemsize


def supported(dtype: str, M1: int, A: int) -> bool:
    return 0 < A <= M1 and shared_bytes(dtype, M1, A) <= SHARED_LIMIT


def defines(dtype: str, M1: int, A: int) -> dict:
    """Compile-time constants of desc.cu."""
    return {"REAL": cuda.real(dtype), "M1": int(M1), "A": int(A)}


def source(dtype: str, M1: int, A: int) -> str:
    """desc.cu with its constants as ``#define`` lines (one self-contained text, for the tests)."""
    return cuda.with_defines(cuda.load("desc.cu"), **defines(dtype, M1, A))


@functools.cache
def _module(dtype: str, M1: int, A: int):
    import cupy

    mod = cupy.RawModule(code=cuda.load("desc.cu"), options=cuda.options(**defines(dtype, M1, A)))
    nsm = cupy.cuda.Device().attributes["MultiProcessorCount"]
    return mod.get_function("desc_fwd"), mod.get_function("desc_bwd"), nsm


def _grid(n: int, nsm: int) -> tuple:
    return (int(min(n, nsm * 32)),)  # grid-stride over centres


def descriptor(xp, gr, A: int):
    """D (n, M1 * A) = gr^T gr[:, :, :A] per centre; gr (n, 4, M1) C-contiguous."""
    n, _, M1 = gr.shape
    D = xp.empty((n, M1, A), dtype=gr.dtype)
    if n:
        fwd, _, nsm = _module(gr.dtype.name, M1, A)
        fwd(_grid(n, nsm), (THREADS,), (gr, np.int64(n), D))
    return D.reshape(n, M1 * A)


def descriptor_grad(xp, gr, gD, scale: float):
    """dE/dgr (n, 4, M1) from gD = dE/dD (n, M1, A), times ``scale`` (1/nnei)."""
    n, _, M1 = gr.shape
    gD = xp.ascontiguousarray(gD)
    A = gD.shape[2]
    ggr = xp.empty_like(gr)
    if n:
        _, bwd, nsm = _module(gr.dtype.name, M1, A)
        bwd(_grid(n, nsm), (THREADS,), (gr, gD, np.int64(n), gr.dtype.type(scale), ggr))
    return ggr
