// Fused core of one FP64 attention layer of DPA-1 (attn_core.py): a block per centre, its (N, N)
// matrices in shared memory only, the products on FP64 tensor cores (PTX mma.m8n8k4.f64).
//
// Compile-time constants: N (slots, a multiple of 8), H (q/k/v width, a multiple of 8), SMOOTH, DOTR,
// NPAD (as attn_rows.cu: SMOOTH only; empty keys the chunk left out, counted in each row's softmax).
// NW = N / 8 warps; warp w owns rows 8w..8w+7 of every product and rows w, w + NW, ... of the row passes.
//
// attn_core_fwd: o = A v from q, k, v (z: (3, B, N, H)): L = s q k^T, T = softmax(L') m_i, A = T F
//                (attention.py's module doc); L, T, A never leave shared memory.
// attn_core_bwd: from do = dLoss/do: dz[0] = dL k, dz[1] = dL^T q (both without s, as attention.py's
//                q/k/v backward expects them), dz[2] = A^T do; dsw += (dS + dS^T) sw (SMOOTH),
//                dr += (dR + dR^T) r (DOTR), per centre. L and T are recomputed (one more q k^T), not
//                read from memory: the forward keeps nothing.
// Sums differ from attention.py's array code (cuBLAS) only in rounding order.

#define REAL double
#define SHIFT 20.0
#define NW (N / 8)
#define LDS (N + 1)  // row stride of the shared (N, N) matrices: odd, fewer bank conflicts
#define K ((N + 31) / 32)
#define LOWEST (-1.7976931348623157e308)

#include "warp.cuh"

__device__ __forceinline__ double warp_max(double v) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// c (8 x 8) += a (8 x 4) b (4 x 8), a warp-wide FP64 tensor-core product. Lane l = 4 g + t holds
// a[g][t], b[t][g] and c[g][2t], c[g][2t + 1] (PTX ISA, "Matrix fragments for mma.m8n8k4 .f64").
// The tests define DMMA and their own dmma (g++ with threaded warps).
#ifndef DMMA
__device__ __forceinline__ void dmma(double& c0, double& c1, double a, double b) {
  asm volatile("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%0, %1};\n"
               : "+d"(c0), "+d"(c1)
               : "d"(a), "d"(b));
}
#endif
#ifndef DYN_SMEM
#define DYN_SMEM(name) extern __shared__ double name[]
#endif

// C (N x N, shared, stride LDS) = s X Y^T with X, Y (N x H) row-major in global memory.
__device__ __forceinline__ void prod_xyt(const double* __restrict__ X, const double* __restrict__ Y, double s,
                                         double* C) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  double acc[NW][2];
#pragma unroll
  for (int c = 0; c < NW; ++c) acc[c][0] = acc[c][1] = 0.0;
  const double* xr = X + (8 * w + g) * H + t;
  const double* yr = Y + g * H + t;
#pragma unroll 2
  for (int k0 = 0; k0 < H; k0 += 4) {
    const double a = xr[k0];
#pragma unroll
    for (int c = 0; c < NW; ++c) dmma(acc[c][0], acc[c][1], a, yr[c * 8 * H + k0]);
  }
  double* cr = C + (8 * w + g) * LDS + 2 * t;
#pragma unroll
  for (int c = 0; c < NW; ++c) {
    cr[8 * c] = s * acc[c][0];
    cr[8 * c + 1] = s * acc[c][1];
  }
}

// O (N x H, global) = M Y (TRANS 0) or M^T Y (TRANS 1); M (N x N) in shared memory, Y (N x H) global.
template <int TRANS>
__device__ __forceinline__ void prod_my(const double* M, const double* __restrict__ Y, double* __restrict__ O) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int i = 8 * w + g;
  double acc[H / 8][2];
#pragma unroll
  for (int c = 0; c < H / 8; ++c) acc[c][0] = acc[c][1] = 0.0;
#pragma unroll 2
  for (int k0 = 0; k0 < N; k0 += 4) {
    const double a = TRANS ? M[(k0 + t) * LDS + i] : M[i * LDS + k0 + t];
    const double* yr = Y + (k0 + t) * H + g;
#pragma unroll
    for (int c = 0; c < H / 8; ++c) dmma(acc[c][0], acc[c][1], a, yr[8 * c]);
  }
  double* o = O + i * H + 2 * t;
