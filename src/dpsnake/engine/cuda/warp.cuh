// Sum of v over the 32 lanes of a warp (every lane gets it): the row kernels' reductions (REAL defined
// by the including source).
__device__ __forceinline__ REAL warp_sum(REAL v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// A warp per unit (a row, a neighbour slot), WPB warps per block (the including source's constant), grid-stride:
// `WARP_LOOP(p, n) { ... }` runs the body for unit p in [0, n) with `lane` defined (cuda.WarpKernels launches these)
#define WARP_LOOP(p, n)                 \
  const int lane = threadIdx.x & 31;    \
  for (long long p = (long long)blockIdx.x * WPB + threadIdx.x / 32; p < (n); p += (long long)gridDim.x * WPB)
