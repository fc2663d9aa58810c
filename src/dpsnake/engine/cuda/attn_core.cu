// Fused core of one FP64 attention layer of DPA-1 (attn_core.py): a block per centre, the products on
// FP64 tensor cores (PTX mma.m8n8k4.f64), the (N, N) matrices in registers (shared memory only where a
// product needs one transposed).
//
// Compile-time constants: N (slots, a multiple of 8), H (q/k/v width, a multiple of 8), SMOOTH, DOTR,
// NPAD (as attn_rows.cu: SMOOTH only; empty keys the chunk left out, counted in each row's softmax).
// NW = N / 8 warps. Warp w owns rows 8w..8w+7 ("its strip") of every product and of the (N, N)
// matrices, held as mma accumulators: lane 4 g + t holds row i = 8 w + g at columns 8 c + 2 t + e
// (c < NW, e < 2), so the row passes reduce over the 4 lanes of a group, not through memory.
//
// attn_core_fwd: o = A v from q, k, v (z: (3, B, N, H)): L = s q k^T, T = softmax(L') m_i, A = T F
//                (attention.py's module doc).
// attn_core_bwd: from do = dLoss/do: dz[0] = dL k, dz[1] = dL^T q (both without s, as attention.py's
//                q/k/v backward expects them), dz[2] = A^T do; dsw += (dS + dS^T) sw (SMOOTH),
//                dr += (dR + dR^T) r (DOTR), per centre. L and T are recomputed (one more q k^T): the
//                forward keeps nothing. A^T and dL^T go through shared memory, one (N, N) at a time.
// The b operand of every product (k, v, do or q of the centre) is staged in shared memory first.
// Sums differ from attention.py's array code (cuBLAS) only in rounding order.

#define SHIFT 20.0
#define NW (N / 8)
#define HT (H / 8)
#define LDS (N + 1)  // row stride of the shared (N, N) matrix: odd, fewer bank conflicts
#define LDY (H + 4)  // row stride of a staged (N, H) operand: the b fragments' 16 lanes of a half-warp in 16 banks
#define LOWEST (-1.7976931348623157e308)
#define FULL 0xffffffffu

// c (8 x 8) += a (8 x 4) b (4 x 8), a warp-wide FP64 tensor-core product. Lane l = 4 g + t holds
// a[g][t], b[t][g] and c[g][2t], c[g][2t + 1] (PTX ISA, "Matrix fragments for mma.m8n8k4 .f64").
// Not volatile: the compiler may schedule loads between the products. The tests define DMMA and their
// own dmma (g++ with threaded warps).
#ifndef DMMA
__device__ __forceinline__ void dmma(double& c0, double& c1, double a, double b) {
  asm("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%0, %1};\n"
               : "+d"(c0), "+d"(c1)
               : "d"(a), "d"(b));
}
#endif
#ifndef DYN_SMEM
#define DYN_SMEM(name) extern __shared__ double name[]
#endif

typedef double Strip[NW][2];  // a warp's strip of an (N, N) matrix, accumulator layout

// over the 4 lanes of a group (one row of the strip)
__device__ __forceinline__ double row_max(double v) {
  v = fmax(v, __shfl_xor_sync(FULL, v, 1));
  return fmax(v, __shfl_xor_sync(FULL, v, 2));
}
__device__ __forceinline__ double row_sum(double v) {
  v += __shfl_xor_sync(FULL, v, 1);
  return v + __shfl_xor_sync(FULL, v, 2);
}
// over the 8 groups (one column of the strip)
__device__ __forceinline__ double col_sum(double v) {
  v += __shfl_xor_sync(FULL, v, 4);
  v += __shfl_xor_sync(FULL, v, 8);
  return v + __shfl_xor_sync(FULL, v, 16);
}

// Ys (shared, stride LDY) = Y (N x H, global): every product reads its b operand from shared memory
// (from global memory, one fragment touched 4-8 cache lines: 1.5x slower than cuBLAS, 2026-12-05).
// The caller syncs before (Ys free) and after (Ys written).
__device__ __forceinline__ void stage(const double* __restrict__ Y, double* Ys) {
  for (int k = threadIdx.x; k < N * H / 2; k += 32 * NW) {
    const int row = (2 * k) / H, col = (2 * k) % H;
    const double2 v = reinterpret_cast<const double2*>(Y)[k];
    Ys[row * LDY + col] = v.x, Ys[row * LDY + col + 1] = v.y;
  }
}

