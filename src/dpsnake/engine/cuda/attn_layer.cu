// One whole DPA-1 attention layer per centre on TF32 tensor cores (attn_layer.py): the forward here, the backward
// in attn_layer_bwd.cuh, shared pieces in attn_layer_common.cuh. A block per centre keeps everything between the
// layer's input x (n, E) and its output LayerNorm(x + (A v) W_out + b_out) on chip: q in the warps' registers,
// k and v^T in shared memory, the (N, N) logits and weights in registers. Nothing of size (n, n) goes through
// device memory; a force call's forward keeps q, k, v (FP16 where NORMALIZE: ystore) and the LayerNorm's xhat for
// the backward (attention.py's module doc has the math).
//
// Constants: KEEP (a force call's forward: it keeps what the backward reads; the backward is compiled only with
// it), YH (KEEP: q, k, v kept as FP16), N (slots, a multiple of 16; a warp per 16 rows, NW = N / 16 warps), E
// (features), H (q/k/v width, a multiple of 8), SMOOTH, DOTR, NORMALIZE, NPAD (SMOOTH only: the model's empty
// slots past N, counted in each row's softmax), MINB, FMINB (blocks per SM the backward's and the forward's registers
// are bounded for), WRING, WDEEP (the forward's W rings, attn_layer_common.cuh's wprod), BRING (the backward's;
// WDEEP for both), F16 (the forward's products on m16n8k16 FP16 operands, H a multiple of 16: below).
// Rows n..N-1 (a chunk's n < N) are empty slots: x = 0, sw = 0, mask 0, k = v = 0.
//
// Fragments (PTX ISA, mma.m16n8k8 .tf32): lane 4 g + t holds A[g][t], A[g + 8][t], A[g][t + 4], A[g + 8][t + 4];
// B[t][g], B[t + 4][g]; C[g][2t], C[g][2t + 1], C[g + 8][2t], C[g + 8][2t + 1]. An accumulator tile that is
// the A operand of the next product is read with its columns 2t, 2t + 1 as the k indices t, t + 4, and the
// other operand's rows are permuted alike (a dot product does not care about the order of its terms): no
// shuffles. The weights come packed in B-fragment order (attn_layer.py), one float2 per lane and product.
// F16: the forward on mma.m16n8k16 with FP16 operands (FP32 accumulators). FP16 keeps TF32's 10 mantissa bits; its
// range (6e-5 .. 65504 normal) holds the forward's operands: x (LayerNorm outputs, the strip net's G), the weights,
// unit (NORMALIZE) q, k, v, and the weights A in [-1, 1]; values below the range lose bits, not magnitude (subnormal
// steps 6e-8). Two accumulator tiles (columns 16 c .. 16 c + 15) are a k tile's A operand as they lie (no
// permutation); k and v sit in shared memory as FP16 rows (half the bytes; B operands by ldmatrix, v's transposed,
// so v is stored as k is, in 32-bit pairs); half the mma instructions and operand conversions of TF32's. The kept
// y is FP16 either way (YH), so the backward's k, v and q are the very operands the forward's products used.

#include "attn_layer_common.cuh"

// float2 in the forward's k and v^T arrays (F16: k and v, FP16): wprod_deep's region while one is free
#if F16
#define KREG (N * LDK / 4)
#define VREG (N * LDK / 4)
#else
#define KREG (N * LDK / 2)
#define VREG (H * LDV / 2)
#endif

// the block's threads send ``bytes`` from p toward L2 (PREF: the forward's next centre's x), a line each in turn
__device__ __forceinline__ void prefetch_rows(const void* p, int bytes) {
  for (int o = 128 * threadIdx.x; o < bytes; o += 128 * 32 * NW) prefetch_l2(static_cast<const char*>(p) + o);
}

// z (the warp's 16 rows of one of q, k, v) = x W + b, normalized per row if NORMALIZE; rows >= n zeroed.
// xa: x's A fragments; wp: W in B-fragment order (KE x HT products); region, REG, ring: wprod_deep's.
template <int REG>
__device__ __forceinline__ void project(const unsigned (&xa)[KX][4], const float2* __restrict__ wp,
                                        const float* __restrict__ bias, float2* region, float2* ring, bool in0,
                                        bool in1, float (&z)[HT][4], float& inv0, float& inv1) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int c = 0; c < HT; ++c) z[c][0] = z[c][2] = bias[8 * c + 2 * t], z[c][1] = z[c][3] = bias[8 * c + 2 * t + 1];
  wprod_deep<KX, HT, REG, WRING, F16>(wp, HT * 32, region, ring, z,
                          [&](int k, unsigned& a0, unsigned& a1, unsigned& a2, unsigned& a3) {
                            a0 = xa[k][0], a1 = xa[k][1], a2 = xa[k][2], a3 = xa[k][3];
                          });
  float s0 = 0.f, s1 = 0.f;
