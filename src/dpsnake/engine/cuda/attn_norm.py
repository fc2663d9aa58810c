"""CUDA row kernels (CuPy RawModule, attn_norm.cu) for the per-row normalisations of DPA-1's attention layer:
the q/k/v normalisation (with in_proj's bias) and the LayerNorm after the residual, each forward and backward.

In the array code each is five to ten elementwise and reduction kernels over arrays of (B, n, 3H) or
(B, n, E) values, 0.5 GB each for a chunk of 4,608 centres with 120 slots and H = 128 in FP64: after the
attention matrices' own kernels (attn_rows.py), these passes were most of the remaining GPU time of a
se_atten_v2 force call (torch profiler, H200). Here one warp owns one row (D values in registers) and
each array is read and written once.

One module per (dtype, D), cached. Tested without a GPU against the array code
(tests/test_engine_attn_rows.py: g++ with threaded warps, and NVRTC for sm_90).
"""

from __future__ import annotations

import numpy as np

from dpsnake.engine import cuda

WPB = 4  # warps (rows) per block


def defines(dtype: str, D: int) -> dict:
    """Compile-time constants of attn_norm.cu."""
    return {"REAL": cuda.real(dtype), "D": int(D), "K": -(-int(D) // 32), "WPB": WPB}


KERNELS = cuda.WarpKernels("attn_norm.cu", ("qkv_fwd", "qkv_bwd", "ln_fwd", "ln_bwd"), WPB)


def source(dtype: str, D: int) -> str:
    """attn_norm.cu with its constants as ``#define`` lines (one self-contained text, for the tests)."""
    return KERNELS.source(**defines(dtype, D))


def build(dtype: str, D: int) -> dict:
    """The kernels for (dtype name, D), compiled on first use."""
    return KERNELS.build(**defines(dtype, D))


def _launch(name: str, dtype, D: int, rows: int, args: tuple) -> None:
    KERNELS.launch(name, rows, args, **defines(np.dtype(dtype).name, int(D)))


def qkv_forward(z, b_qkv):
    """z (3, B, n, H) C-contiguous: += b_qkv (3, 1, 1, H) or None, then each row divided by its norm,
    in place. Returns the inverse norms (3, B, n, 1)."""
    import cupy

    P = z.shape[1] * z.shape[2]
    inv = cupy.empty(z.shape[:3] + (1,), dtype=z.dtype)
    bias = z if b_qkv is None else cupy.ascontiguousarray(b_qkv)
    _launch(
        "qkv_fwd", z.dtype, z.shape[3], 3 * P, (z, bias, np.int32(b_qkv is not None), np.int64(3 * P), np.int64(P), inv)
    )
    return inv


def qkv_backward(dz, z, inv, scaling: float):
    """dz (3, B, n, H) = df/d(normalized q, k, v) in (the q and k parts before their ``scaling``), df/d(z
    before normalisation) out, in place."""
    P = dz.shape[1] * dz.shape[2]
    _launch("qkv_bwd", dz.dtype, dz.shape[3], 3 * P, (dz, z, inv, np.int64(3 * P), np.int64(P), dz.dtype.type(scaling)))
    return dz


def ln_forward(h, b_out, x, gamma, beta, eps: float):
    """LayerNorm of h + b_out + x over the last axis; h (B, n, E) C-contiguous is overwritten with xhat.
    Returns (out, xhat, rstd (B, n, 1))."""
    import cupy

    rows, E = h.shape[0] * h.shape[1], h.shape[2]
    rstd = cupy.empty(h.shape[:2] + (1,), dtype=h.dtype)
    out = cupy.empty_like(h)
    b = h if b_out is None else b_out
    x = cupy.ascontiguousarray(x)
    args = (h, b, np.int32(b_out is not None), x, gamma, beta, h.dtype.type(eps), np.int64(rows), rstd, out)
    _launch("ln_fwd", h.dtype, E, rows, args)
    return out, h, rstd


def ln_backward(dout, xhat, rstd, gamma):
    """df/dh (B, n, E) of the LayerNorm from dout = df/dout."""
    import cupy

    rows, E = xhat.shape[0] * xhat.shape[1], xhat.shape[2]
    dh = cupy.empty_like(xhat)
    _launch("ln_bwd", xhat.dtype, E, rows, (cupy.ascontiguousarray(dout), xhat, rstd, gamma, np.int64(rows), dh))
    return dh
