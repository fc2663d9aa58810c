// Shared by attn_layer.cu's forward and attn_layer_bwd.cuh's backward: sizes, the TF32 product, lane sums.
#if !defined(KEEP) || !defined(WRING) || !defined(BRING) || !defined(WDEEP) || !defined(YH) || \
    !defined(MINB) || !defined(F16) || !defined(FMINB) || !defined(B16) || !defined(EX2) || !defined(XH) || \
    !defined(PREF)
#error "attn_layer: compile with attn_layer.defines()' constants"
#endif
#if (F16 || B16) && H % 16
#error "attn_layer: F16 and B16 need H a multiple of 16"
#endif

#define NW (N / 16)
#define EP ((E + 7) / 8 * 8)
#define KE (EP / 8)  // k tiles of x; n tiles of h
#define KX (F16 ? (E + 15) / 16 : KE)  // the forward's k tiles of x (m16n8k16 with F16)
#define HT (H / 8)
#define NT (N / 8)
// row strides in shared memory: a half-warp's float2 loads (rows g = 0..3, columns 2t) hit 32 distinct banks when
// the stride is 8 or 24 mod 32: k's for H % 16 == 0 (H 24, 56: 4-way conflicts; 8, 40: 2-way), v^T's for every N
#define LDK (H + 8)
#define LDV (N + 8)
#define HTA ((HT + 1) / 2)  // the backward's do = dh W_out^T runs in two halves of H's tiles (a smaller W ring)
#define MAX2(a, b) ((a) > (b) ? (a) : (b))
#define RSF (MAX2(HT, KE) * 32)   // float2 per stage of the forward's W ring (wprod)
#define RSB (MAX2(KE, HTA) * 32)  // the backward's
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
// 2^x on the special function unit (ex2.approx.ftz: ~2 ulp, one MUFU) for the softmax with EX2; expf is ~8
// instructions
__device__ __forceinline__ float ex2f(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
// a 128-byte line toward L2 (nothing waits on it; PREF: the next centre's rows while this one runs)
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p)); }
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
// c (16 x 8) += a (16 x 16) b (16 x 8), FP16 operands (two per register, the lower index in the low half), FP32
// accumulators: lane 4 g + t holds A[g][2t, 2t+1], A[g+8][2t, 2t+1], A[g][2t+8, 2t+9], A[g+8][2t+8, 2t+9];
// B[2t, 2t+1][g], B[2t+8, 2t+9][g]; C as m16n8k8's
__device__ __forceinline__ void hmma(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                     unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// two FP32 as FP16 (cvt.rn) in one register, lo in the low half
__device__ __forceinline__ unsigned h2pack(float lo, float hi) {
  unsigned r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
// ldmatrix.x4 (b16): lanes 8m..8m+7 give the row addresses (16 bytes each, 16-byte aligned) of 8 x 8 matrix m;
// r[m] of lane 4g + t holds its row g, columns 2t, 2t + 1 (ldsm4: an m16n8k16 B operand from rows n with k along a
// row, or an A operand's rows) or, transposed, its rows 2t, 2t + 1 of column g (ldsm4t: a B operand from rows k, or
// an A operand from rows k)
__device__ __forceinline__ void ldsm4(unsigned (&r)[4], const void* p) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void ldsm4t(unsigned (&r)[4], const void* p) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
#endif
#ifndef TMMA
// cp.async: 16 bytes global -> shared, bypassing L1 (the W tiles are read once per block from L2)
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  unsigned d;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }\n" : "=r"(d) : "l"(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// this thread's copies of all but its newest NP groups are in shared memory
template <int NP>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(NP) : "memory");
}
#endif
#ifndef TMMA
// FP16 bits <-> FP32 (cvt.rn: round to nearest, ties to even)
__device__ __forceinline__ unsigned short f2h(float x) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;\n" : "=h"(h) : "f"(x));
  return h;
}
__device__ __forceinline__ float h2f(unsigned short h) {
  float x;
  asm("cvt.f32.f16 %0, %1;\n" : "=f"(x) : "h"(h));
  return x;
}
#endif

// row[col], row[col + 1] of an (n, E) row (col even, < E): one 8-byte access where E is even
__device__ __forceinline__ float2 load_pair(const float* __restrict__ row, int col) {
#if E % 2 == 0
  return *reinterpret_cast<const float2*>(row + col);
#else
  return make_float2(row[col], col + 1 < E ? row[col + 1] : 0.f);
#endif
}
__device__ __forceinline__ void store_pair(float* __restrict__ row, int col, float a, float b) {
#if E % 2 == 0
  *reinterpret_cast<float2*>(row + col) = make_float2(a, b);
#else
  row[col] = a;
  if (col + 1 < E) row[col + 1] = b;
#endif
}

