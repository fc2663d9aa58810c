// The backward of one whole attention layer per centre (attn_layer.cu has the layout and the forward).
//
// B16: the products on m16n8k16 FP16 operands (as the forward's F16), k, v, do and q in shared memory as FP16. A
// gradient's magnitude is the model's (dE/dG can sit near FP16's smallest normal, 6e-5), so each centre's dh is
// scaled by a power of two that brings its largest |dh| to [1/16, 1/8) (exact; headroom for the sums that follow,
// well inside 65504), and the results by the inverse: the backward is linear in dh.

// FP16 storage of the shared arrays (B16), their float2 as a W ring's region, and the stride between W^T_q, W^T_k,
// W^T_v in wqkvT
// A = T F and dL, the (n, n) matrices the row chain writes for dv's and dk's products: FP16 in shared memory (rows of
// LDM, B16), else FP32 in the block's scratch (device memory)
#if B16
typedef unsigned short bstore;
typedef unsigned short mstore;
#define LDM (N + 8)
#define BREG (N * LDK / 4)
#define WTS ((HT / 2) * KE * 32)
#else
typedef float bstore;
typedef float mstore;
#define BREG (N * LDK / 2)
#define WTS (HT * KE * 32)
#endif

// acc (the warp's rows of dx, 16 x E) += dz W^T with dz = dL/dz from d = dL/dy (the warp's rows, accumulator
// layout over H) through y = z / |z| (NORMALIZE): dz = (d - y p) inv with p = d . y per row (p0, p1: the caller's,
// from the (n, n) matrices, see the row chain backward), formed per k tile as the product's A operand (permuted):
// y is read once, never held whole (registers). Y: the rows of y (n, H) in device memory (ystore's order; q's times
// the query scale s, then p / s comes as p); wT: W^T in B-fragment order (HT x KE products, permuted; B16: pack_b16's,
// HT / 2 x KE); region: an (N, LDK) array free during the product (wprod_deep), ring: wprod's.
__device__ __forceinline__ void dz_acc(const float (&d)[HT][4], const ystore* __restrict__ Y, float inv0, float inv1,
                                       float p0, float p1, const float2* __restrict__ wT, bstore* region,
                                       float2* ring, float (&acc)[KE][4], int i0, int i1, bool in0, bool in1) {
  const int t = threadIdx.x & 3;
  float2* rg = reinterpret_cast<float2*>(region);
#if B16
  wprod_deep<HT / 2, KE, BREG, BRING, true>(wT, KE * 32, rg, ring, acc, [&](int c, unsigned& a0, unsigned& a1,
                                                                            unsigned& a2, unsigned& a3) {
    float v[2][4];  // dz of H tiles 2c, 2c + 1 (accumulator layout)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int cc = 2 * c + h;
#if NORMALIZE
      const float2 zero = make_float2(0.f, 0.f);
      const float2 a = in0 ? y_load(Y + i0 * H, cc, t) : zero;
      const float2 b = in1 ? y_load(Y + i1 * H, cc, t) : zero;
      v[h][0] = (d[cc][0] - a.x * p0) * inv0, v[h][1] = (d[cc][1] - a.y * p0) * inv0;
      v[h][2] = (d[cc][2] - b.x * p1) * inv1, v[h][3] = (d[cc][3] - b.y * p1) * inv1;
#else
      v[h][0] = d[cc][0], v[h][1] = d[cc][1], v[h][2] = d[cc][2], v[h][3] = d[cc][3];
#endif
    }
    unsigned f[4];
    acc_a16(v, 0, f);
    a0 = f[0], a1 = f[1], a2 = f[2], a3 = f[3];
  });