// m = s X Y^T, the warp's strip; X (N x H) row-major in global memory, Y staged (Ys).
__device__ __forceinline__ void prod_xyt(const double* __restrict__ X, const double* Y, double s, Strip& m) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int c = 0; c < NW; ++c) m[c][0] = m[c][1] = 0.0;
  const double* xr = X + (8 * w + g) * H + t;
  const double* yr = Y + g * LDY + t;
#pragma unroll 2
  for (int k0 = 0; k0 < H; k0 += 4) {
    const double a = xr[k0];
#pragma unroll
    for (int c = 0; c < NW; ++c) dmma(m[c][0], m[c][1], a, yr[c * 8 * LDY + k0]);
  }
#pragma unroll
  for (int c = 0; c < NW; ++c) m[c][0] *= s, m[c][1] *= s;
}

// O (N x H, global) = A Y, Y staged (Ys), the a operand a[g][t] = A[i][k0 + t] of row i = 8 w + g from
// a_of(k0): the loop is unrolled, so a_of may index registers with k0.
template <class AOf>
__device__ __forceinline__ void prod_ay(AOf a_of, const double* Y, double* __restrict__ O) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  double acc[HT][2];
#pragma unroll
  for (int c = 0; c < HT; ++c) acc[c][0] = acc[c][1] = 0.0;
#pragma unroll
  for (int k0 = 0; k0 < N; k0 += 4) {
    const double a = a_of(k0);
    const double* yr = Y + (k0 + t) * LDY + g;
#pragma unroll
    for (int c = 0; c < HT; ++c) dmma(acc[c][0], acc[c][1], a, yr[8 * c]);
  }
  double* o = O + (8 * w + g) * H + 2 * t;
#pragma unroll
  for (int c = 0; c < HT; ++c) o[8 * c] = acc[c][0], o[8 * c + 1] = acc[c][1];
}

// O = M Y: M the warps' strips in registers, a[g][t] fetched from the accumulator layout by two shuffles.
__device__ __forceinline__ void prod_rm(const Strip& m, const double* Y, double* __restrict__ O) {
  const int lane = threadIdx.x & 31, t = lane & 3;
  prod_ay(
      [&](int k0) {
        const int p = (k0 & 7) + t, src = (lane & ~3) | (p >> 1);
        const double v0 = __shfl_sync(FULL, m[k0 / 8][0], src), v1 = __shfl_sync(FULL, m[k0 / 8][1], src);
        return (p & 1) ? v1 : v0;
      },
      Y, O);
}

// O = M^T Y: M (N x N) in shared memory (stride LDS).
__device__ __forceinline__ void prod_mty(const double* M, const double* Y, double* __restrict__ O) {
  const int t = threadIdx.x & 3, i = 8 * (threadIdx.x >> 5) + ((threadIdx.x & 31) >> 2);
  prod_ay([&](int k0) { return M[(k0 + t) * LDS + i]; }, Y, O);
}

// the warp's strip into shared memory (stride LDS)
__device__ __forceinline__ void store_strip(const Strip& m, double* M) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  double* row = M + (8 * w + (lane >> 2)) * LDS + 2 * (lane & 3);
#pragma unroll
  for (int c = 0; c < NW; ++c) row[8 * c] = m[c][0], row[8 * c + 1] = m[c][1];
}