// xhat, the LayerNorm's normalized rows a force call's forward keeps for the backward: FP16 with XH (unit variance:
// FP16's 11-bit significand, as the TF32 operands' 10; the forward's xhat store and the backward's xhat load in
// half the bytes), else FP32; the lane's pair at col (even, < E) as load_pair / store_pair
#if XH
typedef unsigned short xhstore;
#else
typedef float xhstore;
#endif
__device__ __forceinline__ float2 xh_load(const xhstore* __restrict__ row, int col) {
#if XH && E % 2 == 0
  const unsigned u = *reinterpret_cast<const unsigned*>(row + col);
  return make_float2(h2f((unsigned short)(u & 0xffffu)), h2f((unsigned short)(u >> 16)));
#elif XH
  return make_float2(h2f(row[col]), col + 1 < E ? h2f(row[col + 1]) : 0.f);
#else
  return load_pair(row, col);
#endif
}
__device__ __forceinline__ void xh_store(xhstore* __restrict__ row, int col, float a, float b) {
#if XH && E % 2 == 0
  *reinterpret_cast<unsigned*>(row + col) = f2h(a) | ((unsigned)f2h(b) << 16);
#elif XH
  row[col] = f2h(a);
  if (col + 1 < E) row[col + 1] = f2h(b);
#else
  store_pair(row, col, a, b);
#endif
}
// row[col] += a, row[col + 1] += b as reductions in L2 (red.global: no load's round trip on the warp's path; FP32
// adds rounded to nearest as the load + store's, subnormal sums flushed to 0); one 8-byte reduction where E is even
__device__ __forceinline__ void red_pair(float* row, int col, float a, float b) {
#if E % 2 == 0 && !defined(TMMA)
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(row + col), "f"(a), "f"(b) : "memory");
#else
  atomicAdd(row + col, a);
  if (col + 1 < E) atomicAdd(row + col + 1, b);
#endif
}

// y, what a force call's forward keeps of q, k, v for the backward (the normalized rows; q times the query scale),
// in device memory: FP16 with YH (defines() sets it with NORMALIZE: unit rows, whose values FP16's 10-bit mantissa
// keeps as well as the TF32 operands that read them do; half the bytes of the forward's largest store and the
// backward's largest read), else FP32. A row's H values are in fragment order: tiles c, c + 1 (c even) as 16
// values, lane t's four (columns 8c + 2t, +1, 8c + 8 + 2t, +1) at 4t, so that a lane stores them in one piece; an
// odd last tile as its 8 values in column order.
#if YH
typedef unsigned short ystore;
#else
typedef float ystore;
#endif
#define HT2 (HT & ~1)  // tiles stored in pairs
// position in a row of y of columns 8c + 2t, +1
__device__ __forceinline__ int ypos(int c, int t) {
  return c < HT2 ? 16 * (c >> 1) + 4 * t + 2 * (c & 1) : 8 * c + 2 * t;
}
// the column of position q (even) and q + 1: ypos's inverse
__device__ __forceinline__ int ycol(int q) {
  return q < 8 * HT2 ? (q & ~15) + 8 * ((q >> 1) & 1) + 2 * ((q & 15) >> 2) : q;
}
// the lane's two values (columns 8c + 2t, +1) of a row of y
__device__ __forceinline__ float2 y_load(const ystore* __restrict__ row, int c, int t) {
#if YH
  const unsigned u = *reinterpret_cast<const unsigned*>(row + ypos(c, t));
  return make_float2(h2f((unsigned short)(u & 0xffffu)), h2f((unsigned short)(u >> 16)));
#else
  return *reinterpret_cast<const float2*>(row + ypos(c, t));
#endif
}
// a row's values a, b at ypos(c, t) (and with c < HT2 even, also c's pair partner's d, e after them)
__device__ __forceinline__ void y_store2(ystore* row, int c, int t, float a, float b) {
#if YH
  *reinterpret_cast<unsigned*>(row + ypos(c, t)) = f2h(a) | ((unsigned)f2h(b) << 16);
#else
  *reinterpret_cast<float2*>(row + ypos(c, t)) = make_float2(a, b);
#endif
}
__device__ __forceinline__ void y_store4(ystore* row, int c, int t, float a, float b, float d, float e) {
#if YH
  uint2 u;
  u.x = f2h(a) | ((unsigned)f2h(b) << 16), u.y = f2h(d) | ((unsigned)f2h(e) << 16);
  *reinterpret_cast<uint2*>(row + ypos(c, t)) = u;
#else
  *reinterpret_cast<float4*>(row + ypos(c, t)) = make_float4(a, b, d, e);
#endif
}

