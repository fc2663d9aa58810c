/* Neighbour selection, one thread per centre (selection.py; compiled with -DNNEI=sum(sel) -DNT=ntypes):
   the nearest NNEI candidates within rcut by a stable insertion sort, then split by type. */
extern "C" __global__ void select_nb(
#include "select_params.cuh"

    const bool* __restrict__ only, const long long use_only)
{
    long long i = (long long)blockDim.x * blockIdx.x + threadIdx.x;
    if (i >= n || (use_only && !only[i])) return;
    double rl[NNEI];
    long long jl[NNEI];
    int m = 0;
    long long within = 0;
    const double cx = cpos[3 * i], cy = cpos[3 * i + 1], cz = cpos[3 * i + 2];
    const long long self = cidx[i];
    for (int b = 0; b < 27; ++b) {
        const long long s = bstart[27 * i + b], e = s + bcnt[27 * i + b];
        for (long long k = s; k < e; ++k) {
            const double dx = epos[3 * k] - cx, dy = epos[3 * k + 1] - cy, dz = epos[3 * k + 2] - cz;
            const double r = sqrt(dx * dx + dy * dy + dz * dz);
            if (r > rcut || eidx[k] == self) continue;
            ++within;
            if (m == NNEI && r >= rl[NNEI - 1]) continue;
            int p = (m < NNEI) ? m : NNEI - 1;
            while (p > 0 && rl[p - 1] > r) { rl[p] = rl[p - 1]; jl[p] = jl[p - 1]; --p; }
            rl[p] = r; jl[p] = k;
            if (m < NNEI) ++m;
        }
    }
    int cnt[NT];
    for (int t = 0; t < NT; ++t) cnt[t] = 0;
    bool of = within > NNEI;
    for (int p = 0; p < m; ++p) {
        const long long k = jl[p];
        const int t = (int)etype[k];
        if (cnt[t] < sel[t]) {
            const long long slot = (long long)NNEI * i + sec[t] + cnt[t];
            owner[slot] = eown[k];
            dout[3 * slot] = epos[3 * k] - cx;
            dout[3 * slot + 1] = epos[3 * k + 1] - cy;
            dout[3 * slot + 2] = epos[3 * k + 2] - cz;
            ++cnt[t];
        } else {
            of = true;
        }
    }
    over[i] = of;
    for (int t = 0; t < NT; ++t) if (cnt[t]) atomicMax(&stats[t], cnt[t]);
    if (of) atomicAdd(&stats[NT], 1);
}