#else
  wprod_deep<HT, KE, BREG, BRING>(wT, KE * 32, rg, ring, acc, [&](int c, unsigned& a0, unsigned& a1,
                                                                  unsigned& a2, unsigned& a3) {
#if NORMALIZE
    const float2 zero = make_float2(0.f, 0.f);
    const float2 a = in0 ? y_load(Y + i0 * H, c, t) : zero;
    const float2 b = in1 ? y_load(Y + i1 * H, c, t) : zero;
    a0 = tf32((d[c][0] - a.x * p0) * inv0), a1 = tf32((d[c][2] - b.x * p1) * inv1);
    a2 = tf32((d[c][1] - a.y * p0) * inv0), a3 = tf32((d[c][3] - b.y * p1) * inv1);
#else
    a0 = tf32(d[c][0]), a1 = tf32(d[c][2]), a2 = tf32(d[c][1]), a3 = tf32(d[c][3]);
#endif
  });
#endif
}

#include "attn_layer_bwd_rows.cuh"

// the backward's do = dh W_out^T whole, its ring in v's space (v is staged after it), where wprod_deep gets three
// stages (else in two halves through the two-stage ring, whose stages hold max(KE, HTA) tiles)
#if BRING && WDEEP && BREG / (HT * 32) > 2 && KE >= 2
#define DO_DEEP 1
#else
#define DO_DEEP 0
#endif

