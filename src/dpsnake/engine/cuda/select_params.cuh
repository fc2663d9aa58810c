/* the parameters both selection kernels share (same contract: selection.select_neighbors) */
    const long long n, const double rcut,
    const double* __restrict__ cpos, const long long* __restrict__ cidx,
    const long long* __restrict__ bstart, const long long* __restrict__ bcnt,
    const double* __restrict__ epos, const long long* __restrict__ eown,
    const long long* __restrict__ etype, const long long* __restrict__ eidx,
    const int* __restrict__ sel, const int* __restrict__ sec,
    long long* __restrict__ owner, double* __restrict__ dout, bool* __restrict__ over,
    int* __restrict__ stats,
