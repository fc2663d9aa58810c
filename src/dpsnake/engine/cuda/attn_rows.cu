// Row kernels of DPA-1's neighbour-gated attention (attn_rows.py): the elementwise chains on the
// (B, N, N) attention matrices of one layer, one warp per row, the row's values in registers.
//
// Compile-time constants: REAL (float/double), N (slots per centre), K = ceil(N / 32) (values per
// lane), SMOOTH (0/1: logits (L + SHIFT) S - SHIFT with S_ij = sw_i sw_j, else empty keys -> -inf),
// DOTR (0/1: A = T R with R_ij = r_i . r_j), WPB (warps per block), LOWEST (REAL's lowest finite
// value: the row maximum starts there, and empty keys / padding lanes take exp = 0 without infinities),
// NPAD (SMOOTH only, else 0: the model's sel minus N, the trailing empty slots the chunk left out; each
// is a key of logit exactly -SHIFT (sw = 0 there), so it is added to the row's softmax analytically:
// the row maximum is at least -SHIFT and the denominator gains NPAD exp(-SHIFT - max); its A and
// every backward term are 0).
//
// attn_fwd:  T = softmax_j(L') * m_i; A = T * F (F = S R, S or R; A is not written when neither).
// attn_bwd:  from dA = dLoss/dA (overwritten with dL = dLoss/dL, L the unshifted logits q k^T s)
//            and the recomputed logits Lq (SMOOTH only): dS += dA T R + (Lq + SHIFT) dL',
//            dR += dA T S, dL = S dL' with dL' = T (dA F - sum_j dA F T).
// The same sums as attention.py's array code (to rounding); rows are independent: no atomics.

#define SHIFT ((REAL)20)

__device__ __forceinline__ REAL warp_max(REAL v) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

#include "warp.cuh"

// The gates of one row i (a centre's slot) against its centre's slots j: S_ij = sw_i sw_j, R_ij = r_i . r_j.
struct Gates {
  long long base;  // the first row of this centre's matrix (its slot 0)
  REAL si, rx, ry, rz;
  __device__ Gates(const REAL* sw, const REAL* r, long long row) : base(row - row % N), si(0), rx(0), ry(0), rz(0) {
#if SMOOTH
    si = sw[row];
#endif
#if DOTR
    rx = r[3 * row], ry = r[3 * row + 1], rz = r[3 * row + 2];
#endif
  }
  __device__ __forceinline__ REAL S(const REAL* sw, int j) const { return si * sw[base + j]; }
  __device__ __forceinline__ REAL R(const REAL* r, int j) const {
    const long long q = 3 * (base + j);
    return rx * r[q] + ry * r[q + 1] + rz * r[q + 2];
  }
};

extern "C" __global__ void __launch_bounds__(32 * WPB)
attn_fwd(const REAL* L, const REAL* __restrict__ sw, const REAL* __restrict__ r,
         const unsigned char* __restrict__ mask, long long rows, REAL* T, REAL* __restrict__ A) {
  // T may be L (in place): each lane rewrites only the values it read
  WARP_LOOP(row, rows) {
    const Gates g(sw, r, row);
    const REAL* Lr = L + row * N;
    const REAL mi = mask[row] ? (REAL)1 : (REAL)0;
    REAL v[K];
    bool use[K];  // a key of the softmax: j < N and (SMOOTH or j a neighbour)
    REAL mx = LOWEST;  // a row without keys: every exp is 0 and T is 0 (attention.py's _softmax)
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = lane + 32 * k;
      REAL l = LOWEST;
      use[k] = j < N;
      if (j < N) {
        l = Lr[j];
#if SMOOTH
        l = (l + SHIFT) * g.S(sw, j) - SHIFT;
#else
        use[k] = mask[g.base + j] != 0;
#endif
      }
      v[k] = l;
      if (use[k]) mx = fmax(mx, l);
    }
    mx = warp_max(mx);
#if SMOOTH && NPAD
    mx = fmax(mx, -SHIFT);
#endif
    REAL s = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const REAL e = use[k] ? exp(v[k] - mx) : (REAL)0;
      v[k] = e;
      s += e;
    }
    s = warp_sum(s);
#if SMOOTH && NPAD
    s += (REAL)NPAD * exp(-SHIFT - mx);
#endif
    const REAL den = fmax(s, (REAL)1);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = lane + 32 * k;
      if (j < N) {
        const REAL t = v[k] / den * mi;
        T[row * N + j] = t;
#if SMOOTH || DOTR
#if SMOOTH && DOTR
        const REAL f = g.S(sw, j) * g.R(r, j);
#elif SMOOTH
        const REAL f = g.S(sw, j);
#else
        const REAL f = g.R(r, j);
#endif
        A[row * N + j] = t * f;
#endif
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(32 * WPB)
attn_bwd(REAL* __restrict__ dA, const REAL* __restrict__ T, const REAL* __restrict__ Lq,
         const REAL* __restrict__ sw, const REAL* __restrict__ r, long long rows, REAL* __restrict__ dS,
         REAL* __restrict__ dR) {
  WARP_LOOP(row, rows) {
    const Gates g(sw, r, row);
    REAL a[K], t[K];
#if SMOOTH
    REAL ds[K];  // this row's dS term from A = T S R, added with the logits' term below
#endif
    REAL s = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = lane + 32 * k;
      a[k] = t[k] = (REAL)0;
      if (j < N) {
        const long long ij = row * N + j;
        REAL x = dA[ij];
        const REAL tt = T[ij];
#if SMOOTH
        const REAL S = g.S(sw, j);
#endif
#if DOTR
        const REAL R = g.R(r, j);
#endif
#if SMOOTH && DOTR
        const REAL at = x * tt;
        ds[k] = at * R;
        dR[ij] += at * S;
        x = x * (S * R);
#elif SMOOTH
        ds[k] = x * tt;
        x = x * S;
#elif DOTR
        dR[ij] += x * tt;
        x = x * R;
#endif
        a[k] = x;
        t[k] = tt;
        s += x * tt;
      }
    }
    s = warp_sum(s);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = lane + 32 * k;
      if (j < N) {
        const long long ij = row * N + j;
        REAL dl = (a[k] - s) * t[k];
#if SMOOTH
        dS[ij] += ds[k] + (Lq[ij] + SHIFT) * dl;
        dl = dl * g.S(sw, j);
#endif
        dA[ij] = dl;
      }
    }
  }
}
