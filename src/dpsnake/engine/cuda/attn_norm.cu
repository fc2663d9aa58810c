// Row kernels of DPA-1's attention layer (attn_norm.py): the per-row normalisations that the array code
// runs as five to ten elementwise + reduction kernels each, here one warp per row of D values (K = ceil(D / 32)
// per lane, in registers). Compile-time constants: REAL, D, K, WPB (warps per block).
//
// qkv_fwd:  z (3 parts x P rows, D) += bias[part] (if has_bias); inv = 1 / |z|; z *= inv     (normalize)
// qkv_bwd:  dz *= scaling (parts 0, 1); dz = (dz - z (dz . z)) inv                           (its backward)
// ln_fwd:   h += b (if has_bias) + x; xhat = (h - mean) rstd, rstd = 1 / sqrt(var + eps) (h overwritten
//           with xhat); out = xhat gamma + beta                                             (LayerNorm)
// ln_bwd:   g = dout gamma; dh = rstd (g - mean(g) - xhat mean(g xhat))                       (its backward)
// The same operations in the same order as attention.py's array code (sums to rounding).

#include "warp.cuh"

extern "C" __global__ void __launch_bounds__(32 * WPB)
qkv_fwd(REAL* z, const REAL* __restrict__ bias, int has_bias, long long rows, long long part_rows,
        REAL* __restrict__ inv) {
  WARP_LOOP(row, rows) {
    REAL* zr = z + row * D;
    const REAL* br = bias + (row / part_rows) * D;
    REAL v[K];
    REAL s = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = lane + 32 * k;
      v[k] = 0;
      if (j < D) {
        REAL x = zr[j];
        if (has_bias) x = x + br[j];
        v[k] = x;
        s += x * x;
      }
    }
    const REAL iv = (REAL)1 / sqrt(warp_sum(s));
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = lane + 32 * k;
      if (j < D) zr[j] = v[k] * iv;
    }
    if (lane == 0) inv[row] = iv;
  }
}

extern "C" __global__ void __launch_bounds__(32 * WPB)
qkv_bwd(REAL* dz, const REAL* __restrict__ z, const REAL* __restrict__ inv, long long rows, long long part_rows,
        REAL scaling) {
  WARP_LOOP(row, rows) {
    REAL* dr = dz + row * D;
    const REAL* zr = z + row * D;
    const REAL sc = row < 2 * part_rows ? scaling : (REAL)1;
    REAL d[K], y[K];
    REAL s = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = lane + 32 * k;
      d[k] = y[k] = 0;
      if (j < D) {
        d[k] = dr[j] * sc;
        y[k] = zr[j];
        s += d[k] * y[k];
      }
    }
    s = warp_sum(s);
    const REAL iv = inv[row];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = lane + 32 * k;
      if (j < D) dr[j] = (d[k] - y[k] * s) * iv;
    }
  }
}

extern "C" __global__ void __launch_bounds__(32 * WPB)
ln_fwd(REAL* h, const REAL* __restrict__ b, int has_bias, const REAL* __restrict__ x, const REAL* __restrict__ gamma,
       const REAL* __restrict__ beta, REAL eps, long long rows, REAL* __restrict__ rstd, REAL* __restrict__ out) {
  WARP_LOOP(row, rows) {
    REAL* hr = h + row * D;
    const REAL* xr = x + row * D;
    REAL v[K];
    REAL s = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = lane + 32 * k;
      v[k] = 0;
      if (j < D) {
        REAL t = hr[j];
        if (has_bias) t = t + b[j];
        t = t + xr[j];
        v[k] = t;
        s += t;
      }
    }
    const REAL mu = warp_sum(s) / (REAL)D;
    REAL q = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = lane + 32 * k;
      if (j < D) {
        v[k] = v[k] - mu;
        q += v[k] * v[k];
      }
    }
    const REAL rs = (REAL)1 / sqrt(warp_sum(q) / (REAL)D + eps);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = lane + 32 * k;
      if (j < D) {
        const REAL xh = v[k] * rs;
        hr[j] = xh;
        out[row * D + j] = xh * gamma[j] + beta[j];
      }
    }
    if (lane == 0) rstd[row] = rs;
  }
}

extern "C" __global__ void __launch_bounds__(32 * WPB)
ln_bwd(const REAL* __restrict__ dout, const REAL* __restrict__ xhat, const REAL* __restrict__ rstd,
       const REAL* __restrict__ gamma, long long rows, REAL* __restrict__ dh) {
  WARP_LOOP(row, rows) {
    REAL g[K], xh[K];
    REAL s1 = 0, s2 = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = lane + 32 * k;
      g[k] = xh[k] = 0;
      if (j < D) {
        g[k] = dout[row * D + j] * gamma[j];
        xh[k] = xhat[row * D + j];
        s1 += g[k];
        s2 += g[k] * xh[k];
      }
    }
    const REAL m1 = warp_sum(s1) / (REAL)D, m2 = warp_sum(s2) / (REAL)D;
    const REAL rs = rstd[row];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = lane + 32 * k;
      if (j < D) dh[row * D + j] = (g[k] - m1 - xh[k] * m2) * rs;
    }
  }
}
