// The type gate of se_atten / se_atten_v2 in strip mode (strip_gate.py), one warp per neighbour slot of
// D = neuron[-1] values. Compile-time constants: REAL, D, WPB (warps per block).
//
// strip_fwd:  G = Gs (1 + T[row] w)                 (w = swm if smooth, else has_w 0 and w = 1)
// strip_bwd:  gin = gG (1 + T[row] w);  gw = sum_d gG Gs T[row]      (gw written if has_w)
// T: the strip table (rows, D) of the type pairs; row (slots,) int32 its row per slot. The array code
// (descriptor.py) gathers T per slot and runs four to six elementwise passes over (slots, D) arrays.

#include "warp.cuh"

extern "C" __global__ void __launch_bounds__(32 * WPB)
strip_fwd(const REAL* __restrict__ gs, const REAL* __restrict__ table, const int* __restrict__ row,
          const REAL* __restrict__ w, int has_w, long long slots, REAL* __restrict__ g) {
  WARP_LOOP(p, slots) {
    const REAL* t = table + (long long)row[p] * D;
    const REAL wp = has_w ? w[p] : (REAL)1;
    for (int j = lane; j < D; j += 32) {
      const long long i = p * D + j;
      g[i] = gs[i] * (t[j] * wp) + gs[i];  // as the array code: Gs * (T swm) + Gs
    }
  }
}

extern "C" __global__ void __launch_bounds__(32 * WPB)
strip_bwd(const REAL* __restrict__ gg, const REAL* __restrict__ gs, const REAL* __restrict__ table,
          const int* __restrict__ row, const REAL* __restrict__ w, int has_w, long long slots,
          REAL* __restrict__ gin, REAL* __restrict__ gw) {
  WARP_LOOP(p, slots) {
    const REAL* t = table + (long long)row[p] * D;
    const REAL wp = has_w ? w[p] : (REAL)1;
    REAL s = 0;
    for (int j = lane; j < D; j += 32) {
      const long long i = p * D + j;
      const REAL tj = t[j];
      gin[i] = gg[i] * (tj * wp + (REAL)1);
      s += gg[i] * gs[i] * tj;
    }
    s = warp_sum(s);
    if (has_w && lane == 0) gw[p] = s;
  }
}
