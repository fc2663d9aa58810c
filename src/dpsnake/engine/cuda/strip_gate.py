"""CUDA kernels (CuPy RawModule, strip_gate.cu) for the type gate of se_atten / se_atten_v2 in strip mode:
G = Gs (1 + T w) and its backward, one warp per neighbour slot.

The array code (attn/descriptor.py) gathers the strip table per slot into a (centres, slots, D) array and
runs four passes over such arrays forward and six backward: 70 KB per atom each for D = 100 in FP64 with
88 slots. Here each kernel reads and writes every (slots, D) array once and the table stays in cache.

One module per (dtype, D), cached. Tested without a GPU against the array code
(tests/test_engine_strip_gate.py: g++ with threaded warps, and NVRTC for sm_90).
"""

from __future__ import annotations

import numpy as np

from dpsnake.engine import cuda

WPB = 4  # warps (slots) per block


def defines(dtype: str, D: int) -> dict:
    """Compile-time constants of strip_gate.cu."""
    return {"REAL": cuda.real(dtype), "D": int(D), "WPB": WPB}


KERNELS = cuda.WarpKernels("strip_gate.cu", ("strip_fwd", "strip_bwd"), WPB)


def source(dtype: str, D: int) -> str:
    """strip_gate.cu with its constants as ``#define`` lines (one self-contained text, for the tests)."""
    return KERNELS.source(**defines(dtype, D))


def build(dtype: str, D: int) -> dict:
    """The kernels for (dtype name, D), compiled on first use."""
    return KERNELS.build(**defines(dtype, D))


def _launch(name: str, dtype, D: int, slots: int, args: tuple) -> None:
    KERNELS.launch(name, slots, args, **defines(np.dtype(dtype).name, int(D)))


def forward(Gs, table, row, w):
    """G (..., D) = Gs (1 + table[row] w): Gs (..., D) C-contiguous, table (rows, D), row (...) int32,
    w (...) or None (1). All of one float dtype but row."""
    import cupy

    D, slots = Gs.shape[-1], Gs.size // Gs.shape[-1]
    G = cupy.empty_like(Gs)
    wa = Gs if w is None else cupy.ascontiguousarray(w, dtype=Gs.dtype)
    args = (Gs, cupy.ascontiguousarray(table), cupy.ascontiguousarray(row, dtype=np.int32), wa)
    _launch("strip_fwd", Gs.dtype, D, slots, args + (np.int32(w is not None), np.int64(slots), G))
    return G


def backward(gG, Gs, table, row, w):
    """(df/dGs (..., D), df/dw (...) or None without ``w``) from gG = df/dG, as :func:`forward` takes them."""
    import cupy

    D, slots = Gs.shape[-1], Gs.size // Gs.shape[-1]
    gin = cupy.empty_like(Gs)
    gw = cupy.empty(Gs.shape[:-1], dtype=Gs.dtype) if w is not None else gin
    wa = Gs if w is None else cupy.ascontiguousarray(w, dtype=Gs.dtype)
    args = (cupy.ascontiguousarray(gG), Gs, cupy.ascontiguousarray(table), cupy.ascontiguousarray(row, dtype=np.int32))
    _launch("strip_bwd", Gs.dtype, D, slots, args + (wa, np.int32(w is not None), np.int64(slots), gin, gw))
    return gin, (gw if w is not None else None)