// From dout = dLoss/d out (B, n, E) and what the forward kept (y, inv, xhat, rstd: attn_layer_fwd's): dx (B, n, E)
// = dLoss/dx (written), and the layer's terms of dLoss/d sw (B, n) (SMOOTH) and dLoss/d r (B, n, 3) (DOTR) added.
// woutT (KE, HT, 32) and wqkvT (3, HT, KE, 32) float2: W_out^T and W_q^T, W_k^T, W_v^T in B-fragment order
// (permuted; B16: pack_b16's, (E / 16, HT, 32) and (3, HT / 2, KE, 32)). Shared memory: two (N, LDK) arrays
// (FP16 with B16), k and v (v staged after do's product with DO_DEEP), then k and do, then q and do; with BRING
// also the W rings of products that run while one of them is free (wprod_deep) and the block's two-stage W ring for
// the others; B16: A = T F and dL (N, LDM) FP16 after them, L + SHIFT in their rows before (l_slot). Without B16
// scratch: 3 N N floats per block (L + SHIFT, A, dL), device memory read back within the block (L2).
// Steps: LayerNorm backward -> dh (dx = dh, the residual); do = dh W_out^T; dA = do v^T; L and T again (as the
// forward); the row chain backward -> dL, d sw, d r, and the rows' dots the q/k/v normalisation's backward needs
// (d . y of dq, dk, dv, from the (n, n) matrices in registers: dq . q = sum_j dL L, dk . k = sum_i dL L,
// dv . v = sum_i A dA, as L = s q k^T and dA = do v^T); dq = s dL k; dv = A^T do; dk = s dL^T y_q; each through
// the normalisation and in_proj into one accumulator, added to dx once.
extern "C" __global__ void __launch_bounds__(32 * NW, MINB)
    attn_layer_bwd(const float* __restrict__ dout, const xhstore* __restrict__ xhat, const float* __restrict__ rstd,
                   const float* __restrict__ gamma, const ystore* __restrict__ y, const float* __restrict__ inv,
                   const float2* __restrict__ woutT, const float2* __restrict__ wqkvT, const float* __restrict__ sw,
                   const float* __restrict__ r, const unsigned char* __restrict__ mask, long long B, int n, float s,
                   float* __restrict__ scratch, float* __restrict__ dx, float* __restrict__ dsw,
                   float* __restrict__ dr) {
  DYN_SMEM(smem);
  bstore* ks = reinterpret_cast<bstore*>(smem);  // (N, LDK): k, then q
  bstore* vs = ks + N * LDK;                     // (N, LDK): v, then do
#if B16
  unsigned* vsw = reinterpret_cast<unsigned*>(vs);
  __shared__ float wmax[NW];  // the warps' largest |dh|
#endif
  // gsw, gr, pv, pk: sums over the warps by shared-memory atomics, so their last bits (and those of dx, d sw, d r)
  // may differ between runs, as cuBLAS's split-k sums may
  __shared__ float sws[N], rs[3 * N], mk[N], gsw[N], gr[3 * N], pv[N], pk[N];
#if BRING
  __shared__ __align__(16) float2 ring[2 * RSB];  // W tiles (wprod) where no shared array is free
#else
  float2* ring = nullptr;
#endif
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int i0 = 16 * w + g, i1 = i0 + 8;
  const bool in0 = i0 < n, in1 = i1 < n;
  const long long P = B * n;
#if B16
  mstore* As = vs + N * LDK;  // (N, LDM) in shared memory
  mstore* dLs = As + N * LDM;
  float* const Ls = nullptr;  // no scratch: L + SHIFT waits in A's and dL's rows (l_slot)
#else
  float* Ls = scratch + (long long)blockIdx.x * (3 * N * N);  // (N, N): each lane reads back only what it wrote
  mstore* As = Ls + N * N;  // (N, N) in the scratch
  mstore* dLs = As + N * N;
#endif
  PHASE_START;
  for (long long b = blockIdx.x; b < B; b += gridDim.x) {
    const long long base = b * n;
    const ystore *yq = y + base * H, *yk = y + (P + base) * H, *yv = y + (2 * P + base) * H;
    __syncthreads();  // the previous centre's shared arrays and scratch are read
    for (int j = threadIdx.x; j < N; j += 32 * NW) {
      const bool in = j < n;
      sws[j] = in ? sw[base + j] : 0.f;
      mk[j] = (in && mask[base + j]) ? 1.f : 0.f;
      gsw[j] = pv[j] = pk[j] = 0.f;
      for (int d = 0; d < 3; ++d) rs[3 * j + d] = in ? r[(base + j) * 3 + d] : 0.f, gr[3 * j + d] = 0.f;
    }
    stage_rows(yk, ks, n);
#if !DO_DEEP
    stage_rows(yv, vs, n);  // with DO_DEEP after do's product, whose ring is in v's space
#endif
    __syncthreads();
    PHASE(0);
    float* dxb = dx + base * E;

    // LayerNorm backward: dh = rstd (g - mean(g) - xhat mean(g xhat)), g = dout gamma; dx = dh
    float dh[KE][4];
    {
      const float* db = dout + base * E;
      const xhstore* xb = xhat + base * E;
      float mg0 = 0.f, mg1 = 0.f, mx0 = 0.f, mx1 = 0.f;
      float xv[KE][4];  // xhat of the lane's columns (as dh)
#pragma unroll
      for (int nt = 0; nt < KE; ++nt) {
        const int col = 8 * nt + 2 * t;
        const bool c_in = col < E;
        const float2 zero = make_float2(0.f, 0.f);
        const float2 ga = c_in ? load_pair(gamma, col) : zero;
        const float2 d0 = (c_in && in0) ? load_pair(db + i0 * E, col) : zero;
        const float2 d1 = (c_in && in1) ? load_pair(db + i1 * E, col) : zero;
        const float2 x0 = (c_in && in0) ? xh_load(xb + i0 * E, col) : zero;
        const float2 x1 = (c_in && in1) ? xh_load(xb + i1 * E, col) : zero;
        dh[nt][0] = d0.x * ga.x, dh[nt][1] = d0.y * ga.y, dh[nt][2] = d1.x * ga.x, dh[nt][3] = d1.y * ga.y;
        xv[nt][0] = x0.x, xv[nt][1] = x0.y, xv[nt][2] = x1.x, xv[nt][3] = x1.y;
        mg0 += dh[nt][0] + dh[nt][1], mg1 += dh[nt][2] + dh[nt][3];
        mx0 += dh[nt][0] * x0.x + dh[nt][1] * x0.y, mx1 += dh[nt][2] * x1.x + dh[nt][3] * x1.y;
      }
      mg0 = row_sum(mg0) / E, mg1 = row_sum(mg1) / E, mx0 = row_sum(mx0) / E, mx1 = row_sum(mx1) / E;
      const float r0 = in0 ? rstd[base + i0] : 0.f, r1 = in1 ? rstd[base + i1] : 0.f;
#pragma unroll
      for (int nt = 0; nt < KE; ++nt) {
        const int col = 8 * nt + 2 * t;
#pragma unroll
        for (int e = 0; e < 2; ++e)
          if (col + e < E) {  // past E dh stays 0 (the product's padding)
            dh[nt][e] = in0 ? (dh[nt][e] - mg0 - xv[nt][e] * mx0) * r0 : 0.f;
            dh[nt][2 + e] = in1 ? (dh[nt][2 + e] - mg1 - xv[nt][2 + e] * mx1) * r1 : 0.f;
          }
        if (col < E && in0) store_pair(dxb + i0 * E, col, dh[nt][0], dh[nt][1]);
        if (col < E && in1) store_pair(dxb + i1 * E, col, dh[nt][2], dh[nt][3]);
      }
    }
#if B16
    // dh's scale: the block's largest |dh| to [1/16, 1/8) (a power of two, gsc), its inverse gisc for the results
    float gsc, gisc;
    {
      float m = 0.f;
#pragma unroll
      for (int nt = 0; nt < KE; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) m = fmaxf(m, fabsf(dh[nt][e]));
#pragma unroll
      for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(FULL, m, o));
      if (lane == 0) wmax[w] = m;
      __syncthreads();
      m = 0.f;
#pragma unroll
      for (int k = 0; k < NW; ++k) m = fmaxf(m, wmax[k]);
      const int ex = m > 0.f ? (int)((__float_as_uint(m) >> 23) & 0xffu) : 123;  // m's biased exponent
      // 2^(123 - ex) and 2^(ex - 123), their biased exponents kept in [1, 254]
      const int es = 250 - ex < 1 ? 1 : (250 - ex > 254 ? 254 : 250 - ex), ei = ex + 4 > 254 ? 254 : ex + 4;
      gsc = __uint_as_float((unsigned)es << 23), gisc = __uint_as_float((unsigned)ei << 23);
#pragma unroll
      for (int nt = 0; nt < KE; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dh[nt][e] *= gsc;
    }
#endif
    PHASE(1);
    // do = dh W_out^T (rows past n: 0), then dA = do v^T; do replaces v in shared memory
    float dA[NT][4];
    {
      float o[HT][4];
#if DO_DEEP
      prod_acc<KE, HT, BREG, BRING, B16>(dh, woutT, HT * 32, reinterpret_cast<float2*>(vs), ring, o);
#else
      // in two halves of H's tiles: the two-stage ring's stages hold KE tiles (shared memory for two blocks per SM)
      prod_acc<KE, HTA, 0, BRING, B16>(dh, woutT, HT * 32, nullptr, ring, *reinterpret_cast<float(*)[HTA][4]>(&o[0]));
#if HT > HTA
      prod_acc<KE, HT - HTA, 0, BRING, B16>(dh, woutT + HTA * 32, HT * 32, nullptr, ring,
                                       *reinterpret_cast<float(*)[HT - HTA][4]>(&o[HTA]));
#endif
#endif
#if DO_DEEP
      __syncthreads();  // every warp is done with the ring in v's space
      stage_rows(yv, vs, n);
      __syncthreads();
#endif
#pragma unroll
      for (int jt = 0; jt < NT; ++jt) dA[jt][0] = dA[jt][1] = dA[jt][2] = dA[jt][3] = 0.f;
#if B16
#pragma unroll
      for (int k = 0; k < HT / 2; ++k) {
        unsigned f[4];
        acc_a16(o, k, f);
        hmma_rows(dA, f, vs, LDK, k);
      }
      __syncthreads();  // every warp is done with v
#pragma unroll
      for (int c = 0; c < HT; ++c) {
        const int h = 8 * c + 2 * t;
        vsw[(i0 * LDK + h) / 2] = h2pack(o[c][0], o[c][1]), vsw[(i1 * LDK + h) / 2] = h2pack(o[c][2], o[c][3]);
      }
#else
#pragma unroll
      for (int c = 0; c < HT; ++c) {
        const unsigned a0 = tf32(o[c][0]), a1 = tf32(o[c][2]), a2 = tf32(o[c][1]), a3 = tf32(o[c][3]);
#pragma unroll
        for (int jt = 0; jt < NT; ++jt) {
          const float2 vb = *reinterpret_cast<const float2*>(vs + (8 * jt + g) * LDK + 8 * c + 2 * t);
          tmma(dA[jt], a0, a1, a2, a3, vb.x, vb.y);
        }
      }
      __syncthreads();  // every warp is done with v
#pragma unroll
      for (int c = 0; c < HT; ++c) {
        const int h = 8 * c + 2 * t;
        vs[i0 * LDK + h] = __uint_as_float(tf32(o[c][0])), vs[i0 * LDK + h + 1] = __uint_as_float(tf32(o[c][1]));
        vs[i1 * LDK + h] = __uint_as_float(tf32(o[c][2])), vs[i1 * LDK + h + 1] = __uint_as_float(tf32(o[c][3]));
      }
#endif
    }

    PHASE(2);
    // the logits again (as the forward: the same TF32 operands and order; with YH q's operands rounded to FP16
    // first, the same but at ties), kept as L + SHIFT for d sw
    float T[NT][4];
#pragma unroll
    for (int jt = 0; jt < NT; ++jt) T[jt][0] = T[jt][1] = T[jt][2] = T[jt][3] = 0.f;
#if B16
#pragma unroll
    for (int k = 0; k < HT / 2; ++k) {
      const float2 zero = make_float2(0.f, 0.f);
      const float2 qa = in0 ? y_load(yq + i0 * H, 2 * k, t) : zero, qb = in1 ? y_load(yq + i1 * H, 2 * k, t) : zero;
      const float2 qc = in0 ? y_load(yq + i0 * H, 2 * k + 1, t) : zero;
      const float2 qd = in1 ? y_load(yq + i1 * H, 2 * k + 1, t) : zero;
      const unsigned a[4] = {h2pack(qa.x, qa.y), h2pack(qb.x, qb.y), h2pack(qc.x, qc.y), h2pack(qd.x, qd.y)};
      hmma_rows(T, a, ks, LDK, k);
    }
#else
#pragma unroll
    for (int c = 0; c < HT; ++c) {
      const float2 zero = make_float2(0.f, 0.f);
      const float2 qa = in0 ? y_load(yq + i0 * H, c, t) : zero, qb = in1 ? y_load(yq + i1 * H, c, t) : zero;
      const unsigned a0 = tf32(qa.x), a1 = tf32(qb.x), a2 = tf32(qa.y), a3 = tf32(qb.y);
#pragma unroll
      for (int jt = 0; jt < NT; ++jt) {
        const float2 kb = *reinterpret_cast<const float2*>(ks + (8 * jt + g) * LDK + 8 * c + 2 * t);
        tmma(T[jt], a0, a1, a2, a3, kb.x, kb.y);
      }
    }
#endif
    PHASE(3);
    // the row chain forward, as attn_layer_fwd: T = softmax(L') m_i
    {
      float f0, f1;
#if SMOOTH || NORMALIZE
#pragma unroll
      for (int jt = 0; jt < NT; ++jt)  // L + SHIFT, kept until the row chain's pass 2
        *l_slot(As, dLs, Ls, i0, jt) = make_float2(T[jt][0] + SHIFT, T[jt][1] + SHIFT),
        *l_slot(As, dLs, Ls, i1, jt) = make_float2(T[jt][2] + SHIFT, T[jt][3] + SHIFT);
#endif
      softmax_rows(T, sws, mk, f0, f1);
#pragma unroll
      for (int jt = 0; jt < NT; ++jt) T[jt][0] *= f0, T[jt][1] *= f0, T[jt][2] *= f1, T[jt][3] *= f1;
    }
#if SMOOTH
    const float sw0 = sws[i0], sw1 = sws[i1];
#endif
    PHASE(4);

    // the row chain backward (attention.py's _rows_backward): A = T F (to As in pass 2); dT = dA F; dR = dA T S;
    // dL' = T (dT - sum_j dT T); dS = dA T R + (L + SHIFT) dL'; dL = dL' S. d sw += (dS + dS^T) sw and
    // d r += (dR + dR^T) r: the rows' parts summed over 4 lanes, the columns' over 8 groups, into shared memory.
#if DOTR
    const float ri0[3] = {rs[3 * i0], rs[3 * i0 + 1], rs[3 * i0 + 2]};
    const float ri1[3] = {rs[3 * i1], rs[3 * i1 + 1], rs[3 * i1 + 2]};
    float dri0[3] = {0.f, 0.f, 0.f}, dri1[3] = {0.f, 0.f, 0.f};
#endif
    float u0 = 0.f, u1 = 0.f;  // sum_j dT T per row
    float cv[8];  // the column sums of a tile (row chain 1: d r's and dv . v; 2: d sw's and dk . k of two tiles)
#pragma unroll
    for (int jt = 0; jt < NT; ++jt) {
#pragma unroll
      for (int k = 0; k < 8; ++k) cv[k] = 0.f;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = 8 * jt + 2 * t + e;
        float F0 = 1.f, F1 = 1.f;
#if SMOOTH
        const float S0 = sw0 * sws[j], S1 = sw1 * sws[j];
        F0 = S0, F1 = S1;
#endif
#if DOTR
        const float rj[3] = {rs[3 * j], rs[3 * j + 1], rs[3 * j + 2]};
        const float R0 = ri0[0] * rj[0] + ri0[1] * rj[1] + ri0[2] * rj[2];
        const float R1 = ri1[0] * rj[0] + ri1[1] * rj[1] + ri1[2] * rj[2];
        F0 *= R0, F1 *= R1;
#if SMOOTH
        const float dR0 = dA[jt][e] * T[jt][e] * S0, dR1 = dA[jt][2 + e] * T[jt][2 + e] * S1;
#else
        const float dR0 = dA[jt][e] * T[jt][e], dR1 = dA[jt][2 + e] * T[jt][2 + e];
#endif
#pragma unroll
        for (int d = 0; d < 3; ++d) {
          dri0[d] += dR0 * rj[d], dri1[d] += dR1 * rj[d];
          cv[4 * e + d] = dR0 * ri0[d] + dR1 * ri1[d];
        }
#endif
        const float A0 = T[jt][e] * F0, A1 = T[jt][2 + e] * F1;
        u0 += dA[jt][e] * A0, u1 += dA[jt][2 + e] * A1;
#if NORMALIZE
        cv[4 * e + 3] = dA[jt][e] * A0 + dA[jt][2 + e] * A1;  // dv . v of row j: sum_i A dA
#endif
      }
#if DOTR || NORMALIZE
      const float cs = col_sum8(cv);  // lane g: cv[g] = d r (column 8 jt + 2t + g / 4, component g % 4) or dv . v
      const int j = 8 * jt + 2 * t + (g >> 2), q = g & 3;
      if (DOTR && q < 3) atomicAdd(gr + 3 * j + q, cs);
      if (NORMALIZE && q == 3) atomicAdd(pv + j, cs);
#endif
    }
    u0 = row_sum(u0), u1 = row_sum(u1);
    PHASE(5);
#if DOTR
#pragma unroll
    for (int d = 0; d < 3; ++d) {
      dri0[d] = row_sum(dri0[d]), dri1[d] = row_sum(dri1[d]);
      if (t == 0) atomicAdd(gr + 3 * i0 + d, dri0[d]), atomicAdd(gr + 3 * i1 + d, dri1[d]);
    }
#endif
#if SMOOTH
    float ds0 = 0.f, ds1 = 0.f;
#endif
    float pq0 = 0.f, pq1 = 0.f;  // dq . q per row: sum_j dL L
#pragma unroll
    for (int jt = 0; jt < NT; ++jt) {
      if (!(jt & 1))
#pragma unroll
        for (int k = 0; k < 8; ++k) cv[k] = 0.f;
#if SMOOTH || NORMALIZE
      const float2 l0 = *l_slot(As, dLs, Ls, i0, jt), l1 = *l_slot(As, dLs, Ls, i1, jt);
      if (B16) __syncwarp();  // every lane has read tile jt of L before A and dL replace it
      const float Lr0[2] = {l0.x, l0.y}, Lr1[2] = {l1.x, l1.y};  // L + SHIFT of the lane's rows
#endif
      float Ar[4];  // A's values of the lane's four places in tile jt
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = 8 * jt + 2 * t + e;
        float F0 = 1.f, F1 = 1.f, R0 = 1.f, R1 = 1.f;
#if SMOOTH
        const float S0 = sw0 * sws[j], S1 = sw1 * sws[j];
        F0 = S0, F1 = S1;
#endif
#if DOTR
        R0 = rs[3 * i0] * rs[3 * j] + rs[3 * i0 + 1] * rs[3 * j + 1] + rs[3 * i0 + 2] * rs[3 * j + 2];
        R1 = rs[3 * i1] * rs[3 * j] + rs[3 * i1 + 1] * rs[3 * j + 1] + rs[3 * i1 + 2] * rs[3 * j + 2];
        F0 *= R0, F1 *= R1;
#endif
        Ar[e] = T[jt][e] * F0, Ar[2 + e] = T[jt][2 + e] * F1;
        const float dl0 = (dA[jt][e] * F0 - u0) * T[jt][e], dl1 = (dA[jt][2 + e] * F1 - u1) * T[jt][2 + e];
#if SMOOTH || NORMALIZE
        const float Ls0 = Lr0[e], Ls1 = Lr1[e];
#endif
#if SMOOTH
        const float dS0 = dA[jt][e] * T[jt][e] * R0 + Ls0 * dl0;
        const float dS1 = dA[jt][2 + e] * T[jt][2 + e] * R1 + Ls1 * dl1;
        ds0 += dS0 * sws[j], ds1 += dS1 * sws[j];
        cv[4 * (jt & 1) + 2 * e] = dS0 * sw0 + dS1 * sw1;
        dA[jt][e] = dl0 * S0, dA[jt][2 + e] = dl1 * S1;
#else
        dA[jt][e] = dl0, dA[jt][2 + e] = dl1;
#endif
#if NORMALIZE
        const float dlL0 = dA[jt][e] * (Ls0 - SHIFT), dlL1 = dA[jt][2 + e] * (Ls1 - SHIFT);  // dL L, L = s q . k
        pq0 += dlL0, pq1 += dlL1;
        cv[4 * (jt & 1) + 2 * e + 1] = dlL0 + dlL1;  // dk . k of row j: sum_i dL L
#endif
      }
      store_m(As, jt, Ar);
      store_m(dLs, jt, dA[jt]);
#if SMOOTH || NORMALIZE
      if (jt & 1) {  // lane g: cv[g] = d sw (g even) or dk . k of column 8 (jt - 1 + g / 4) + 2t + g / 2 % 2
        const float cs = col_sum8(cv);
        const int j = 8 * (jt - 1 + (g >> 2)) + 2 * t + ((g >> 1) & 1), q = g & 1;
        if (SMOOTH && q == 0) atomicAdd(gsw + j, cs);
        if (NORMALIZE && q == 1) atomicAdd(pk + j, cs);
      }
#endif
    }
    pq0 = row_sum(pq0), pq1 = row_sum(pq1);