#ifndef DYN_SMEM
#define DYN_SMEM(name) extern __shared__ __align__(16) float name[]  // 16 B: wprod_deep's rings
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

// Eight column sums at once (reduce-scatter over the 8 groups: 7 shuffles, not 3 per sum): returns the sum over
// the warp's groups of v[g], g the lane's group.
__device__ __forceinline__ float col_sum8(const float (&v)[8]) {
  const int g = (threadIdx.x & 31) >> 2;
  const bool b0 = g & 1, b1 = g & 2, b2 = g & 4;
  float w[4], x[2];
#pragma unroll
  for (int k = 0; k < 4; ++k)  // w[k]: value 2k + b0, over groups g, g ^ 1
    w[k] = (b0 ? v[2 * k + 1] : v[2 * k]) + __shfl_xor_sync(FULL, b0 ? v[2 * k] : v[2 * k + 1], 4);
#pragma unroll
  for (int k = 0; k < 2; ++k)  // x[k]: value 4k + 2 b1 + b0, over four groups
    x[k] = (b1 ? w[2 * k + 1] : w[2 * k]) + __shfl_xor_sync(FULL, b1 ? w[2 * k] : w[2 * k + 1], 8);
  return (b2 ? x[1] : x[0]) + __shfl_xor_sync(FULL, b2 ? x[0] : x[1], 16);
}

// The row chain's forward on the warp's 16 rows of logits L (accumulator layout; sws, mk: sw and the mask of
// the N slots), in place: L' = (L + SHIFT) S - SHIFT
// (SMOOTH) or -inf at empty keys, then exp(L' - row max); the left-out slots (NPAD) in the sums. Returns
// the rows' factors f = m_i / sum, so that T = exp(L' - max) f. One function for both kernels: the backward's
// T must be the forward's to the bit.
__device__ __forceinline__ void softmax_rows(float (&L)[NT][4], const float* sws, const float* mk, float& f0,
                                             float& f1) {
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
#if EX2  // exp(L - max) = 2^(L log2 e - max log2 e): one FFMA and one MUFU (max clamped: LOWEST log2 e is -inf)
  const float l2e = 1.4426950408889634f, m0 = fmaxf(mx0, -1e30f) * l2e, m1 = fmaxf(mx1, -1e30f) * l2e;
#endif
#pragma unroll
  for (int jt = 0; jt < NT; ++jt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
#if EX2
      L[jt][e] = ex2f(fmaf(L[jt][e], l2e, -m0)), L[jt][2 + e] = ex2f(fmaf(L[jt][2 + e], l2e, -m1));
#else
      L[jt][e] = expf(L[jt][e] - mx0), L[jt][2 + e] = expf(L[jt][2 + e] - mx1);
#endif
      d0 += L[jt][e], d1 += L[jt][2 + e];
    }
  d0 = row_sum(d0), d1 = row_sum(d1);
#if SMOOTH && NPAD && EX2
  d0 += NPAD * ex2f(fmaf(-SHIFT, l2e, -m0)), d1 += NPAD * ex2f(fmaf(-SHIFT, l2e, -m1));
#elif SMOOTH && NPAD
  d0 += NPAD * expf(-SHIFT - mx0), d1 += NPAD * expf(-SHIFT - mx1);
#endif
  f0 = mk[i0] / fmaxf(d0, 1.f), f1 = mk[i1] / fmaxf(d1, 1.f);
}

// The block's threads copy M8 x 32 float2 (one k tile of B fragments) from src to dst (cp.async; the caller commits).
template <int M8>
__device__ __forceinline__ void ring_load(float2* dst, const float2* __restrict__ src) {
#pragma unroll
  for (int r = 0; r < (M8 * 16 + 32 * NW - 1) / (32 * NW); ++r) {
    const int i = threadIdx.x + r * 32 * NW;  // 16-byte chunks
    if (i < M8 * 16) cp_async16(dst + 2 * i, src + 2 * i);
  }
}

