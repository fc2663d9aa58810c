// The tabulated geometric net of se_atten / se_atten_v2 in strip mode with its type gate (strip_tab.py), for
// models with attention layers: G is written for the attention, one warp per neighbour slot, the lanes over
// G's M columns (coalesced rows of G, gG, the table and the gate). Compile-time constants: REAL, M, WPB.
//
// strip_tab_fwd:  G_j = Gs_j(x) (1 + T[row]_j w),  Gs_j(x) = sum_k c[k, k_x, j] dx^k  (x = Rn[slot, 0])
// strip_tab_bwd:  gs = dL/dx = sum_j gG_j (1 + T[row]_j w) Gs'_j(x);  gw = sum_j gG_j Gs_j T[row]_j  (has_w)
// coef (nspline, 6, M): tabulate.py's Table (DeePMD-kit's table); bounds as tab.cu's.

typedef REAL T;
#include "warp.cuh"
#include "tab_locate.cuh"

#define TAB_PARAMS                                                                                             \
  const T *__restrict__ Rn, long long slots, const T *__restrict__ coef, const T lower, const T upper,         \
      const T vmax, const T s0, const T s1, const int nspline, const T *__restrict__ table,                    \
      const int *__restrict__ row, const T *__restrict__ w, int has_w
// slot p's coefficients (its interval's, c), dx (x), gate row t and weight wp
__device__ __forceinline__ void slot_of(long long p, const T* __restrict__ Rn, const T* __restrict__ coef, T lower,
                                        T upper, T vmax, T s0, T s1, int nspline, const T* __restrict__ table,
                                        const int* __restrict__ row, const T* __restrict__ w, int has_w, T& x,
                                        const T*& c, const T*& t, T& wp) {
  x = Rn[4 * p];
  c = coef + (long long)locate(x, lower, upper, vmax, s0, s1, nspline) * 6 * M;
  t = table + (long long)row[p] * M;
  wp = has_w ? w[p] : (T)1;
}
#define MQ ((M + 31) / 32)  // column blocks of a lane
#define SLOT_ARGS Rn, coef, lower, upper, vmax, s0, s1, nspline, table, row, w, has_w

extern "C" __global__ void __launch_bounds__(32 * WPB) strip_tab_fwd(TAB_PARAMS, T* __restrict__ G) {
  WARP_LOOP(p, slots) {
    T x, wp;
    const T *c, *t;
    slot_of(p, SLOT_ARGS, x, c, t, wp);
#pragma unroll
    for (int q = 0; q < MQ; ++q) {  // unrolled: every column block's loads in flight together
      const int j = lane + 32 * q;
      if (j < M) {
        const T gs =
            c[j] + x * (c[M + j] + x * (c[2 * M + j] + x * (c[3 * M + j] + x * (c[4 * M + j] + x * c[5 * M + j]))));
        G[p * M + j] = gs * (t[j] * wp) + gs;  // as the array code: Gs * (T swm) + Gs
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(32 * WPB)
    strip_tab_bwd(TAB_PARAMS, const T* __restrict__ gG, T* __restrict__ gs, T* __restrict__ gw) {
  WARP_LOOP(p, slots) {
    T x, wp;
    const T *c, *t;
    slot_of(p, SLOT_ARGS, x, c, t, wp);
    T a = 0, b = 0;
#pragma unroll
    for (int q = 0; q < MQ; ++q) {
      const int j = lane + 32 * q;
      if (j < M) {
        const T c1 = c[M + j], c2 = c[2 * M + j], c3 = c[3 * M + j], c4 = c[4 * M + j], c5 = c[5 * M + j];
        const T g = gG[p * M + j], tj = t[j];
        const T d = c1 + x * ((T)2 * c2 + x * ((T)3 * c3 + x * ((T)4 * c4 + x * ((T)5 * c5))));  // Gs'
        a += g * (tj * wp + (T)1) * d;
        if (has_w) b += g * (c[j] + x * (c1 + x * (c2 + x * (c3 + x * (c4 + x * c5))))) * tj;
      }
    }
    a = warp_sum(a);
    if (has_w) b = warp_sum(b);
    if (lane == 0) {
      gs[p] = a;
      if (has_w) gw[p] = b;
    }
  }
}
