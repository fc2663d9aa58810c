"""CUDA kernels (CuPy RawModule) for tabulated embedding nets (tabulate.py): G is evaluated from
the table in registers and never stored, as in DeePMD-kit's tabulate_fusion_se_a kernels.

- forward: one block per centre, thread j owns column j of G: it walks the slots a..b of the
  centre and accumulates gr[c, j] += Rn[s, c] * G_j(Rn[s, 0]) (no reduction over threads). The
  slots' interval index and dx are computed once per block into shared memory, a tile at a time.
- backward: one block per centre, LPS lanes per slot (TAB_LPS, default 8): each lane sums over its
  columns j of G and G', then the LPS lanes reduce with shuffles:
  gRn[s, c] = sum_j ggr[c, j] G_j + [c == 0] sum_j (sum_c' Rn[s, c'] ggr[c', j]) G'_j.

Table layout (nspline, 6, M): a warp's threads read consecutive columns of one coefficient.
Tested without a GPU like fused.py (tests/test_engine_tabulate.py: g++ with threaded warps, and
NVRTC for sm_90).
"""

from __future__ import annotations

import os

import numpy as np

TILE = 128  # slots per forward tile (shared memory: TILE * (4 + 2) values)


def lanes_per_slot() -> int:
    lps = int(os.environ.get("DPSNAKE_TAB_LPS", "8"))
    if lps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"DPSNAKE_TAB_LPS={lps} is not a power of two <= 32")
    return lps