// acc (the warp's 16 x 8 M8 tile row) += A W over K8 k tiles: W in B-fragment order, its tile k (M8 x 32 float2) at
// w + k * kstride; A's fragments of tile k from a(k, a0, a1, a2, a3). With RING (the forward's WRING, the backward's
// BRING) the block copies W's tiles into
// ``ring`` (S stages of M8 x 32 float2 in shared memory, S - 1 tiles in flight while one is used), so the block
// reads W from L2 once, not once per warp (per centre and layer six warps would pull 1.3 MB; on an H100 this pays
// in the forward alone, not in a force call's kernels, whose device-memory stalls the barriers spread to every
// warp: docs/benchmarks.md, "Session 33"). S = 2 keeps one tile in flight: a tile's
// products (~100 clocks of the block's tensor cores) hide little of L2's latency (~600+ clocks), hence
// wprod_deep's deeper rings where shared memory is free. Every thread of the block calls it (barriers). A's
// fragments of tile k + 1 are formed right after tile k's products are issued: where a() reads device memory
// (dz_acc), that latency overlaps the wait for the next W tile.
template <int K8, int M8, int S, bool RING, bool HF = false, class AF>
__device__ __forceinline__ void wprod(const float2* __restrict__ w, int kstride, float2* ring, float (&acc)[M8][4],
                                      AF a) {
  static_assert(S >= 2, "wprod: two stages at least");
  const int lane = threadIdx.x & 31;
  unsigned a0, a1, a2, a3;
  a(0, a0, a1, a2, a3);
  if (RING) {  // a constant: the branch compiles away
    __syncthreads();  // every warp is done with what the ring's memory held before
#pragma unroll
    for (int k = 0; k < S - 1; ++k) {  // one group per stage, empty past K8: wait<S - 2> below then means tile k
      if (k < K8) ring_load<M8>(ring + k * (M8 * 32), w + k * kstride);
      cp_async_commit();
    }
  }
#pragma unroll
  for (int k = 0; k < K8; ++k) {
    const float2* wk = w + k * kstride;
    if (RING) {
      cp_async_wait<S - 2>();
      __syncthreads();  // tile k is in; every warp is done with tile k - 1, whose stage the next load overwrites
      if (k + S - 1 < K8) ring_load<M8>(ring + ((k + S - 1) % S) * (M8 * 32), w + (k + S - 1) * kstride);
      cp_async_commit();
      wk = ring + (k % S) * (M8 * 32);
    }
#pragma unroll
    for (int m = 0; m < M8; ++m) {
      const float2 wb = wk[m * 32 + lane];
      if (HF)  // a constant
        hmma(acc[m], a0, a1, a2, a3, __float_as_uint(wb.x), __float_as_uint(wb.y));
      else
        tmma(acc[m], a0, a1, a2, a3, wb.x, wb.y);
    }
    if (k + 1 < K8) a(k + 1, a0, a1, a2, a3);
  }
}

// wprod with its ring in ``region`` (REG float2 of shared memory that no warp reads or writes during this product,
// 16-byte aligned), as many stages as fit, up to all K8 tiles in flight at once (WDEEP); else (WDEEP 0, or fewer
// than three stages fit) the block's two-stage ``ring``. The caller syncs before it writes the region after.
template <int K8, int M8, int REG, bool RING, bool HF = false, class AF>
__device__ __forceinline__ void wprod_deep(const float2* __restrict__ w, int kstride, float2* region, float2* ring,
                                           float (&acc)[M8][4], AF a) {
  constexpr int fit = REG / (M8 * 32), S = fit < K8 + 1 ? fit : K8 + 1;
  constexpr bool deep = WDEEP && S > 2;
  wprod<K8, M8, deep ? S : 2, RING, HF>(w, kstride, deep ? region : ring, acc, a);
}

