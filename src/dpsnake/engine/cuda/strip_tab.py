"""The tabulated geometric net of se_atten / se_atten_v2 in strip mode and its type gate as two CUDA kernels
(CuPy, strip_tab.cu), for compressed models with attention layers (``explore.compress``; the attention needs G):

- forward:  G = Gs(s) (1 + T[row] w), Gs from tabulate.py's table (DeePMD-kit's quintic pieces), written (slots, M);
- backward: from gG = dL/dG, dL/ds (s = Rn[..., 0]) and dL/dw = sum_j gG_j Gs_j T_j (with ``w``).

The same interface as cuda/strip_net.py's StripNet (attn/descriptor.py runs either). Without attention layers
cuda/tab.py's kernels keep G in registers instead. The array code runs the table as a gather of (slots, 6, M)
coefficients, einsums and the gate kernels: about eight passes over (slots, M) arrays; here one warp per slot
reads its interval's coefficients (L2-resident: nspline x 6 x M values) and writes G once, and the backward reads
gG once. H100, session 40 (docs/benchmarks.md "Session 40"): ~0.9 + 1.0 ms per model for 27,648 centres x 88 slots
(the FMA net: 1.35 + 2.94); a force call of 256 x 108 CuNi (attn_layer 2, mixed + TF32) 1.226 vs 1.347 us/atom with
the nets. Tested without a GPU (tests/test_engine_strip_tab.py: g++ with threaded warps against the array code, alone
and inside attn/descriptor.py; NVRTC for sm_90) and on the GPU (tests/test_engine_attn_tab_gpu.py).
"""

from __future__ import annotations

import numpy as np

from dpsnake.engine import cuda

WPB = 4  # warps (slots) per block
KERNELS = cuda.WarpKernels("strip_tab.cu", ("strip_tab_fwd", "strip_tab_bwd"), WPB)


def defines(dtype: str, M: int) -> dict:
    """Compile-time constants of strip_tab.cu."""
    return {"REAL": cuda.real(dtype), "M": int(M), "WPB": WPB}


def source(dtype: str, M: int) -> str:
    """strip_tab.cu with its constants as ``#define`` lines (one self-contained text, for the tests)."""
    return KERNELS.source(**defines(dtype, M))


class StripTab:
    """Forward and backward of a tabulated strip-mode Gs and its gate (a TabulatedNet of tabulate.py); compiled
    now (a failure raises: the caller's ``guarded``)."""

    def __init__(self, tnet, dtype: str):
        import cupy

        self.dtype = np.dtype(dtype)
        self.coef = cupy.ascontiguousarray(tnet.coef, dtype=self.dtype)  # (nspline, 6, M)
        self.M = int(self.coef.shape[2])
        t, f = tnet.table, self.dtype.type
        self._bounds = (f(t.lower), f(t.upper), f(t.vmax), f(t.stride0), f(t.stride1), np.int32(t.nspline))
        self._defs = defines(self.dtype.name, self.M)
        KERNELS.build(**self._defs)

    def _args(self, Rn, table, row, w):
        import cupy

        slots = Rn.size // 4
        wa = Rn if w is None else cupy.ascontiguousarray(w, dtype=self.dtype)
        args = (cupy.ascontiguousarray(Rn, dtype=self.dtype), np.int64(slots), self.coef, *self._bounds,
                cupy.ascontiguousarray(table, dtype=self.dtype), cupy.ascontiguousarray(row, dtype=np.int32), wa,
                np.int32(w is not None))  # fmt: skip
        return slots, args

    def forward(self, Rn, table, row, w):
        """G (..., M) from Rn (..., 4) (channel 0 the table's input), table (rows, M), row (...) int32, w (...)
        or None (1)."""
        import cupy

        slots, args = self._args(Rn, table, row, w)
        G = cupy.empty((*Rn.shape[:-1], self.M), dtype=self.dtype)
        KERNELS.launch("strip_tab_fwd", slots, args + (G,), **self._defs)
        return G

    def backward(self, Rn, gG, table, row, w):
        """(dL/dRn[..., 0] (...), dL/dw (...) or None without ``w``) from gG = dL/dG (..., M), the rest as
        :meth:`forward` takes them."""
        import cupy

        slots, args = self._args(Rn, table, row, w)
        gs = cupy.empty(Rn.shape[:-1], dtype=self.dtype)
        gw = cupy.empty(Rn.shape[:-1], dtype=self.dtype) if w is not None else gs
        gG = cupy.ascontiguousarray(gG, dtype=self.dtype)
        KERNELS.launch("strip_tab_bwd", slots, args + (gG, gs, gw), **self._defs)
        return gs, (gw if w is not None else None)
