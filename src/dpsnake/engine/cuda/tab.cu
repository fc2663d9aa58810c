/* Tabulated embedding nets (tab.py): forward and backward, one block per centre. Compiled with
   -DREAL=float|double -DM=columns of G -DLPS=lanes per slot of the backward -DTILE=slots per forward tile,
   and -DSTRIP=1 for se_atten strip mode: G_j = Gs_j(x_s) (1 + w_s TT[k_s, j]) with the per-slot
   weight w_s (sw * mask, or 1), the type-pair row k_s of the strip table TT (rows of M), and the
   backward also gives gw_s = dL/dw_s = sum_j (sum_c Rn[s, c] ggr[c, j]) Gs_j TT[k_s, j]. */
typedef REAL T;
#ifdef STRIP
#define STRIP_IN const T* __restrict__ wt, const int* __restrict__ kt, const T* __restrict__ tt,
#define STRIP_OUT , T* __restrict__ gw
#define NACC 6
#else
#define STRIP_IN
#define STRIP_OUT
#define NACC 5
#endif

#include "tab_locate.cuh"

extern "C" __global__ void tab_fwd(
    const T* __restrict__ Rn, const long long n, const int nc, const int a, const int b,
    const T* __restrict__ tab, const T lower, const T upper, const T vmax, const T s0, const T s1,
    const int nspline, STRIP_IN T* __restrict__ gr)
{
    __shared__ T sr[TILE * 4];
    __shared__ T sdx[TILE];
    __shared__ int sk[TILE];
#ifdef STRIP
    __shared__ T sw[TILE];
    __shared__ int skt[TILE];
#endif
    const int j = threadIdx.x;
    for (long long i = blockIdx.x; i < n; i += gridDim.x) {
        T acc0 = (T)0, acc1 = (T)0, acc2 = (T)0, acc3 = (T)0;
        for (int base = a; base < b; base += TILE) {
            const int cnt = min(TILE, b - base);
            __syncthreads();
            for (int t = threadIdx.x; t < cnt; t += blockDim.x) {
                const T* p = Rn + (i * nc + base + t) * 4;
                T x = p[0];
                sr[4 * t] = x; sr[4 * t + 1] = p[1]; sr[4 * t + 2] = p[2]; sr[4 * t + 3] = p[3];
                sk[t] = locate(x, lower, upper, vmax, s0, s1, nspline);
                sdx[t] = x;
#ifdef STRIP
                sw[t] = wt[i * nc + base + t];
                skt[t] = kt[i * nc + base + t];
#endif
            }
            __syncthreads();
            if (j < M) {
                #pragma unroll 4
                for (int t = 0; t < cnt; ++t) {
                    const T* c = tab + (long long)sk[t] * 6 * M + j;
                    const T x = sdx[t];
#ifdef STRIP
                    const T gs = c[0] + x * (c[M] + x * (c[2 * M] + x * (c[3 * M] + x * (c[4 * M] + x * c[5 * M]))));
                    const T g = gs * (tt[(long long)skt[t] * M + j] * sw[t]) + gs;
#else
                    const T g = c[0] + x * (c[M] + x * (c[2 * M] + x * (c[3 * M] + x * (c[4 * M] + x * c[5 * M]))));
#endif
                    acc0 += sr[4 * t] * g; acc1 += sr[4 * t + 1] * g;
                    acc2 += sr[4 * t + 2] * g; acc3 += sr[4 * t + 3] * g;
                }
            }
        }
        if (j < M) {
            T* o = gr + i * 4 * M + j;
            o[0] += acc0; o[M] += acc1; o[2 * M] += acc2; o[3 * M] += acc3;
        }
    }
}

