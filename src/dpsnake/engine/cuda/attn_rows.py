"""CUDA row kernels (CuPy RawModule, attn_rows.cu) for the (B, n, n) matrices of DPA-1's attention.

The array code of attention.py runs the chain between the two batched matmuls of a layer (shift and
scale of the logits by S = sw_i sw_j, masked softmax, row mask, gates S and R = r_i . r_j) and the
corresponding backward as about ten elementwise kernels each way, every one reading and writing a
whole (B, n, n) matrix: 63% of the GPU time of a se_atten_v2 force call was such kernels (torch
profiler, docs/benchmarks.md). Here one warp owns one row (n values in registers, K = ceil(n/32)
per lane): forward reads the logits once and writes T (in place) and A = T F; backward reads dA, T
and the recomputed logits once and updates dS, dR in place. S and R are recomputed from sw and r
(B, n) / (B, n, 3), never stored.

A chunk may run fewer slots n than the model's sel (attention.py: trailing empty slots left out);
with the smooth attention their softmax terms enter as ``npad`` = sel - n (attn_rows.cu, NPAD).

One module per (dtype, n, smooth, dotr, npad), cached. Tested without a GPU against the array code
(tests/test_engine_attn_rows.py: g++ with threaded warps, and NVRTC for sm_90).
"""

from __future__ import annotations

import numpy as np

from dpsnake.engine import cuda

WPB = 4  # warps (rows) per block


def defines(dtype: str, n: int, smooth: bool, dotr: bool, npad: int = 0) -> dict:
    """Compile-time constants of attn_rows.cu (``npad`` counts only when smooth)."""
    lowest = "(-3.4028234663852886e38f)" if dtype == "float32" else "(-1.7976931348623157e308)"
    return {
        "REAL": cuda.real(dtype),
        "N": int(n),
        "K": -(-int(n) // 32),
        "SMOOTH": int(bool(smooth)),
        "DOTR": int(bool(dotr)),
        "NPAD": int(npad) if smooth else 0,
        "WPB": WPB,
        "LOWEST": lowest,
    }


KERNELS = cuda.WarpKernels("attn_rows.cu", ("attn_fwd", "attn_bwd"), WPB)


def source(dtype: str, n: int, smooth: bool, dotr: bool, npad: int = 0) -> str:
    """attn_rows.cu with its constants as ``#define`` lines (one self-contained text, for the tests)."""
    return KERNELS.source(**defines(dtype, n, smooth, dotr, npad))


def build(dtype: str, n: int, smooth: bool, dotr: bool, npad: int = 0) -> dict:
    """The kernels for these constants, compiled on first use."""
    return KERNELS.build(**defines(dtype, n, smooth, dotr, npad))


def forward(L, sw, r, mask, smooth: bool, dotr: bool, npad: int = 0):
    """Masked softmax of the logits L (B, n, n) (C-contiguous; overwritten with T) and A = T F.

    sw (B, n) switch (read if smooth), r (B, n, 3) unit vectors (read if dotr), mask (B, n) bool, all
    C-contiguous, sw and r in L's dtype; ``npad`` empty keys left out (smooth: in each row's softmax).
    Returns (T, A); A is T itself when neither smooth nor dotr.
    """
    import cupy

    B, n, _ = L.shape
    rows = B * n
    A = cupy.empty_like(L) if (smooth or dotr) else L
    KERNELS.launch(
        "attn_fwd", rows, (L, sw, r, mask, np.int64(rows), L, A), **defines(L.dtype.name, n, smooth, dotr, npad)
    )
    return L, A


def backward(dA, T, Lq, sw, r, dS, dR, smooth: bool, dotr: bool, npad: int = 0):
    """dA (B, n, n) = dLoss/dA in, dLoss/dL out (in place; L the logits before the smooth shift);
    dS += its terms (if smooth; needs Lq, the logits recomputed), dR += its terms (if dotr). Unused
    arrays may be any array of the dtype (they are not read). The keys left out add nothing here (their
    dA F is 0); ``npad`` only picks forward's module."""
    B, n, _ = dA.shape
    rows = B * n
    args = (dA, T, Lq, sw, r, np.int64(rows), dS, dR)
    KERNELS.launch("attn_bwd", rows, args, **defines(dA.dtype.name, n, smooth, dotr, npad))
    return dA
