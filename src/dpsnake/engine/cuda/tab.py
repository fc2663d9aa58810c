"""CUDA kernels (CuPy RawModule, tab.cu) for tabulated embedding nets (tabulate.py): G is evaluated from
the table in registers and never stored, as in DeePMD-kit's tabulate_fusion_se_a kernels.

- forward: one block per centre, thread j owns column j of G: it walks the slots a..b of the
  centre and accumulates gr[c, j] += Rn[s, c] * G_j(Rn[s, 0]) (no reduction over threads). The
  slots' interval index and dx are computed once per block into shared memory, a tile at a time.
- backward: one block per centre, LPS lanes per slot (EngineSettings.tab_lps, default 8): each lane sums over its
  columns j of G and G', then the LPS lanes reduce with shuffles:
  gRn[s, c] = sum_j ggr[c, j] G_j + [c == 0] sum_j (sum_c' Rn[s, c'] ggr[c', j]) G'_j.

Table layout (nspline, 6, M): a warp's threads read consecutive columns of one coefficient.
Tested without a GPU like fused.py (tests/test_engine_tabulate.py: g++ with threaded warps, and
NVRTC for sm_90).
"""

from __future__ import annotations

import numpy as np

from dpsnake.engine import cuda

TILE = 128  # slots per forward tile (shared memory: TILE * (4 + 2) values)


def defines(dtype: str, M: int, lps: int) -> dict:
    """Compile-time constants of tab.cu."""
    return {"REAL": cuda.real(dtype), "M": int(M), "LPS": int(lps), "TILE": TILE}


def source(dtype: str, M: int, lps: int) -> str:
    """tab.cu with its constants as ``#define`` lines (one self-contained text, for the tests)."""
    return cuda.with_defines(cuda.load("tab.cu"), **defines(dtype, M, lps))


class TabKernels:
    """Forward and backward kernels of one tabulated net (same interface as fused.FusedNet)."""

    def __init__(self, tnet, dtype: str, lps: int = 8):
        """``lps``: lanes per slot of the backward (EngineSettings.tab_lps)."""
        import cupy

        self.dtype = np.float32 if dtype == "float32" else np.float64
        self.t = tnet.table
        self.coef = cupy.ascontiguousarray(tnet.coef, dtype=self.dtype)
        self.M = self.coef.shape[2]
        self.lps = int(lps)
        mod = cupy.RawModule(code=cuda.load("tab.cu"), options=cuda.options(**defines(dtype, self.M, self.lps)))
        self.fwd, self.bwd = mod.get_function("tab_fwd"), mod.get_function("tab_bwd")
        self.nsm = cupy.cuda.Device().attributes["MultiProcessorCount"]
        f = self.dtype
        self._bounds = (
            f(self.t.lower),
            f(self.t.upper),
            f(self.t.vmax),
            f(self.t.stride0),
            f(self.t.stride1),
            np.int32(self.t.nspline),
        )

    def forward(self, Rn, a: int, b: int, gr):
        """gr (n, 4, M) += sum over slots a:b of Rn[s, c] G(Rn[s, 0]) (C-contiguous arrays)."""
        n, nc = Rn.shape[0], Rn.shape[1]
        if n and b > a:
            threads = -(-self.M // 32) * 32
            self.fwd(
                (int(min(n, self.nsm * 16)),),
                (threads,),
                (Rn, np.int64(n), np.int32(nc), np.int32(a), np.int32(b), self.coef, *self._bounds, gr),
            )

    def backward(self, Rn, ggr, a: int, b: int, gRn):
        """gRn[:, a:b, :] = dL/dRn given ggr = dL/dgr (n, 4, M)."""
        n, nc = Rn.shape[0], Rn.shape[1]
        if n and b > a:
            self.bwd(
                (int(min(n, self.nsm * 16)),),
                (128,),
                (Rn, ggr, np.int64(n), np.int32(nc), np.int32(a), np.int32(b), self.coef, *self._bounds, gRn),
            )