extern "C" __global__ void tab_bwd(
    const T* __restrict__ Rn, const T* __restrict__ ggr, const long long n, const int nc,
    const int a, const int b, const T* __restrict__ tab, const T lower, const T upper, const T vmax,
    const T s0, const T s1, const int nspline, STRIP_IN T* __restrict__ gRn STRIP_OUT)
{
    __shared__ T GG[4 * M];
    const int sub = threadIdx.x % LPS;            /* lane within the slot's group */
    const int grp = threadIdx.x / LPS, ngrp = blockDim.x / LPS;
    for (long long i = blockIdx.x; i < n; i += gridDim.x) {
        __syncthreads();
        for (int q = threadIdx.x; q < 4 * M; q += blockDim.x) GG[q] = ggr[i * 4 * M + q];
        __syncthreads();
        /* every lane of a warp runs the same number of rounds (the shuffles need all 32) */
        const int rounds = (b - a + ngrp - 1) / ngrp;
        for (int r = 0; r < rounds; ++r) {
            const int s = a + r * ngrp + grp;
            const bool live = s < b;
            T r0 = (T)0, r1 = (T)0, r2 = (T)0, r3 = (T)0, x = (T)0;
            int k = 0;
#ifdef STRIP
            T wv = (T)0;
            int kr = 0;
#endif
            if (live) {
                const T* p = Rn + (i * nc + s) * 4;
                r0 = p[0]; r1 = p[1]; r2 = p[2]; r3 = p[3];
                x = r0;
                k = locate(x, lower, upper, vmax, s0, s1, nspline);
#ifdef STRIP
                wv = wt[i * nc + s];
                kr = kt[i * nc + s];
#endif
            }
            T acc[NACC] = {};
            if (live) {
                const T* c = tab + (long long)k * 6 * M;
                for (int j = sub; j < M; j += LPS) {
                    const T c0 = c[j], c1 = c[M + j], c2 = c[2 * M + j], c3 = c[3 * M + j];
                    const T c4 = c[4 * M + j], c5 = c[5 * M + j];
#ifdef STRIP
                    const T gs = c0 + x * (c1 + x * (c2 + x * (c3 + x * (c4 + x * c5))));
                    const T dgs = c1 + x * ((T)2 * c2 + x * ((T)3 * c3 + x * ((T)4 * c4 + x * (T)5 * c5)));
                    const T ttj = tt[(long long)kr * M + j], gt = ttj * wv;
                    const T g = gs * gt + gs, dg = dgs * gt + dgs;
#else
                    const T g = c0 + x * (c1 + x * (c2 + x * (c3 + x * (c4 + x * c5))));
                    const T dg = c1 + x * ((T)2 * c2 + x * ((T)3 * c3 + x * ((T)4 * c4 + x * (T)5 * c5)));
#endif
                    const T g0 = GG[j], g1 = GG[M + j], g2 = GG[2 * M + j], g3 = GG[3 * M + j];
                    acc[0] += g0 * g; acc[1] += g1 * g; acc[2] += g2 * g; acc[3] += g3 * g;
#ifdef STRIP
                    const T h = r0 * g0 + r1 * g1 + r2 * g2 + r3 * g3;
                    acc[4] += h * dg;
                    acc[5] += h * gs * ttj;
#else
                    acc[4] += (r0 * g0 + r1 * g1 + r2 * g2 + r3 * g3) * dg;
#endif
                }
            }
            /* the LPS lanes of a slot reduce their sums */
#if LPS > 16
        for (int q = 0; q < NACC; ++q) acc[q] += __shfl_xor_sync(0xffffffffu, acc[q], 16);
#endif
#if LPS > 8
        for (int q = 0; q < NACC; ++q) acc[q] += __shfl_xor_sync(0xffffffffu, acc[q], 8);
#endif
#if LPS > 4
        for (int q = 0; q < NACC; ++q) acc[q] += __shfl_xor_sync(0xffffffffu, acc[q], 4);
#endif
#if LPS > 2
        for (int q = 0; q < NACC; ++q) acc[q] += __shfl_xor_sync(0xffffffffu, acc[q], 2);
#endif
#if LPS > 1
        for (int q = 0; q < NACC; ++q) acc[q] += __shfl_xor_sync(0xffffffffu, acc[q], 1);
#endif
            if (live && sub == 0) {
                T* o = gRn + (i * nc + s) * 4;
                o[0] = acc[0] + acc[4]; o[1] = acc[1]; o[2] = acc[2]; o[3] = acc[3];
#ifdef STRIP
                gw[i * nc + s] = acc[5];
#endif
            }
        }
    }
}