def source(dtype: str, M: int, lps: int) -> str:
    T = "float" if dtype == "float32" else "double"
    shuffles = "\n".join(
        f"        for (int q = 0; q < 5; ++q) acc[q] += __shfl_xor_sync(0xffffffffu, acc[q], {o});"
        for o in (16, 8, 4, 2, 1)
        if o < lps
    )
    return f"""
typedef {T} T;
#define M {M}
#define LPS {lps}
#define TILE {TILE}

/* DeePMD-kit's locate_xx_se_a: interval of x and x - its left node (0 outside the table) */
__device__ __forceinline__ int locate(T& x, const T lower, const T upper, const T vmax,
                                      const T s0, const T s1, const int nspline) {{
    int k;
    if (x < lower) {{ k = 0; x = (T)0; }}
    else if (x < upper) {{ k = (int)((x - lower) / s0); x -= k * s0 + lower; }}
    else if (x < vmax) {{
        const int first = (int)((upper - lower) / s0);
        k = first + (int)((x - upper) / s1);
        x -= (k - first) * s1 + upper;
    }} else if (x >= vmax) {{ k = (int)((upper - lower) / s0) + (int)((vmax - upper) / s1) - 1; x = (T)0; }}
    else k = 0;  /* NaN: stays NaN, so does G (as in the array code) */
    return k < 0 ? 0 : (k >= nspline ? nspline - 1 : k);
}}

extern "C" __global__ void tab_fwd(
    const T* __restrict__ Rn, const long long n, const int nc, const int a, const int b,
    const T* __restrict__ tab, const T lower, const T upper, const T vmax, const T s0, const T s1,
    const int nspline, T* __restrict__ gr)
{{
    __shared__ T sr[TILE * 4];
    __shared__ T sdx[TILE];
    __shared__ int sk[TILE];
    const int j = threadIdx.x;
    for (long long i = blockIdx.x; i < n; i += gridDim.x) {{
        T acc0 = (T)0, acc1 = (T)0, acc2 = (T)0, acc3 = (T)0;
        for (int base = a; base < b; base += TILE) {{
            const int cnt = min(TILE, b - base);
            __syncthreads();
            for (int t = threadIdx.x; t < cnt; t += blockDim.x) {{
                const T* p = Rn + (i * nc + base + t) * 4;
                T x = p[0];
                sr[4 * t] = x; sr[4 * t + 1] = p[1]; sr[4 * t + 2] = p[2]; sr[4 * t + 3] = p[3];
                sk[t] = locate(x, lower, upper, vmax, s0, s1, nspline);
                sdx[t] = x;
            }}
            __syncthreads();
            if (j < M) {{
                #pragma unroll 4
                for (int t = 0; t < cnt; ++t) {{
                    const T* c = tab + (long long)sk[t] * 6 * M + j;
                    const T x = sdx[t];
                    const T g = c[0] + x * (c[M] + x * (c[2 * M] + x * (c[3 * M] + x * (c[4 * M] + x * c[5 * M]))));
                    acc0 += sr[4 * t] * g; acc1 += sr[4 * t + 1] * g;
                    acc2 += sr[4 * t + 2] * g; acc3 += sr[4 * t + 3] * g;
                }}
            }}
        }}
        if (j < M) {{
            T* o = gr + i * 4 * M + j;
            o[0] += acc0; o[M] += acc1; o[2 * M] += acc2; o[3 * M] += acc3;
        }}
    }}
}}

extern "C" __global__ void tab_bwd(
    const T* __restrict__ Rn, const T* __restrict__ ggr, const long long n, const int nc,
    const int a, const int b, const T* __restrict__ tab, const T lower, const T upper, const T vmax,
    const T s0, const T s1, const int nspline, T* __restrict__ gRn)
{{
    __shared__ T GG[4 * M];
    const int sub = threadIdx.x % LPS;            /* lane within the slot's group */
    const int grp = threadIdx.x / LPS, ngrp = blockDim.x / LPS;
    for (long long i = blockIdx.x; i < n; i += gridDim.x) {{
        __syncthreads();
        for (int q = threadIdx.x; q < 4 * M; q += blockDim.x) GG[q] = ggr[i * 4 * M + q];
        __syncthreads();
        /* every lane of a warp runs the same number of rounds (the shuffles need all 32) */
        const int rounds = (b - a + ngrp - 1) / ngrp;
        for (int r = 0; r < rounds; ++r) {{
            const int s = a + r * ngrp + grp;
            const bool live = s < b;
            T r0 = (T)0, r1 = (T)0, r2 = (T)0, r3 = (T)0, x = (T)0;
            int k = 0;
            if (live) {{
                const T* p = Rn + (i * nc + s) * 4;
                r0 = p[0]; r1 = p[1]; r2 = p[2]; r3 = p[3];
                x = r0;
                k = locate(x, lower, upper, vmax, s0, s1, nspline);
            }}
            T acc[5] = {{(T)0, (T)0, (T)0, (T)0, (T)0}};
            if (live) {{
                const T* c = tab + (long long)k * 6 * M;
                for (int j = sub; j < M; j += LPS) {{
                    const T c0 = c[j], c1 = c[M + j], c2 = c[2 * M + j], c3 = c[3 * M + j];
                    const T c4 = c[4 * M + j], c5 = c[5 * M + j];
                    const T g = c0 + x * (c1 + x * (c2 + x * (c3 + x * (c4 + x * c5))));
                    const T dg = c1 + x * ((T)2 * c2 + x * ((T)3 * c3 + x * ((T)4 * c4 + x * (T)5 * c5)));
                    const T g0 = GG[j], g1 = GG[M + j], g2 = GG[2 * M + j], g3 = GG[3 * M + j];
                    acc[0] += g0 * g; acc[1] += g1 * g; acc[2] += g2 * g; acc[3] += g3 * g;
                    acc[4] += (r0 * g0 + r1 * g1 + r2 * g2 + r3 * g3) * dg;
                }}
            }}
{shuffles}
            if (live && sub == 0) {{
                T* o = gRn + (i * nc + s) * 4;
                o[0] = acc[0] + acc[4]; o[1] = acc[1]; o[2] = acc[2]; o[3] = acc[3];
            }}
        }}
    }}
}}
"""


class TabKernels:
    """Forward and backward kernels of one tabulated net (same interface as fused.FusedNet)."""

    def __init__(self, tnet, dtype: str):
        import cupy

        self.dtype = np.float32 if dtype == "float32" else np.float64
        self.t = tnet.table
        self.coef = cupy.ascontiguousarray(tnet.coef, dtype=self.dtype)
        self.M = self.coef.shape[2]
        self.lps = lanes_per_slot()
        mod = cupy.RawModule(code=source(dtype, self.M, self.lps), options=("-std=c++14",))
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