// This lane's slots: its row i's gates and those of its columns j = 8 c + 2 t + e.
struct Gates {
  double si, ri[3];
  __device__ Gates(const double* sw, const double* r, int i) {
    si = SMOOTH ? sw[i] : 0.0;
    for (int d = 0; d < 3; ++d) ri[d] = DOTR ? r[3 * i + d] : 0.0;
  }
  __device__ __forceinline__ double S(const double* sw, int j) const { return si * sw[j]; }
  __device__ __forceinline__ double R(const double* r, int j) const {
    return ri[0] * r[3 * j] + ri[1] * r[3 * j + 1] + ri[2] * r[3 * j + 2];
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

// l (the strip's raw logits s q k^T) -> T (the masked softmax), as attn_rows.cu's attn_fwd.
__device__ __forceinline__ void softmax_strip(Strip& l, const Gates& gt, const double* sw, const unsigned char* mask,
                                              int i) {
  const int t = threadIdx.x & 3;
  double mx = LOWEST;
#pragma unroll
  for (int c = 0; c < NW; ++c)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int j = 8 * c + 2 * t + e;
#if SMOOTH
      l[c][e] = (l[c][e] + SHIFT) * gt.S(sw, j) - SHIFT;
      mx = fmax(mx, l[c][e]);
#else
      if (mask[j]) mx = fmax(mx, l[c][e]);
#endif
    }
  mx = row_max(mx);
#if SMOOTH && NPAD
  mx = fmax(mx, -SHIFT);
#endif
  double s = 0.0;
#pragma unroll
  for (int c = 0; c < NW; ++c)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
#if SMOOTH
      l[c][e] = exp(l[c][e] - mx);
#else
      l[c][e] = mask[8 * c + 2 * t + e] ? exp(l[c][e] - mx) : 0.0;  // a row without keys: all 0
#endif
      s += l[c][e];
    }
  s = row_sum(s);
#if SMOOTH && NPAD
  s += (double)NPAD * exp(-SHIFT - mx);
#endif
  const double den = fmax(s, 1.0), mi = mask[i] ? 1.0 : 0.0;
#pragma unroll
  for (int c = 0; c < NW; ++c) l[c][0] = l[c][0] / den * mi, l[c][1] = l[c][1] / den * mi;
}

extern "C" __global__ void __launch_bounds__(32 * NW)
attn_core_fwd(const double* __restrict__ z, const double* __restrict__ sw, const double* __restrict__ r,
              const unsigned char* __restrict__ mask, long long B, double scale, double* __restrict__ o) {
  DYN_SMEM(Ys);
  const int t = threadIdx.x & 3, i = 8 * (threadIdx.x >> 5) + ((threadIdx.x & 31) >> 2);
  const long long P = B * N * H;  // the size of each of q, k, v
  for (long long b = blockIdx.x; b < B; b += gridDim.x) {
    const double* q = z + b * N * H;
    const double *swb = sw + b * N, *rb = r + 3 * b * N;
    const unsigned char* mb = mask + b * N;
    Strip l;
    stage(q + P, Ys);
    __syncthreads();
    prod_xyt(q, Ys, scale, l);
    const Gates gt(swb, rb, i);
    softmax_strip(l, gt, swb, mb, i);
#if SMOOTH || DOTR
#pragma unroll
    for (int c = 0; c < NW; ++c)
#pragma unroll
      for (int e = 0; e < 2; ++e) l[c][e] *= gt.F(swb, rb, 8 * c + 2 * t + e);  // A = T F
#endif
    __syncthreads();
    stage(q + 2 * P, Ys);
    __syncthreads();
    prod_rm(l, Ys, o + b * N * H);
    __syncthreads();  // the next centre restages Ys
  }
}

// the column sums of v over the strip's 8 rows into acc[j] (one atomic per column and warp)
__device__ __forceinline__ void col_add(double* acc, int j, double v) {
  v = col_sum(v);
  if ((threadIdx.x & 31) < 4) atomicAdd(acc + j, v);
}