#pragma unroll
  for (int c = 0; c < H / 8; ++c) {
    o[8 * c] = acc[c][0];
    o[8 * c + 1] = acc[c][1];
  }
}

// The gates of row i of one centre: S_ij = sw_i sw_j, R_ij = r_i . r_j (sw, r: the centre's slots).
struct Gate {
  double si, rx, ry, rz;
  __device__ Gate(const double* sw, const double* r, int i) : si(0), rx(0), ry(0), rz(0) {
#if SMOOTH
    si = sw[i];
#endif
#if DOTR
    rx = r[3 * i], ry = r[3 * i + 1], rz = r[3 * i + 2];
#endif
  }
  __device__ __forceinline__ double S(const double* sw, int j) const { return si * sw[j]; }
  __device__ __forceinline__ double R(const double* r, int j) const {
    return rx * r[3 * j] + ry * r[3 * j + 1] + rz * r[3 * j + 2];
  }
  __device__ __forceinline__ double F(const double* sw, const double* r, int j) const {
#if SMOOTH && DOTR
    return S(sw, j) * R(r, j);
#elif SMOOTH
    return S(sw, j);
#elif DOTR
    return R(r, j);
#else
    return 1.0;
#endif
  }
};

// Row i's softmax from its logits Lr (raw: s q k^T): t[k] = T_ij for j = lane + 32 k (0 past N), as
// attn_rows.cu's attn_fwd computes it.
__device__ __forceinline__ void row_softmax(const double* Lr, const Gate& gt, const double* sw,
                                            const unsigned char* mask, int i, double* t) {
  const int lane = threadIdx.x & 31;
  const double mi = mask[i] ? 1.0 : 0.0;
  bool use[K];
  double mx = LOWEST;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int j = lane + 32 * k;
    double l = LOWEST;
    use[k] = j < N;
    if (j < N) {
      l = Lr[j];
#if SMOOTH
      l = (l + SHIFT) * gt.S(sw, j) - SHIFT;
#else
      use[k] = mask[j] != 0;
#endif
    }
    t[k] = l;
    if (use[k]) mx = fmax(mx, l);
  }
  mx = warp_max(mx);
#if SMOOTH && NPAD
  mx = fmax(mx, -SHIFT);
#endif
  double s = 0.0;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const double e = use[k] ? exp(t[k] - mx) : 0.0;
    t[k] = e;
    s += e;
  }
  s = warp_sum(s);
#if SMOOTH && NPAD
  s += (double)NPAD * exp(-SHIFT - mx);
#endif
  const double den = fmax(s, 1.0);
#pragma unroll
  for (int k = 0; k < K; ++k) t[k] = t[k] / den * mi;
}

extern "C" __global__ void __launch_bounds__(32 * NW)
attn_core_fwd(const double* __restrict__ z, const double* __restrict__ sw, const double* __restrict__ r,
              const unsigned char* __restrict__ mask, long long B, double scale, double* __restrict__ o) {
  DYN_SMEM(sm);
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const long long P = B * N * H;  // the size of each of q, k, v
  for (long long b = blockIdx.x; b < B; b += gridDim.x) {
    const double* q = z + b * N * H;
    const double *swb = sw + b * N, *rb = r + 3 * b * N;
    const unsigned char* mb = mask + b * N;
    prod_xyt(q, q + P, scale, sm);
    __syncthreads();
    for (int i = w; i < N; i += NW) {  // A = T F in place of the logits
      double* Lr = sm + i * LDS;
      const Gate gt(swb, rb, i);
      double t[K];
      row_softmax(Lr, gt, swb, mb, i, t);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int j = lane + 32 * k;
        if (j < N) Lr[j] = t[k] * gt.F(swb, rb, j);
      }
    }
    __syncthreads();
    prod_my<0>(sm, q + 2 * P, o + b * N * H);
    __syncthreads();  // the next centre overwrites sm
  }
}

