// Shared by attn_layer.cu's forward and attn_layer_bwd.cuh's backward: sizes, the TF32 product, lane sums.

#define NW (N / 16)
#define EP ((E + 7) / 8 * 8)
#define KE (EP / 8)  // k tiles of x; n tiles of h
#define HT (H / 8)
#define NT (N / 8)
#define LDK (H + 8)  // row stride of k in shared memory: a half-warp's float2 loads in 32 banks (H % 32 == 0)
#define LDV (N + 8)  // row stride of v^T, the same (N % 32 == 0)
#define SHIFT 20.0f
#define LOWEST (-3.402823466e38f)
#define FULL 0xffffffffu

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
