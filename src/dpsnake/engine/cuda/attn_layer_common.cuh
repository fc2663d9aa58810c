// Shared by attn_layer.cu's forward and attn_layer_bwd.cuh's backward: sizes, the TF32 product, lane sums.

#define NW (N / 16)
#define EP ((E + 7) / 8 * 8)
#define KE (EP / 8)  // k tiles of x; n tiles of h
#define HT (H / 8)
#define NT (N / 8)
#define LDK (H + 8)  // row stride of k in shared memory: a half-warp's float2 loads in 32 banks when H % 32 == 0
#define LDV (N + 8)  // row stride of v^T, the same when N % 32 == 0 (N = 96: yes; 48, 80: 2-way conflicts)
#define SHIFT 20.0f
#define LOWEST (-3.402823466e38f)
#define FULL 0xffffffffu

// PHASES (profiling only, bench/profiling/attn_layer_phases.py): each warp adds the clock cycles since its last
// mark to ph_buf[block][k] at PHASE(k); without PHASES the marks are nothing.
#ifdef PHASES
#define PH_SLOTS 16
__device__ unsigned long long ph_buf[PH_BLOCKS * PH_SLOTS];
#define PHASE_START long long ph_t = clock64()
#define PHASE(k)                                                                                   \
  do {                                                                                             \
    const long long ph_n = clock64();                                                              \
    if ((threadIdx.x & 31) == 0 && blockIdx.x < PH_BLOCKS)                                         \
      atomicAdd(ph_buf + blockIdx.x * PH_SLOTS + (k), (unsigned long long)(ph_n - ph_t));          \
    ph_t = ph_n;                                                                                   \
  } while (0)
#else
#define PHASE_START
#define PHASE(k)
#endif

#ifndef TMMA
__device__ __forceinline__ unsigned tf32(float x) {
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}
// c (16 x 8) += a (16 x 8) b (8 x 8), FP32 accumulators
__device__ __forceinline__ void tmma(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, float b0,
                                     float b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(__float_as_uint(b0)), "r"(__float_as_uint(b1)));
}
#endif
#ifndef DYN_SMEM
#define DYN_SMEM(name) extern __shared__ float name[]
#endif

// over the 4 lanes of a group (one row)
__device__ __forceinline__ float row_sum(float v) {
  v += __shfl_xor_sync(FULL, v, 1);
  return v + __shfl_xor_sync(FULL, v, 2);
}
__device__ __forceinline__ float row_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(FULL, v, 1));
  return fmaxf(v, __shfl_xor_sync(FULL, v, 2));
}

// over the 8 groups (one column of the warp's 16 rows)
__device__ __forceinline__ float col_sum(float v) {
  v += __shfl_xor_sync(FULL, v, 4);
  v += __shfl_xor_sync(FULL, v, 8);
  return v + __shfl_xor_sync(FULL, v, 16);
}

// The row chain's forward on the warp's 16 rows of logits L (accumulator layout; sws, mk: sw and the mask of
// the N slots), in place: L' = (L + SHIFT) S - SHIFT (SMOOTH; ``keepL``, if not null, gets L + SHIFT at
// [i * N + j]) or -inf at empty keys, then exp(L' - row max); the left-out slots (NPAD) in the sums. Returns
// the rows' factors f = m_i / sum, so that T = exp(L' - max) f. One function for both kernels: the backward's
// T must be the forward's to the bit.
__device__ __forceinline__ void softmax_rows(float (&L)[NT][4], const float* sws, const float* mk,
                                             float* __restrict__ keepL, float& f0, float& f1) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int i0 = 16 * (threadIdx.x >> 5) + g, i1 = i0 + 8;
#if SMOOTH
  const float sw0 = sws[i0], sw1 = sws[i1];
#endif
  float mx0 = LOWEST, mx1 = LOWEST;
#pragma unroll
  for (int jt = 0; jt < NT; ++jt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int j = 8 * jt + 2 * t + e;
#if SMOOTH
      if (keepL) keepL[i0 * N + j] = L[jt][e] + SHIFT, keepL[i1 * N + j] = L[jt][2 + e] + SHIFT;
      L[jt][e] = (L[jt][e] + SHIFT) * (sw0 * sws[j]) - SHIFT;
      L[jt][2 + e] = (L[jt][2 + e] + SHIFT) * (sw1 * sws[j]) - SHIFT;
#else
      if (mk[j] == 0.f) L[jt][e] = L[jt][2 + e] = __uint_as_float(0xff800000u);  // -inf
#endif
      mx0 = fmaxf(mx0, L[jt][e]), mx1 = fmaxf(mx1, L[jt][2 + e]);
    }
  mx0 = row_max(mx0), mx1 = row_max(mx1);
#if SMOOTH && NPAD
  mx0 = fmaxf(mx0, -SHIFT), mx1 = fmaxf(mx1, -SHIFT);
#endif
  float d0 = 0.f, d1 = 0.f;
#pragma unroll
  for (int jt = 0; jt < NT; ++jt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      L[jt][e] = expf(L[jt][e] - mx0), L[jt][2 + e] = expf(L[jt][2 + e] - mx1);
      d0 += L[jt][e], d1 += L[jt][2 + e];
    }
  d0 = row_sum(d0), d1 = row_sum(d1);
#if SMOOTH && NPAD
  d0 += NPAD * expf(-SHIFT - mx0), d1 += NPAD * expf(-SHIFT - mx1);
#endif
  f0 = mk[i0] / fmaxf(d0, 1.f), f1 = mk[i1] / fmaxf(d1, 1.f);
}

// acc (the warp's 16 x 8 M8 tile row) = a w: a (16 x 8 K8) in the accumulator layout, read as the A operand with
// its columns permuted (attn_layer.cu's header), w in B-fragment order (K8 x M8 products, pack_b(permuted=True))
template <int K8, int M8>
__device__ __forceinline__ void prod_acc(const float (&a)[K8][4], const float2* __restrict__ w, float (&acc)[M8][4]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int m = 0; m < M8; ++m) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = 0.f;
#pragma unroll
  for (int k = 0; k < K8; ++k) {
    const unsigned a0 = tf32(a[k][0]), a1 = tf32(a[k][2]), a2 = tf32(a[k][1]), a3 = tf32(a[k][3]);
#pragma unroll
    for (int m = 0; m < M8; ++m) {
      const float2 wb = w[(k * M8 + m) * 32 + lane];
      tmma(acc[m], a0, a1, a2, a3, wb.x, wb.y);
    }
  }
}
