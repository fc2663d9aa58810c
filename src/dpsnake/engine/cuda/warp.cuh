// Sum of v over the 32 lanes of a warp (every lane gets it): the row kernels' reductions (REAL defined
// by the including source).
__device__ __forceinline__ REAL warp_sum(REAL v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