#if SMOOTH
    ds0 = row_sum(ds0), ds1 = row_sum(ds1);
    if (t == 0) atomicAdd(gsw + i0, ds0), atomicAdd(gsw + i1, ds1);
#endif

    PHASE(6);
    // dq = s dL k (the warp's rows), through the normalisation and W_q^T into acc; then dv and dk: acc holds the
    // warp's rows of the three terms of dx until one read-modify-write
    float acc[KE][4];
#pragma unroll
    for (int m = 0; m < KE; ++m) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = 0.f;
    {
      float dq[HT][4];
#pragma unroll
      for (int c = 0; c < HT; ++c) dq[c][0] = dq[c][1] = dq[c][2] = dq[c][3] = 0.f;
#if B16
#pragma unroll
      for (int k = 0; k < NT / 2; ++k) {
        unsigned f[4];
        acc_a16(dA, k, f);
        hmma_cols(dq, f, ks, LDK, k);
      }
#else
#pragma unroll
      for (int jt = 0; jt < NT; ++jt) {
        const unsigned a0 = tf32(dA[jt][0]), a1 = tf32(dA[jt][2]), a2 = tf32(dA[jt][1]), a3 = tf32(dA[jt][3]);
        const float* ka = ks + (8 * jt + 2 * t) * LDK + g;
#pragma unroll
        for (int c = 0; c < HT; ++c) tmma(dq[c], a0, a1, a2, a3, ka[8 * c], ka[LDK + 8 * c]);
      }
#endif
#pragma unroll
      for (int c = 0; c < HT; ++c) dq[c][0] *= s, dq[c][1] *= s, dq[c][2] *= s, dq[c][3] *= s;
      // the ring in k's space: every warp is past its dq product (the last read of k) at wprod's first barrier
      dz_acc(dq, yq, in0 ? inv[base + i0] : 0.f, in1 ? inv[base + i1] : 0.f, pq0 / s, pq1 / s, wqkvT, ks, ring, acc,
             i0, i1, in0, in1);  // yq: s q
    }
    PHASE(7);
    __syncthreads();  // every warp is done with the ring in k's space; do, A and dL of every row are written, pv and
                      // pk summed
    stage_rows(yq, ks, n);
    __syncthreads();
    PHASE(8);
    {
      float dv[HT][4];
      prod_mty(As, vs, dv);  // dv = A^T do
      // dv's and dk's rings in do's space: every warp is past dv's product (the last read of do) at the first barrier
      dz_acc(dv, yv, in0 ? inv[2 * P + base + i0] : 0.f, in1 ? inv[2 * P + base + i1] : 0.f, pv[i0], pv[i1],
             wqkvT + 2 * WTS, vs, ring, acc, i0, i1, in0, in1);
    }
    PHASE(9);
    {
      float dk[HT][4];
      prod_mty(dLs, ks, dk);  // dk = dL^T (s y_q)
      dz_acc(dk, yk, in0 ? inv[P + base + i0] : 0.f, in1 ? inv[P + base + i1] : 0.f, pk[i0], pk[i1],
             wqkvT + WTS, vs, ring, acc, i0, i1, in0, in1);
    }
#if B16
#pragma unroll
    for (int nt = 0; nt < KE; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][e] *= gisc;
#else
    const float gisc = 1.f;
#endif
#pragma unroll
    for (int nt = 0; nt < KE; ++nt) {
      const int col = 8 * nt + 2 * t;
      if (col < E && in0) red_pair(dxb + i0 * E, col, acc[nt][0], acc[nt][1]);  // dx = dh + acc
      if (col < E && in1) red_pair(dxb + i1 * E, col, acc[nt][2], acc[nt][3]);
    }
    PHASE(10);
    __syncthreads();  // every warp's d sw, d r terms are in shared memory
    for (int j = threadIdx.x; j < n; j += 32 * NW) {
#if SMOOTH
      atomicAdd(dsw + base + j, gsw[j] * gisc);  // reductions in L2 (the results unused)
#endif
#if DOTR
      for (int d = 0; d < 3; ++d) atomicAdd(dr + (base + j) * 3 + d, gr[3 * j + d] * gisc);
#endif
    }
    PHASE(11);
  }
}
