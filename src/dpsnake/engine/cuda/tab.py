"""CUDA kernels (CuPy RawModule, tab.cu) for tabulated embedding nets (tabulate.py): G is evaluated from
the table in registers and never stored, as in DeePMD-kit's tabulate_fusion_se_a kernels.

- forward: one block per centre, thread j owns column j of G: it walks the slots a..b of the
  centre and accumulates gr[c, j] += Rn[s, c] * G_j(Rn[s, 0]) (no reduction over threads). The
  slots' interval index and dx are computed once per block into shared memory, a tile at a time.
- backward: one block per centre, LPS lanes per slot (EngineSettings.tab_lps, default 8): each lane sums over its
  columns j of G and G', then the LPS lanes reduce with shuffles:
  gRn[s, c] = sum_j ggr[c, j] G_j + [c == 0] sum_j (sum_c' Rn[s, c'] ggr[c', j]) G'_j.

se_atten strip mode (``strip_table`` given; tab.cu compiled with STRIP): G_j = Gs_j(x_s) (1 + w_s
TT[k_s, j]) with a weight w_s (sw * mask in smooth_type_embedding mode, else 1) and a type-pair row
k_s (int32) per slot; the backward also writes gw_s = dL/dw_s = sum_j (sum_c Rn[s, c] ggr[c, j]) Gs_j
TT[k_s, j] (sw depends on r). Without STRIP the kernels are the se_e2_a ones, unchanged.

Table layout (nspline, 6, M): a warp's threads read consecutive columns of one coefficient.
Tested without a GPU like fused.py (tests/test_engine_tabulate.py: g++ with threaded warps, and
NVRTC for sm_90).
"""

from __future__ import annotations

import numpy as np

from dpsnake.engine import cuda

TILE = 128  # slots per forward tile (shared memory: TILE * (4 + 2) values)


def defines(dtype: str, M: int, lps: int, strip: bool = False) -> dict:
    """Compile-time constants of tab.cu (``strip``: the se_atten strip-mode variant)."""
    d = {"REAL": cuda.real(dtype), "M": int(M), "LPS": int(lps), "TILE": TILE}
    return {**d, "STRIP": 1} if strip else d


def source(dtype: str, M: int, lps: int, strip: bool = False) -> str:
    """tab.cu with its constants as ``#define`` lines (one self-contained text, for the tests)."""
    return cuda.with_defines(cuda.load("tab.cu"), **defines(dtype, M, lps, strip))


class TabKernels:
    """Forward and backward kernels of one tabulated net (same interface as fused.FusedNet)."""

    def __init__(self, tnet, dtype: str, lps: int = 8, strip_table=None):
        """``lps``: lanes per slot of the backward (EngineSettings.tab_lps); ``strip_table``: the
        (rows, M) type-pair table of se_atten strip mode (then forward / backward take w, krow)."""
        import cupy

        self.dtype = np.float32 if dtype == "float32" else np.float64
        self.t = tnet.table
        self.coef = cupy.ascontiguousarray(tnet.coef, dtype=self.dtype)
        self.M = self.coef.shape[2]
        self.lps = int(lps)
        strip = strip_table is not None
        self.strip = None if not strip else cupy.ascontiguousarray(strip_table, dtype=self.dtype)
        opts = cuda.options(**defines(dtype, self.M, self.lps, strip))
        mod = cupy.RawModule(code=cuda.load("tab.cu"), options=opts)
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

    def _strip_args(self, w, krow) -> tuple:
        return () if self.strip is None else (w, krow, self.strip)

    def forward(self, Rn, a: int, b: int, gr, w=None, krow=None):
        """gr (n, 4, M) += sum over slots a:b of Rn[s, c] G(Rn[s, 0]) (C-contiguous arrays; strip
        mode: w (n, nc) net dtype, krow (n, nc) int32)."""
        n, nc = Rn.shape[0], Rn.shape[1]
        if n and b > a:
            threads = -(-self.M // 32) * 32
            self.fwd(
                (int(min(n, self.nsm * 16)),),
                (threads,),
                (Rn, np.int64(n), np.int32(nc), np.int32(a), np.int32(b), self.coef, *self._bounds)
                + self._strip_args(w, krow)
                + (gr,),
            )

    def backward(self, Rn, ggr, a: int, b: int, gRn, w=None, krow=None, gw=None):
        """gRn[:, a:b, :] = dL/dRn given ggr = dL/dgr (n, 4, M); strip mode also gw[:, a:b] =
        dL/dw (n, nc)."""
        n, nc = Rn.shape[0], Rn.shape[1]
        if n and b > a:
            self.bwd(
                (int(min(n, self.nsm * 16)),),
                (128,),
                (Rn, ggr, np.int64(n), np.int32(nc), np.int32(a), np.int32(b), self.coef, *self._bounds)
                + self._strip_args(w, krow)
                + ((gRn,) if self.strip is None else (gRn, gw)),
            )