extern "C" __global__ void __launch_bounds__(32 * NW)
attn_core_bwd(const double* __restrict__ z, const double* __restrict__ dout, const double* __restrict__ sw,
              const double* __restrict__ r, const unsigned char* __restrict__ mask, long long B, double scale,
              double* __restrict__ dz, double* __restrict__ dsw, double* __restrict__ dr) {
  DYN_SMEM(sm);
  double* acc = sm + N * LDS;  // this centre's (dS + dS^T) sw (N), then (dR + dR^T) r (N x 3)
  double* Ys = acc + 4 * N;    // the staged b operand: v, k, do, q in turn
  const int t = threadIdx.x & 3, i = 8 * (threadIdx.x >> 5) + ((threadIdx.x & 31) >> 2);
  const long long P = B * N * H;
  for (int j = threadIdx.x; j < 4 * N; j += 32 * NW) acc[j] = 0.0;
  __syncthreads();
  for (long long b = blockIdx.x; b < B; b += gridDim.x) {
    const double* q = z + b * N * H;
    const double* dob = dout + b * N * H;
    const double *swb = sw + b * N, *rb = r + 3 * b * N;
    const unsigned char* mb = mask + b * N;
    Strip lq, x, tt;  // the raw logits; dA, then dA F, then dL; T, then A
    stage(q + 2 * P, Ys);
    __syncthreads();
    prod_xyt(dob, Ys, 1.0, x);  // dA = do v^T
    __syncthreads();
    stage(q + P, Ys);
    __syncthreads();
    prod_xyt(q, Ys, scale, lq);  // k stays staged for dL k
    const Gates gt(swb, rb, i);
#pragma unroll
    for (int c = 0; c < NW; ++c) tt[c][0] = lq[c][0], tt[c][1] = lq[c][1];
    softmax_strip(tt, gt, swb, mb, i);
    // pass 1: the terms of A = T S R (dS: dA T R, dR: dA T S) and the row sum of dA F T
    double s = 0.0, rs = 0.0, rv0 = 0.0, rv1 = 0.0, rv2 = 0.0;  // row i's sums: dA F T, dS sw, dR r
#pragma unroll
    for (int c = 0; c < NW; ++c)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = 8 * c + 2 * t + e;
        const double da = x[c][e], at = da * tt[c][e];
#if SMOOTH
        const double Sij = gt.S(swb, j);
#endif
#if DOTR
        const double Rij = gt.R(rb, j);
#endif
#if SMOOTH && DOTR
        const double ds = at * Rij, drv = at * Sij;
        x[c][e] = da * (Sij * Rij);
#elif SMOOTH
        const double ds = at;
        x[c][e] = da * Sij;
#elif DOTR
        const double drv = at;
        x[c][e] = da * Rij;
#endif
        s += x[c][e] * tt[c][e];
#if SMOOTH
        rs += ds * swb[j];
        col_add(acc, j, ds * gt.si);
#endif
#if DOTR
        rv0 += drv * rb[3 * j], rv1 += drv * rb[3 * j + 1], rv2 += drv * rb[3 * j + 2];
        col_add(acc + N, 3 * j, drv * gt.ri[0]);
        col_add(acc + N, 3 * j + 1, drv * gt.ri[1]);
        col_add(acc + N, 3 * j + 2, drv * gt.ri[2]);
#endif
      }
    s = row_sum(s);
    // pass 2: dL' = T (dA F - s); SMOOTH: dS += (L + SHIFT) dL', dL = S dL'; A = T F
#pragma unroll
    for (int c = 0; c < NW; ++c)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = 8 * c + 2 * t + e;
        double dl = (x[c][e] - s) * tt[c][e];
#if SMOOTH
        const double ds = (lq[c][e] + SHIFT) * dl;
        rs += ds * swb[j];
        col_add(acc, j, ds * gt.si);
        dl *= gt.S(swb, j);
#endif
        x[c][e] = dl;
#if SMOOTH || DOTR
        tt[c][e] *= gt.F(swb, rb, j);
#endif
      }
#if SMOOTH
    rs = row_sum(rs);
    if (t == 0) atomicAdd(acc + i, rs);
#endif
#if DOTR
    rv0 = row_sum(rv0), rv1 = row_sum(rv1), rv2 = row_sum(rv2);
    if (t == 0) atomicAdd(acc + N + 3 * i, rv0), atomicAdd(acc + N + 3 * i + 1, rv1), atomicAdd(acc + N + 3 * i + 2, rv2);
#endif
    store_strip(tt, sm);             // A first: its registers are free for dL k
    prod_rm(x, Ys, dz + b * N * H);  // dL k
    __syncthreads();
    stage(dob, Ys);
    __syncthreads();
    prod_mty(sm, Ys, dz + 2 * P + b * N * H);  // dv = A^T do
    __syncthreads();
    store_strip(x, sm);
    stage(q, Ys);
    __syncthreads();
    prod_mty(sm, Ys, dz + P + b * N * H);  // dL^T q
    // the row and column sums are complete (atomics before the first barrier): add them, zero for the next
#if SMOOTH
    for (int j = threadIdx.x; j < N; j += 32 * NW) dsw[b * N + j] += acc[j], acc[j] = 0.0;
#endif
#if DOTR
    for (int j = threadIdx.x; j < 3 * N; j += 32 * NW) dr[3 * b * N + j] += acc[N + j], acc[N + j] = 0.0;
#endif
    __syncthreads();  // the next centre overwrites sm and acc
  }
}
