"""Fused FP64 attention core of DPA-1 (CuPy RawModule, attn_core.cu): a block per centre.

With the row kernels (attn_rows.py) a layer still ran q k^T, A v and, backward, five more batched
products as cuBLAS calls on (B, n, n) matrices in device memory: 88 x 88 outputs fill cuBLAS's
64 x 128 FP64 tiles to 47% (~16 TFLOP/s estimated, docs/benchmarks.md), and every matrix is written
and read again. Here one block per centre runs the products on FP64 tensor cores (PTX
``mma.m8n8k4.f64``, a warp per 8 rows) and keeps its (n, n) matrices in the warps' registers, where
the row chain runs (a row is 4 lanes): forward q k^T, the row chain, A v; backward q k^T and do v^T,
the row chain and its gradient (dS, dR folded into d sw, d r per centre), dL k, and A^T do, dL^T q
through shared memory (one (n, n) matrix); each product's b operand staged in shared memory. The
forward keeps nothing; backward recomputes T.

Measured on an H200 (docs/benchmarks.md, "A fused FP64 attention core"): 13 TFLOP/s, a force call 1.07x
slower than cuBLAS + the row kernels, 19% less memory; so the family ``attn_core`` is opt-in
(``settings.DEFAULT_FAST`` leaves it out). What it lacks: asynchronous staging and two blocks per SM.

FP64 only (FP32 has no such tensor-core product at full precision: mixed precision keeps the row
kernels), n and H multiples of 8, n <= :data:`MAX_SLOTS`, the shared memory within 227 KiB;
:func:`supported` says why not otherwise. Tested without a GPU (g++ with threaded warps and an emulated
``mma``; NVRTC for sm_90): tests/test_engine_attn_core.py; on a GPU: tests/test_engine_attn_gpu.py.
"""

from __future__ import annotations

import functools

import numpy as np

from dpsnake.engine import cuda

KERNELS = ("attn_core_fwd", "attn_core_bwd")


SMEM_LIMIT = 227 * 1024  # bytes of shared memory a block may have on sm_80 / sm_90
MAX_SLOTS = 96  # a lane keeps 3 x n / 4 values of the (n, n) matrices in registers backward


def smem_bytes(n: int, H: int, backward: bool) -> int:
    """Dynamic shared memory of a block: a staged (n, H) operand; backward also one (n, n) matrix and
    4 n sums."""
    return 8 * (n * (H + 4) + ((n * (n + 1) + 4 * n) if backward else 0))


def supported(dtype, n: int, H: int) -> str | None:
    """None if the fused core runs this layer, else why not (one short phrase)."""
    if np.dtype(dtype) != np.float64:
        return "FP64 only"
    if n % 8 or H % 8:
        return f"slots {n} and width {H} must be multiples of 8"
    if n > MAX_SLOTS:
        return f"{n} slots, more than {MAX_SLOTS} (registers)"
    if smem_bytes(n, H, True) > SMEM_LIMIT:
        return f"width {H} needs {smem_bytes(n, H, True)} bytes of shared memory"
    return None


def _key(n: int, H: int, smooth: bool, dotr: bool, npad: int = 0) -> tuple:
    """The constants as one module's cache key (``npad`` counts only when smooth)."""
    return int(n), int(H), bool(smooth), bool(dotr), int(npad) if smooth else 0


def defines(n: int, H: int, smooth: bool, dotr: bool, npad: int = 0) -> dict:
    """Compile-time constants of attn_core.cu."""
    n, H, smooth, dotr, npad = _key(n, H, smooth, dotr, npad)
    return {"N": n, "H": H, "SMOOTH": int(smooth), "DOTR": int(dotr), "NPAD": npad}


def source(n: int, H: int, smooth: bool, dotr: bool, npad: int = 0) -> str:
    """attn_core.cu with its constants as ``#define`` lines (one self-contained text, for the tests)."""
    return cuda.with_defines(cuda.load("attn_core.cu"), **defines(n, H, smooth, dotr, npad))


def _module(n: int, H: int, smooth: bool, dotr: bool, npad: int):
    """({kernel: RawKernel}, grid cap) for these constants on the current device, compiled once; the kernels
    may use all the shared memory they need (an attribute of each device's function: hence one entry per device)."""
    import cupy

    return _device_module(n, H, smooth, dotr, npad, cupy.cuda.runtime.getDevice())


@functools.cache
def _device_module(n: int, H: int, smooth: bool, dotr: bool, npad: int, device: int):
    import cupy

    mod = cupy.RawModule(code=cuda.load("attn_core.cu"), options=cuda.options(**defines(n, H, smooth, dotr, npad)))
    fns = {k: mod.get_function(k) for k in KERNELS}
    fns["attn_core_fwd"].max_dynamic_shared_size_bytes = smem_bytes(n, H, False)
    fns["attn_core_bwd"].max_dynamic_shared_size_bytes = smem_bytes(n, H, True)
    nsm = cupy.cuda.Device().attributes["MultiProcessorCount"]
    return fns, 8 * nsm


def build(n: int, H: int, smooth: bool, dotr: bool, npad: int = 0) -> dict:
    """The kernels for these constants, compiled on first use (raises what NVRTC raises)."""
    return _module(*_key(n, H, smooth, dotr, npad))[0]


def _launch(kernel: str, B: int, n: int, H: int, smooth, dotr, npad, args) -> None:
    if B:
        fns, cap = _module(*_key(n, H, smooth, dotr, npad))
        grid = int(min(B, cap))
        fns[kernel]((grid,), (4 * n,), args, shared_mem=smem_bytes(n, H, kernel.endswith("bwd")))


def forward(z, sw, r, mask, scale: float, smooth: bool, dotr: bool, npad: int = 0):
    """o = A v (B, n, H) of one layer from its normalized q, k, v ``z`` (3, B, n, H), C-contiguous FP64;
    sw (B, n), r (B, n, 3), mask (B, n) bool as attn_rows.forward reads them; ``scale`` the query
    scale s. The (B, n, n) matrices are never stored."""
    import cupy

    _, B, n, H = z.shape
    o = cupy.empty((B, n, H), dtype=z.dtype)
    _launch("attn_core_fwd", B, n, H, smooth, dotr, npad, (z, sw, r, mask, np.int64(B), np.float64(scale), o))
    return o


def backward(z, do, sw, r, mask, scale: float, dz, dsw, dr, smooth: bool, dotr: bool, npad: int = 0):
    """From do = dLoss/do (B, n, H): writes dz (3, B, n, H) = (dL k, dL^T q, A^T do) (the first two
    without the scale, as attention.py's q/k/v backward expects) and adds the layer's terms to
    dsw (B, n) (if smooth) and dr (B, n, 3) (if dotr); all C-contiguous FP64."""
    _, B, n, H = z.shape
    args = (z, do, sw, r, mask, np.int64(B), np.float64(scale), dz, dsw, dr)
    _launch("attn_core_bwd", B, n, H, smooth, dotr, npad, args)
    return dz