#if F16 || B16
// The B operands (b0, b1 of two n tiles) of k tile k of an m16n8k16 product from an FP16 array S in shared memory
// with rows of ld values (ld * 2 bytes a multiple of 16, ld / 8 odd: a matrix's 8 rows in distinct banks), one
// ldmatrix each. b_rows: S's rows along n, k along a row: S[8 nt .. 8 nt + 15][16 k .. 16 k + 15] (n tiles nt,
// nt + 1; nt even). b_cols: S as it lies, k along the rows: S[16 k .. 16 k + 15][8 c .. 8 c + 15] (n tiles c, c + 1).
template <class T>
__device__ __forceinline__ void b_rows(const T* S, int ld, int nt, int k, unsigned (&b)[4]) {
  const int lane = threadIdx.x & 31, m = lane >> 3;
  const unsigned short* s = reinterpret_cast<const unsigned short*>(S);
  ldsm4(b, s + (8 * (nt + (m >> 1)) + (lane & 7)) * ld + 16 * k + 8 * (m & 1));
}
template <class T>
__device__ __forceinline__ void b_cols(const T* S, int ld, int k, int c, unsigned (&b)[4]) {
  const int lane = threadIdx.x & 31, m = lane >> 3;
  const unsigned short* s = reinterpret_cast<const unsigned short*>(S);
  ldsm4t(b, s + (16 * k + 8 * (m & 1) + (lane & 7)) * ld + 8 * c + 8 * (m >> 1));
}
// c0 += a b[0, 1], c1 += a b[2, 3]: the two products of one b_rows / b_cols load
__device__ __forceinline__ void hmma2(float (&c0)[4], float (&c1)[4], const unsigned (&a)[4], const unsigned (&b)[4]) {
  hmma(c0, a[0], a[1], a[2], a[3], b[0], b[1]);
  hmma(c1, a[0], a[1], a[2], a[3], b[2], b[3]);
}
// acc[m] += a B_m over all M8 n tiles (M8 even) of k tile k, B from S's rows (b_rows) or as S lies (b_cols, COLS)
template <bool COLS, int M8, class T>
__device__ __forceinline__ void hmma_tiles(float (&acc)[M8][4], const unsigned (&a)[4], const T* S, int ld, int k) {
#pragma unroll
  for (int m = 0; m < M8; m += 2) {
    unsigned b[4];
    if (COLS)  // a constant
      b_cols(S, ld, k, m, b);
    else
      b_rows(S, ld, m, k, b);
    hmma2(acc[m], acc[m + 1], a, b);
  }
}
template <int M8, class T>
__device__ __forceinline__ void hmma_rows(float (&acc)[M8][4], const unsigned (&a)[4], const T* S, int ld, int k) {
  hmma_tiles<false>(acc, a, S, ld, k);
}
template <int M8, class T>
__device__ __forceinline__ void hmma_cols(float (&acc)[M8][4], const unsigned (&a)[4], const T* S, int ld, int k) {
  hmma_tiles<true>(acc, a, S, ld, k);
}
#endif

// f = the A operand of m16n8k16 k tile k (FP16 pairs) from a's accumulator tiles 2k, 2k + 1 as they lie (tile 2k + 1
// past K8: zeros)
template <int K8>
__device__ __forceinline__ void acc_a16(const float (&a)[K8][4], int k, unsigned (&f)[4]) {
  f[0] = h2pack(a[2 * k][0], a[2 * k][1]), f[1] = h2pack(a[2 * k][2], a[2 * k][3]);
  if (2 * k + 1 < K8)
    f[2] = h2pack(a[2 * k + 1][0], a[2 * k + 1][1]), f[3] = h2pack(a[2 * k + 1][2], a[2 * k + 1][3]);
  else
    f[2] = f[3] = 0u;
}

// acc (the warp's 16 x 8 M8 tile row) = a w: a (16 x 8 K8) in the accumulator layout, read as the A operand with
// its columns permuted (attn_layer.cu's header), w in B-fragment order (K8 x M8 products, pack_b(permuted=True));
// kstride: float2 between w's k tiles (M8 x 32 unless acc is a slice of a wider product's m tiles); region, REG:
// wprod_deep's. HF: m16n8k16 FP16 products: a's tiles 2k, 2k + 1 are k tile k's A operand as they lie (no
// permutation), w from pack_b16 ((K8 + 1) / 2 x M8 products).
template <int K8, int M8, int REG, bool RING, bool HF = false>
__device__ __forceinline__ void prod_acc(const float (&a)[K8][4], const float2* __restrict__ w, int kstride,
                                         float2* region, float2* ring, float (&acc)[M8][4]) {
#pragma unroll
  for (int m = 0; m < M8; ++m) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = 0.f;
  if (HF)
    wprod_deep<(K8 + 1) / 2, M8, REG, RING, true>(w, kstride, region, ring, acc,
                                                  [&](int k, unsigned& a0, unsigned& a1, unsigned& a2, unsigned& a3) {
                                                    unsigned f[4];
                                                    acc_a16(a, k, f);
                                                    a0 = f[0], a1 = f[1], a2 = f[2], a3 = f[3];
                                                  });
  else
    wprod_deep<K8, M8, REG, RING>(w, kstride, region, ring, acc,
                            [&](int k, unsigned& a0, unsigned& a1, unsigned& a2, unsigned& a3) {
                              a0 = tf32(a[k][0]), a1 = tf32(a[k][2]), a2 = tf32(a[k][1]), a3 = tf32(a[k][3]);
                            });
}
