// The backward's row arrays in shared memory (attn_layer_bwd.cuh includes it after bstore / mstore): staging y's
// rows, the row chain's (n, n) matrices A and dL, and the products M^T Y that read them.

// acc (the warp's rows j, 16 x H) = M^T Y: M (N, N) (B16: in shared memory as FP16, rows of LDM; else row-major
// in device memory, this block's scratch), Y (N, LDK) in shared memory (TF32-rounded or FP16, rows past n zero);
// the products' k runs over M's rows i
__device__ __forceinline__ void prod_mty(const mstore* __restrict__ M, const bstore* Y, float (&acc)[HT][4]) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int c = 0; c < HT; ++c) acc[c][0] = acc[c][1] = acc[c][2] = acc[c][3] = 0.f;
#if B16
  // the A operand M^T of k tile it (M's rows 16 it ..), the warp's rows j: four 8 x 8 blocks of M, transposed
  const int m = lane >> 3;
  const mstore* ma = M + (8 * (m >> 1) + (lane & 7)) * LDM + 16 * w + 8 * (m & 1);
#pragma unroll 2
  for (int it = 0; it < NT / 2; ++it) {
    unsigned a[4];
    ldsm4t(a, ma + 16 * it * LDM);
    hmma_cols(acc, a, Y, LDK, it);
  }
#else
  const int j0 = 16 * w + g, j1 = j0 + 8;
#pragma unroll 2
  for (int it = 0; it < NT; ++it) {
    const int ia = 8 * it + t, ib = ia + 4;
    const unsigned a0 = tf32(M[ia * N + j0]), a1 = tf32(M[ia * N + j1]), a2 = tf32(M[ib * N + j0]),
                   a3 = tf32(M[ib * N + j1]);
#pragma unroll
    for (int c = 0; c < HT; ++c) tmma(acc[c], a0, a1, a2, a3, Y[ia * LDK + 8 * c + g], Y[ib * LDK + 8 * c + g]);
  }
#endif
}

// Ys (N, LDK) = Y (n, H) (ystore's order) TF32-rounded (B16: FP16) in column order, rows past n zero (16-byte loads,
// four in flight per thread; the caller syncs before and after)
__device__ __forceinline__ void stage_rows(const ystore* __restrict__ Y, bstore* Ys, int n) {
  constexpr int PER = 16 / sizeof(ystore), CH = N * H / PER;  // values per 16-byte chunk, chunks
  for (int k0 = threadIdx.x; k0 < CH; k0 += 4 * 32 * NW) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int k = k0 + u * 32 * NW;
      v[u] = make_uint4(0u, 0u, 0u, 0u);
      if (k < CH && (PER * k) / H < n) v[u] = reinterpret_cast<const uint4*>(Y)[k];
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int k = k0 + u * 32 * NW;
      if (k < CH) {
        const int row = (PER * k) / H, q0 = (PER * k) % H;
        const unsigned w[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
#pragma unroll
        for (int p = 0; p < PER / 2; ++p) {
#if B16 && YH
          *reinterpret_cast<unsigned*>(Ys + row * LDK + ycol(q0 + 2 * p)) = w[p];  // the pair as it is
#elif B16
          *reinterpret_cast<unsigned*>(Ys + row * LDK + ycol(q0 + 2 * p)) =
              h2pack(__uint_as_float(w[2 * p]), __uint_as_float(w[2 * p + 1]));
#else
#if YH
          const float a = h2f((unsigned short)(w[p] & 0xffffu)), b = h2f((unsigned short)(w[p] >> 16));
#else
          const float a = __uint_as_float(w[2 * p]), b = __uint_as_float(w[2 * p + 1]);
#endif
          *reinterpret_cast<float2*>(Ys + row * LDK + ycol(q0 + 2 * p)) =
              make_float2(__uint_as_float(tf32(a)), __uint_as_float(tf32(b)));
#endif
        }
      }
    }
  }
}

// where the lane's pair of L + SHIFT (row i, columns 8 jt + 2t, + 1) waits between the softmax and the row chain's
// pass 2. B16: in A's and dL's shared rows (no device-memory round trip), free until pass 2 writes tile jt of both
// after reading tile jt of L (each warp its own rows); lane (g, t) keeps it in A's row i (t < 2) or dL's row i ^ 4
// (t >= 2), bytes 16 jt + 8 (t & 1): the 8-byte accesses of a half warp hit 32 different banks. Else at
// Ls[i N + j] in the block's scratch.
__device__ __forceinline__ float2* l_slot(mstore* As, mstore* dLs, float* Ls, int i, int jt) {
  const int t = threadIdx.x & 3;
#if B16
  return reinterpret_cast<float2*>((t < 2 ? As + i * LDM : dLs + (i ^ 4) * LDM) + 8 * jt + 4 * (t & 1));
#else
  return reinterpret_cast<float2*>(Ls + i * N + 8 * jt + 2 * t);
#endif
}

// an accumulator tile (the warp's rows, n tile jt) into M (prod_mty's layout)
__device__ __forceinline__ void store_m(mstore* M, int jt, const float (&v)[4]) {
  const int lane = threadIdx.x & 31, i0 = 16 * (threadIdx.x >> 5) + (lane >> 2), j = 8 * jt + 2 * (lane & 3);
#if B16
  *reinterpret_cast<unsigned*>(M + i0 * LDM + j) = h2pack(v[0], v[1]);
  *reinterpret_cast<unsigned*>(M + (i0 + 8) * LDM + j) = h2pack(v[2], v[3]);
#else
  *reinterpret_cast<float2*>(M + i0 * N + j) = make_float2(v[0], v[1]);
  *reinterpret_cast<float2*>(M + (i0 + 8) * N + j) = make_float2(v[2], v[3]);
#endif
}