#if NORMALIZE
#pragma unroll
  for (int c = 0; c < HT; ++c) s0 += z[c][0] * z[c][0] + z[c][1] * z[c][1], s1 += z[c][2] * z[c][2] + z[c][3] * z[c][3];
  s0 = 1.f / sqrtf(row_sum(s0)), s1 = 1.f / sqrtf(row_sum(s1));
#else
  s0 = s1 = 1.f;
#endif
  s0 = in0 ? s0 : 0.f, s1 = in1 ? s1 : 0.f;
#pragma unroll
  for (int c = 0; c < HT; ++c) z[c][0] *= s0, z[c][1] *= s0, z[c][2] *= s1, z[c][3] *= s1;
  inv0 = s0, inv1 = s1;
}

// the warp's rows of y (16 x H, accumulator layout) to Y (n, H) in device memory (ystore's order), and their inverse
// norms
__device__ __forceinline__ void keep_rows(const float (&z)[HT][4], float inv0, float inv1, ystore* __restrict__ Y,
                                          float* __restrict__ inv, int i0, int i1, bool in0, bool in1) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int c = 0; c < HT2; c += 2) {
    if (in0) y_store4(Y + i0 * H, c, t, z[c][0], z[c][1], z[c + 1][0], z[c + 1][1]);
    if (in1) y_store4(Y + i1 * H, c, t, z[c][2], z[c][3], z[c + 1][2], z[c + 1][3]);
  }
#if HT & 1
  if (in0) y_store2(Y + i0 * H, HT - 1, t, z[HT - 1][0], z[HT - 1][1]);
  if (in1) y_store2(Y + i1 * H, HT - 1, t, z[HT - 1][2], z[HT - 1][3]);
#endif
  if (t == 0 && in0) inv[i0] = inv0;
  if (t == 0 && in1) inv[i1] = inv1;
}

