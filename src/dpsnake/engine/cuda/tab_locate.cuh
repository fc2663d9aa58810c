// DeePMD-kit's table lookup (tab.cu, strip_tab.cu; T the including source's float type): the interval of x
// and x - its left node, DeePMD-kit's locate_xx_se_a rules (tabulate.py's TabulatedNet.locate).
__device__ __forceinline__ int locate(T& x, const T lower, const T upper, const T vmax,
                                      const T s0, const T s1, const int nspline) {
    int k;
    if (x < lower) { k = 0; x = (T)0; }
    else if (x < upper) { k = (int)((x - lower) / s0); x -= k * s0 + lower; }
    else if (x < vmax) {
        const int first = (int)((upper - lower) / s0);
        k = first + (int)((x - upper) / s1);
        x -= (k - first) * s1 + upper;
    } else if (x >= vmax) { k = (int)((upper - lower) / s0) + (int)((vmax - upper) / s1) - 1; x = (T)0; }
    else k = 0;  /* NaN: stays NaN, so does G (as in the array code) */
    return k < 0 ? 0 : (k >= nspline ? nspline - 1 : k);
}
