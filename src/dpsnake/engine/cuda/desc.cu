/* The se_e2_a descriptor D = gr^T gr[:, :A] and its backward, one block per centre (desc.py).
   Compiled with -DREAL=float|double -DM1=neuron[-1] -DA=axis_neuron. */
typedef REAL T;
#define AP (A + 1)

extern "C" __global__ void desc_fwd(const T* __restrict__ gr, const long long n, T* __restrict__ D) {
    __shared__ T g[4 * M1];
    for (long long c = blockIdx.x; c < n; c += gridDim.x) {
        const T* src = gr + c * 4 * M1;
        for (int i = threadIdx.x; i < 4 * M1; i += blockDim.x) g[i] = src[i];
        __syncthreads();
        T* dst = D + c * M1 * A;
        for (int i = threadIdx.x; i < M1 * A; i += blockDim.x) {
            const int p = i / A, q = i - p * A;
            dst[i] = g[p] * g[q] + g[M1 + p] * g[M1 + q] + g[2 * M1 + p] * g[2 * M1 + q]
                     + g[3 * M1 + p] * g[3 * M1 + q];
        }
        __syncthreads();
    }
}

extern "C" __global__ void desc_bwd(const T* __restrict__ gr, const T* __restrict__ gD, const long long n,
                                    const T scale, T* __restrict__ ggr) {
    __shared__ T g[4 * M1];
    __shared__ T d[M1 * AP];
    for (long long c = blockIdx.x; c < n; c += gridDim.x) {
        const T* gsrc = gr + c * 4 * M1;
        const T* dsrc = gD + c * M1 * A;
        for (int i = threadIdx.x; i < 4 * M1; i += blockDim.x) g[i] = gsrc[i];
        for (int i = threadIdx.x; i < M1 * A; i += blockDim.x) {
            const int m = i / A;
            d[i + m] = dsrc[i];  /* row m starts at m * (A + 1) */
        }
        __syncthreads();
        T* dst = ggr + c * 4 * M1;
        for (int i = threadIdx.x; i < 4 * M1; i += blockDim.x) {
            const int k = i / M1, p = i - k * M1;
            const T* gk = g + k * M1;
            T v = 0;
            for (int q = 0; q < A; ++q) v += gk[q] * d[p * AP + q];
            if (p < A) {
                T v2 = 0;
                for (int m = 0; m < M1; ++m) v2 += gk[m] * d[m * AP + p];
                v += v2;
            }
            dst[i] = v * scale;
        }
        __syncthreads();
    }
}