// x (B, n, E), sw (B, n), r (B, n, 3), mask (B, n), out (B, n, E): C-contiguous FP32. wqkv (3, KE, HT, 32) and
// wout (HT, KE, 32) float2 (B fragments, TF32-rounded), bqkv (3, H) (zeros without a bias), bout, gamma, beta
// (E). s: the query scale; eps: LayerNorm's. With KEEP (a force call) the forward also keeps what
// attn_layer_bwd reads: y (3, B, n, H) = the normalized q (times s), k, v (ystore: FP16 with YH); inv (3, B, n)
// their inverse norms (0 past n; 1 without NORMALIZE); xhat (B, n, E) (xhstore: FP16 with XH) and rstd (B, n) of
// the LayerNorm.
extern "C" __global__ void __launch_bounds__(32 * NW, FMINB)
    attn_layer_fwd(const float* __restrict__ x, const float2* __restrict__ wqkv, const float* __restrict__ bqkv,
                   const float2* __restrict__ wout, const float* __restrict__ bout, const float* __restrict__ gamma,
                   const float* __restrict__ beta, float eps, const float* __restrict__ sw,
                   const float* __restrict__ r, const unsigned char* __restrict__ mask, long long B, int n, float s,
                   float* __restrict__ out, ystore* __restrict__ y, float* __restrict__ inv,
                   xhstore* __restrict__ xhat, float* __restrict__ rstd) {
  DYN_SMEM(smem);
#if WRING
  __shared__ __align__(16) float2 ring[2 * RSF];  // W tiles (wprod) where no shared array is free
#else
  float2* ring = nullptr;
#endif
  const long long P = B * n;  // rows of one of q, k, v in y
#if F16
  unsigned* ksw = reinterpret_cast<unsigned*>(smem);  // (N, LDK) FP16: k, two per word
  unsigned* vsw = ksw + N * LDK / 2;  // (N, LDK) FP16: v, two per word
  float* sws = reinterpret_cast<float*>(vsw + N * LDK / 2);  // (N): sw
  float2* kreg = reinterpret_cast<float2*>(ksw);  // the arrays' space as W rings (wprod_deep's region)
  float2* vreg = reinterpret_cast<float2*>(vsw);
#else
  float* ks = smem;             // (N, LDK): k, TF32-rounded
  float* vt = ks + N * LDK;     // (H, LDV): v^T, TF32-rounded
  float* sws = vt + H * LDV;    // (N): sw
  float2* kreg = reinterpret_cast<float2*>(ks);
  float2* vreg = reinterpret_cast<float2*>(vt);
#endif
  float* rs = sws + N;          // (N, 3): r
  float* mk = rs + 3 * N;       // (N): mask as 0 / 1
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int i0 = 16 * w + g, i1 = i0 + 8;  // the lane's two rows
  const bool in0 = i0 < n, in1 = i1 < n;
  PHASE_START;
  for (long long b = blockIdx.x; b < B; b += gridDim.x) {
    const long long base = b * n;
#if PREF  // the next centre's x toward L2: its loads wait less (the keeping forward's stores fill the queues)
    if (b + gridDim.x < B) prefetch_rows(x + (b + gridDim.x) * n * E, 4 * n * E);
#endif
    __syncthreads();  // the previous centre's shared arrays are read
    for (int j = threadIdx.x; j < N; j += 32 * NW) {
      const bool in = j < n;
      sws[j] = in ? sw[base + j] : 0.f;
      mk[j] = (in && mask[base + j]) ? 1.f : 0.f;
      for (int d = 0; d < 3; ++d) rs[3 * j + d] = in ? r[(base + j) * 3 + d] : 0.f;
    }
    const float* xb = x + base * E;
    unsigned xa[KX][4];
#pragma unroll
    for (int kk = 0; kk < KX; ++kk) {
#if F16
      const int c0 = 16 * kk + 2 * t, c1 = c0 + 8;
      const float2 zero = make_float2(0.f, 0.f);
      const float2 p0 = in0 && c0 < E ? load_pair(xb + i0 * E, c0) : zero;
      const float2 p1 = in1 && c0 < E ? load_pair(xb + i1 * E, c0) : zero;
      const float2 p2 = in0 && c1 < E ? load_pair(xb + i0 * E, c1) : zero;
      const float2 p3 = in1 && c1 < E ? load_pair(xb + i1 * E, c1) : zero;
      xa[kk][0] = h2pack(p0.x, p0.y), xa[kk][1] = h2pack(p1.x, p1.y);
      xa[kk][2] = h2pack(p2.x, p2.y), xa[kk][3] = h2pack(p3.x, p3.y);
#else
      const int c0 = 8 * kk + t, c1 = c0 + 4;
      xa[kk][0] = tf32(in0 && c0 < E ? xb[i0 * E + c0] : 0.f);
      xa[kk][1] = tf32(in1 && c0 < E ? xb[i1 * E + c0] : 0.f);
      xa[kk][2] = tf32(in0 && c1 < E ? xb[i0 * E + c1] : 0.f);
      xa[kk][3] = tf32(in1 && c1 < E ? xb[i1 * E + c1] : 0.f);
#endif
    }
    PHASE(0);
    float z[HT][4], iv0, iv1;
    // k and v: W's ring in v^T's space (free until v^T is written); q: the two-stage ring
    project<VREG>(xa, wqkv + KX * HT * 32, bqkv + H, vreg, ring, in0, in1, z, iv0, iv1);  // k
#if KEEP
    keep_rows(z, iv0, iv1, y + (P + base) * H, inv + P + base, i0, i1, in0, in1);
#endif
#pragma unroll
    for (int c = 0; c < HT; ++c) {
      const int h = 8 * c + 2 * t;
#if F16
      ksw[(i0 * LDK + h) / 2] = h2pack(z[c][0], z[c][1]), ksw[(i1 * LDK + h) / 2] = h2pack(z[c][2], z[c][3]);
#else
      ks[i0 * LDK + h] = __uint_as_float(tf32(z[c][0])), ks[i0 * LDK + h + 1] = __uint_as_float(tf32(z[c][1]));
      ks[i1 * LDK + h] = __uint_as_float(tf32(z[c][2])), ks[i1 * LDK + h + 1] = __uint_as_float(tf32(z[c][3]));
#endif
    }
    PHASE(1);
    project<VREG>(xa, wqkv + 2 * KX * HT * 32, bqkv + 2 * H, vreg, ring, in0, in1, z, iv0, iv1);  // v
#if KEEP
    keep_rows(z, iv0, iv1, y + (2 * P + base) * H, inv + 2 * P + base, i0, i1, in0, in1);
#endif
    __syncthreads();  // every warp is done with the ring in v^T's space
#pragma unroll
    for (int c = 0; c < HT; ++c) {
      const int h = 8 * c + 2 * t;
#if F16
      vsw[(i0 * LDK + h) / 2] = h2pack(z[c][0], z[c][1]), vsw[(i1 * LDK + h) / 2] = h2pack(z[c][2], z[c][3]);
#else
      vt[h * LDV + i0] = __uint_as_float(tf32(z[c][0])), vt[(h + 1) * LDV + i0] = __uint_as_float(tf32(z[c][1]));
      vt[h * LDV + i1] = __uint_as_float(tf32(z[c][2])), vt[(h + 1) * LDV + i1] = __uint_as_float(tf32(z[c][3]));
#endif
    }
    PHASE(2);
    project<0>(xa, wqkv, bqkv, nullptr, ring, in0, in1, z, iv0, iv1);  // q
#pragma unroll
    for (int c = 0; c < HT; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) z[c][e] *= s;
#if KEEP
    keep_rows(z, iv0, iv1, y + base * H, inv + base, i0, i1, in0, in1);
#endif
#if F16
    unsigned qa[HT / 2][4];  // two accumulator tiles per k tile, as they lie
#pragma unroll
    for (int k = 0; k < HT / 2; ++k) acc_a16(z, k, qa[k]);
#else
    unsigned qa[HT][4];
#pragma unroll
    for (int c = 0; c < HT; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) qa[c][e] = tf32(z[c][e]);
#endif
    PHASE(3);
    __syncthreads();  // k and v of every row are in shared memory
    PHASE(4);

    // logits L = s q k^T, the warp's 16 rows
    float L[NT][4];
#if F16
#pragma unroll
    for (int jt = 0; jt < NT; jt += 2) {
      L[jt][0] = L[jt][1] = L[jt][2] = L[jt][3] = 0.f;
      L[jt + 1][0] = L[jt + 1][1] = L[jt + 1][2] = L[jt + 1][3] = 0.f;
#pragma unroll
      for (int k = 0; k < HT / 2; ++k) {
        unsigned b[4];
        b_rows(ksw, LDK, jt, k, b);
        hmma2(L[jt], L[jt + 1], qa[k], b);
      }
    }
#else
#pragma unroll
    for (int jt = 0; jt < NT; ++jt) {
      L[jt][0] = L[jt][1] = L[jt][2] = L[jt][3] = 0.f;
#pragma unroll
      for (int c = 0; c < HT; ++c) {
        const float2 kb = *reinterpret_cast<const float2*>(ks + (8 * jt + g) * LDK + 8 * c + 2 * t);
        tmma(L[jt], qa[c][0], qa[c][2], qa[c][1], qa[c][3], kb.x, kb.y);
      }
    }
#endif
    PHASE(5);
    // the row chain (attention.py's _rows_forward): smooth shift or key mask, softmax, row mask, A = T S R
    float f0, f1;
    softmax_rows(L, sws, mk, f0, f1);
#if SMOOTH
    const float sw0 = sws[i0], sw1 = sws[i1];
#endif
#if F16
    unsigned aa[NT / 2][4];  // A = T F as FP16, the A operand of A v (the values first in L)
#else
    unsigned aa[NT][4];  // A = T F as TF32, the A operand of A v
#endif
#pragma unroll
    for (int jt = 0; jt < NT; ++jt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float F0 = 1.f, F1 = 1.f;
#if SMOOTH || DOTR
        const int j = 8 * jt + 2 * t + e;
#endif
#if SMOOTH
        F0 = sw0 * sws[j], F1 = sw1 * sws[j];
#endif
#if DOTR
        const float rj0 = rs[3 * j], rj1 = rs[3 * j + 1], rj2 = rs[3 * j + 2];
        F0 *= rs[3 * i0] * rj0 + rs[3 * i0 + 1] * rj1 + rs[3 * i0 + 2] * rj2;
        F1 *= rs[3 * i1] * rj0 + rs[3 * i1 + 1] * rj1 + rs[3 * i1 + 2] * rj2;
#endif
#if F16
        L[jt][e] *= f0 * F0, L[jt][2 + e] *= f1 * F1;
#else
        aa[jt][e] = tf32(L[jt][e] * f0 * F0), aa[jt][2 + e] = tf32(L[jt][2 + e] * f1 * F1);
#endif
      }
#if F16
#pragma unroll
    for (int k = 0; k < NT / 2; ++k) acc_a16(L, k, aa[k]);
#endif

    PHASE(6);
    // o = A v, then h = o W_out
    float o[HT][4];
#if F16
#pragma unroll
    for (int c = 0; c < HT; c += 2) {
      o[c][0] = o[c][1] = o[c][2] = o[c][3] = 0.f;
      o[c + 1][0] = o[c + 1][1] = o[c + 1][2] = o[c + 1][3] = 0.f;
#pragma unroll
      for (int k = 0; k < NT / 2; ++k) {
        unsigned b[4];
        b_cols(vsw, LDK, k, c, b);
        hmma2(o[c], o[c + 1], aa[k], b);
      }
    }
#else
#pragma unroll
    for (int c = 0; c < HT; ++c) {
      o[c][0] = o[c][1] = o[c][2] = o[c][3] = 0.f;
#pragma unroll
      for (int jt = 0; jt < NT; ++jt) {
        const float2 vb = *reinterpret_cast<const float2*>(vt + (8 * c + g) * LDV + 8 * jt + 2 * t);
        tmma(o[c], aa[jt][0], aa[jt][2], aa[jt][1], aa[jt][3], vb.x, vb.y);
      }
    }
#endif
    PHASE(7);
    float hh[KE][4];
    // W_out's ring in k's space: every warp is past the logits once wprod's first barrier is
    prod_acc<HT, KE, KREG, WRING, F16>(o, wout, KE * 32, kreg, ring, hh);
    PHASE(8);
    // LayerNorm(h + b_out + x) per row (attention.py's _layer_forward)
    float m0 = 0.f, m1 = 0.f;
#pragma unroll
    for (int nt = 0; nt < KE; ++nt) {
      const int col = 8 * nt + 2 * t;
      if (col < E) {  // the residual and the bias in 8-byte loads (load_pair: 0 past E)
        const float2 zero = make_float2(0.f, 0.f), bo = load_pair(bout, col);
        const float2 x0 = in0 ? load_pair(xb + i0 * E, col) : zero, x1 = in1 ? load_pair(xb + i1 * E, col) : zero;
        const float b[2] = {bo.x, bo.y}, r0[2] = {x0.x, x0.y}, r1[2] = {x1.x, x1.y};
#pragma unroll
        for (int e = 0; e < 2; ++e)
          if (col + e < E) {
            hh[nt][e] += b[e] + r0[e], hh[nt][2 + e] += b[e] + r1[e];
            m0 += hh[nt][e], m1 += hh[nt][2 + e];
          }
      }
    }
    m0 = row_sum(m0) / E, m1 = row_sum(m1) / E;
    float v0 = 0.f, v1 = 0.f;
#pragma unroll
    for (int nt = 0; nt < KE; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e)
        if (8 * nt + 2 * t + e < E) {
          hh[nt][e] -= m0, hh[nt][2 + e] -= m1;
          v0 += hh[nt][e] * hh[nt][e], v1 += hh[nt][2 + e] * hh[nt][2 + e];
        }
    const float r0 = 1.f / sqrtf(row_sum(v0) / E + eps), r1 = 1.f / sqrtf(row_sum(v1) / E + eps);
#pragma unroll
    for (int nt = 0; nt < KE; ++nt) {
      const int col = 8 * nt + 2 * t;
      if (col < E) {
        const float2 ga = load_pair(gamma, col), be = load_pair(beta, col);
        const float xa0 = hh[nt][0] * r0, xb0 = hh[nt][1] * r0, xa1 = hh[nt][2] * r1, xb1 = hh[nt][3] * r1;
        if (in0) store_pair(out + (base + i0) * E, col, xa0 * ga.x + be.x, xb0 * ga.y + be.y);
        if (in1) store_pair(out + (base + i1) * E, col, xa1 * ga.x + be.x, xb1 * ga.y + be.y);
#if KEEP
        if (in0) xh_store(xhat + (base + i0) * E, col, xa0, xb0);
        if (in1) xh_store(xhat + (base + i1) * E, col, xa1, xb1);
#endif
      }
    }
#if KEEP
    if (t == 0 && in0) rstd[base + i0] = r0;
    if (t == 0 && in1) rstd[base + i1] = r1;
#endif
    PHASE(9);
  }
}

#if KEEP
#include "attn_layer_bwd.cuh"
#endif