extern "C" __global__ void __launch_bounds__(32 * NW)
attn_core_bwd(const double* __restrict__ z, const double* __restrict__ dout, const double* __restrict__ sw,
              const double* __restrict__ r, const unsigned char* __restrict__ mask, long long B, double scale,
              double* __restrict__ dz, double* __restrict__ dsw, double* __restrict__ dr) {
  DYN_SMEM(sm);
  double* C1 = sm;            // the logits, then A
  double* C2 = sm + N * LDS;  // dA, then dL
  double* acc = C2 + N * LDS;  // (dS + dS^T) sw (N), then (dR + dR^T) r (N x 3), this centre's
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const long long P = B * N * H;
  for (long long b = blockIdx.x; b < B; b += gridDim.x) {
    const double* q = z + b * N * H;
    const double* dob = dout + b * N * H;
    const double *swb = sw + b * N, *rb = r + 3 * b * N;
    const unsigned char* mb = mask + b * N;
    for (int j = threadIdx.x; j < 4 * N; j += 32 * NW) acc[j] = 0.0;
    prod_xyt(q, q + P, scale, C1);
    prod_xyt(dob, q + 2 * P, 1.0, C2);
    __syncthreads();
    double cs[K], cr[K][3];  // this lane's columns' dS^T sw and dR^T r terms, over the warp's rows
#pragma unroll
    for (int k = 0; k < K; ++k) cs[k] = cr[k][0] = cr[k][1] = cr[k][2] = 0.0;
    for (int i = w; i < N; i += NW) {
      double *Lr = C1 + i * LDS, *dAr = C2 + i * LDS;
      const Gate gt(swb, rb, i);
      double t[K], a[K], lq[K], ds[K], drr[K];
      row_softmax(Lr, gt, swb, mb, i, t);
      double s = 0.0;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int j = lane + 32 * k;
        a[k] = lq[k] = ds[k] = drr[k] = 0.0;
        if (j < N) {
          double x = dAr[j];
          lq[k] = Lr[j];
#if SMOOTH
          const double Sij = gt.S(swb, j);
#endif
#if DOTR
          const double Rij = gt.R(rb, j);
#endif
#if SMOOTH && DOTR
          const double at = x * t[k];
          ds[k] = at * Rij;
          drr[k] = at * Sij;
          x = x * (Sij * Rij);
#elif SMOOTH
          ds[k] = x * t[k];
          x = x * Sij;
#elif DOTR
          drr[k] = x * t[k];
          x = x * Rij;
#endif
          a[k] = x;
          s += x * t[k];
          Lr[j] = t[k] * gt.F(swb, rb, j);  // A, for dv = A^T do
        }
      }
      s = warp_sum(s);
      double rs = 0.0, rx = 0.0, ry = 0.0, rz = 0.0;  // row i's dS sw and dR r
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int j = lane + 32 * k;
        if (j < N) {
          double dl = (a[k] - s) * t[k];
#if SMOOTH
          ds[k] += (lq[k] + SHIFT) * dl;
          dl = dl * gt.S(swb, j);
          rs += ds[k] * swb[j];
          cs[k] += ds[k] * gt.si;
#endif
#if DOTR
          rx += drr[k] * rb[3 * j], ry += drr[k] * rb[3 * j + 1], rz += drr[k] * rb[3 * j + 2];
          cr[k][0] += drr[k] * gt.rx, cr[k][1] += drr[k] * gt.ry, cr[k][2] += drr[k] * gt.rz;
#endif
          dAr[j] = dl;
        }
      }
#if SMOOTH
      rs = warp_sum(rs);
      if (lane == 0) atomicAdd(acc + i, rs);
#endif
#if DOTR
      rx = warp_sum(rx), ry = warp_sum(ry), rz = warp_sum(rz);
      if (lane == 0) atomicAdd(acc + N + 3 * i, rx), atomicAdd(acc + N + 3 * i + 1, ry), atomicAdd(acc + N + 3 * i + 2, rz);
#endif
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = lane + 32 * k;
      if (j < N) {
#if SMOOTH
        atomicAdd(acc + j, cs[k]);
#endif
#if DOTR
        for (int c = 0; c < 3; ++c) atomicAdd(acc + N + 3 * j + c, cr[k][c]);
#endif
      }
    }
    __syncthreads();
    prod_my<1>(C1, dob, dz + 2 * P + b * N * H);  // dv = A^T do
    prod_my<0>(C2, q + P, dz + b * N * H);        // dL k
    prod_my<1>(C2, q, dz + P + b * N * H);        // dL^T q
#if SMOOTH
    for (int j = threadIdx.x; j < N; j += 32 * NW) dsw[b * N + j] += acc[j];
#endif
#if DOTR
    for (int j = threadIdx.x; j < 3 * N; j += 32 * NW) dr[3 * b * N + j] += acc[N + j];
#endif
    __syncthreads();  // the next centre overwrites sm and acc
  }
}
