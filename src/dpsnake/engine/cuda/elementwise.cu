/* Fused elementwise kernels (cupy.ElementwiseKernel) of elementwise.py: one section per kernel,
   "// @kernel NAME", "// @in PARAMS", "// @out PARAMS", then the body (cuda/__init__.py reads them).
   T is the net dtype (float or double); i the element index. */

// @kernel tanh_dy
// @in T a, T w, T b, T idt, T res
// @out T y, T dy
// y = tanh(a w + b) idt + res, dy = (1 - t^2) idt (all broadcast)
const T t = tanh(a * w + b); y = t * idt + res; dy = ((T)1 - t * t) * idt;

// @kernel tanh
// @in T a, T w, T b, T idt, T res
// @out T y
y = tanh(a * w + b) * idt + res;

// @kernel add2
// @in T g0, T g1
// @out T g
// backward of a concat(x, x) residual: g += g0 + g1 (left to right, as the array code)
g = g + g0 + g1;

// @kernel env_fwd
// @in bool valid, raw float64 d, raw float64 davg, raw float64 rstd, int64 nnei, float64 rs, float64 rc, float64 p
// @out raw T Rn
// env matrix: element i = (centre, slot); d (n, nnei, 3) and Rn (n, nnei, 4) contiguous
    const long long s = i % nnei;
    double R0 = 0.0, R1 = 0.0, R2 = 0.0, R3 = 0.0;
    if (valid) {
        const double dx = d[3 * i], dy = d[3 * i + 1], dz = d[3 * i + 2];

#include "switch.cuh"

        R0 = sw * q;
        const double s2 = sw * q * q;
        R1 = s2 * dx; R2 = s2 * dy; R3 = s2 * dz;
    }
    Rn[4 * i] = (T)((R0 - davg[4 * s]) * rstd[4 * s]);
    Rn[4 * i + 1] = (T)((R1 - davg[4 * s + 1]) * rstd[4 * s + 1]);
    Rn[4 * i + 2] = (T)((R2 - davg[4 * s + 2]) * rstd[4 * s + 2]);
    Rn[4 * i + 3] = (T)((R3 - davg[4 * s + 3]) * rstd[4 * s + 3]);


// @kernel env_bwd
// @in bool valid, raw T gRn, raw float64 d, raw float64 rstd, int64 nnei, float64 rs, float64 rc, float64 p
// @out raw float64 g
// chain rule dE/dRn -> g = dE/dd through R = sw [q, d q^2]; empty slots give exactly 0
    const long long s = i % nnei;
    double g0 = 0.0, g1 = 0.0, g2 = 0.0;
    if (valid) {
        const double dx = d[3 * i], dy = d[3 * i + 1], dz = d[3 * i + 2];

#include "switch.cuh"

        const double dsw = (r > rs && r < rc) ? -30.0 * u2 * (u - 1.0) * (u - 1.0) / (rc - rs) : 0.0;
        const double a0 = (double)gRn[4 * i] * rstd[4 * s];
        const double a1 = (double)gRn[4 * i + 1] * rstd[4 * s + 1];
        const double a2 = (double)gRn[4 * i + 2] * rstd[4 * s + 2];
        const double a3 = (double)gRn[4 * i + 3] * rstd[4 * s + 3];
        const double gvd = a1 * dx + a2 * dy + a3 * dz;
        const double coef = (a0 * (dsw * q - sw * q * q) + gvd * (dsw * q * q - 2.0 * sw * q * q * q)) / r;
        const double s2 = sw * q * q;
        g0 = coef * dx + s2 * a1; g1 = coef * dy + s2 * a2; g2 = coef * dz + s2 * a3;
    }
    g[3 * i] = g0; g[3 * i + 1] = g1; g[3 * i + 2] = g2;


// @kernel attn_env_fwd
// @in bool valid, bool mask, raw float64 d, raw float64 davg, raw float64 rstd, int64 ns, float64 rs, float64 rc, float64 p, float64 eps
// @out raw T Rn, raw T swm, raw T un
// se_atten's env matrix (attn/descriptor.py): Rn = (R - davg) rstd, zero rows where a real neighbour is excluded
// (valid, not mask); swm = sw mask; un = Rn[1:4] / max(|Rn[1:4]|, eps). Element i = (centre, slot); d (n, ns, 3),
// Rn (n, ns, 4), un (n, ns, 3) contiguous; davg, rstd (ns, 4): the centre type's first ns slots
    const long long s = i % ns;
    double R0 = 0.0, R1 = 0.0, R2 = 0.0, R3 = 0.0, swv = 0.0;
    if (valid) {
        const double dx = d[3 * i], dy = d[3 * i + 1], dz = d[3 * i + 2];

#include "switch.cuh"

        swv = sw;
        R0 = sw * q;
        const double s2 = sw * q * q;
        R1 = s2 * dx; R2 = s2 * dy; R3 = s2 * dz;
    }
    const double k = (valid && !mask) ? 0.0 : 1.0;
    const double n0 = (R0 - davg[4 * s]) * rstd[4 * s] * k, n1 = (R1 - davg[4 * s + 1]) * rstd[4 * s + 1] * k;
    const double n2 = (R2 - davg[4 * s + 2]) * rstd[4 * s + 2] * k, n3 = (R3 - davg[4 * s + 3]) * rstd[4 * s + 3] * k;
    Rn[4 * i] = (T)n0; Rn[4 * i + 1] = (T)n1; Rn[4 * i + 2] = (T)n2; Rn[4 * i + 3] = (T)n3;
    swm[i] = (T)(mask ? swv : 0.0);
    const double den = fmax(sqrt(n1 * n1 + n2 * n2 + n3 * n3), eps);
    un[3 * i] = (T)(n1 / den); un[3 * i + 1] = (T)(n2 / den); un[3 * i + 2] = (T)(n3 / den);


// @kernel attn_env_bwd
// @in bool valid, bool mask, raw T gRn, raw T gs0, raw T gu, raw float64 gsw, raw float64 d, raw float64 davg, raw float64 rstd, int64 ns, float64 rs, float64 rc, float64 p, float64 eps, int32 flags
// @out raw float64 g
// attn_env_fwd's chain rule back to g = dE/dd (attn/descriptor.py): dE/dRn = gRn (+ gs0 on channel 0 with flags & 1;
// + un's backward from gu (n, ns, 3) with flags & 2), dE/dswm = gsw with flags & 4; empty slots give exactly 0
    const long long s = i % ns;
    double g0 = 0.0, g1 = 0.0, g2 = 0.0;
    if (valid) {
        const double dx = d[3 * i], dy = d[3 * i + 1], dz = d[3 * i + 2];

#include "switch.cuh"

        const double dsw = (r > rs && r < rc) ? -30.0 * u2 * (u - 1.0) * (u - 1.0) / (rc - rs) : 0.0;
        double a0 = (double)gRn[4 * i], a1 = (double)gRn[4 * i + 1], a2 = (double)gRn[4 * i + 2], a3 = (double)gRn[4 * i + 3];
        if (flags & 2) {  // un = x / den, x = Rn[1:4]: (gu - un (un . gu)) / |x| above eps, gu / eps below
            const double s2 = sw * q * q, k = mask ? 1.0 : 0.0;
            const double x1 = (s2 * dx - davg[4 * s + 1]) * rstd[4 * s + 1] * k;
            const double x2 = (s2 * dy - davg[4 * s + 2]) * rstd[4 * s + 2] * k;
            const double x3 = (s2 * dz - davg[4 * s + 3]) * rstd[4 * s + 3] * k;
            const double nrm = sqrt(x1 * x1 + x2 * x2 + x3 * x3), den = fmax(nrm, eps);
            const double u1 = x1 / den, u2_ = x2 / den, u3 = x3 / den;
            const double h1 = (double)gu[3 * i], h2 = (double)gu[3 * i + 1], h3 = (double)gu[3 * i + 2];
            if (nrm > eps) {
                const double uh = u1 * h1 + u2_ * h2 + u3 * h3;
                a1 += (h1 - u1 * uh) / den; a2 += (h2 - u2_ * uh) / den; a3 += (h3 - u3 * uh) / den;
            } else {
                a1 += h1 / eps; a2 += h2 / eps; a3 += h3 / eps;
            }
        }
        if (flags & 1) a0 += (double)gs0[i];
        const double k = mask ? 1.0 : 0.0;  // excluded neighbours: no gradient through their zeroed rows
        a0 *= rstd[4 * s] * k; a1 *= rstd[4 * s + 1] * k; a2 *= rstd[4 * s + 2] * k; a3 *= rstd[4 * s + 3] * k;
        const double gvd = a1 * dx + a2 * dy + a3 * dz;
        double coef = a0 * (dsw * q - sw * q * q) + gvd * (dsw * q * q - 2.0 * sw * q * q * q);
        if ((flags & 4) && mask) coef += gsw[i] * dsw;
        coef /= r;
        const double s2 = sw * q * q;
        g0 = coef * dx + s2 * a1; g1 = coef * dy + s2 * a2; g2 = coef * dz + s2 * a3;
    }
    g[3 * i] = g0; g[3 * i + 1] = g1; g[3 * i + 2] = g2;


// @kernel scatter_neg
// @in T g, int64 own, bool valid
// @out raw T f
// f[own] -= g over (n, nnei, 3) (own, valid broadcast over the last axis); f (N, 3) contiguous
if (valid) atomicAdd(&f[own * 3 + i % 3], -g);

// @kernel centre_sums
// @in raw float64 g, raw float64 d, int64 nc
// @out float64 out
// per centre c: out[c, 0:3] = sum_s g[c, s], out[c, 3 + 3a + b] = -sum_s g[c, s, a] d[c, s, b]
    const long long c = i / 12, base = c * nc * 3;
    const int j = (int)(i - 12 * c);
    double s = 0.0;
    if (j < 3) {
        for (long long t = 0; t < nc; ++t) s += g[base + 3 * t + j];
    } else {
        const long long a = (j - 3) / 3, b = (j - 3) % 3;
        for (long long t = 0; t < nc; ++t) s -= g[base + 3 * t + a] * d[base + 3 * t + b];
    }
    out = s;


// @kernel desc_D
// @in raw T gr, int64 M1, int64 A
// @out T D
// D[c, p, q] = sum_k gr[c, k, p] gr[c, k, q], gr (n, 4, M1), D (n, M1, A)
    // one 64-bit division per element (they cost ~4x the 32-bit ones, and this kernel is all index)
    const long long c = i / (M1 * A), b = c * 4 * M1;
    const int r = (int)(i - c * M1 * A), p = r / (int)A, q = r - p * (int)A;
    D = gr[b + p] * gr[b + q] + gr[b + M1 + p] * gr[b + M1 + q]
        + gr[b + 2 * M1 + p] * gr[b + 2 * M1 + q] + gr[b + 3 * M1 + p] * gr[b + 3 * M1 + q];


// @kernel desc_ggr
// @in raw T gr, raw T gD, int64 M1, int64 A, T scale
// @out T ggr
// backward of D to gr: ggr[c, k, p] = (sum_q gr[c, k, q] gD[c, p, q]
// + [p < A] sum_m gr[c, k, m] gD[c, m, p]) * scale,
// the second term (p < A only) in its own launch so no warp waits on a few long loops
    const long long c = i / (4 * M1);
    const int r = (int)(i - c * 4 * M1), k = r / (int)M1, p = r - k * (int)M1;
    const long long gb = c * 4 * M1 + k * M1, db = c * M1 * A;
    T v = 0;
    for (long long q = 0; q < A; ++q) v += gr[gb + q] * gD[db + p * A + q];
    ggr = p < A ? v : v * scale;


// @kernel desc_ggr_add
// @in raw T gr, raw T gD, int64 M1, int64 A, T scale
// @out T ggr
    const long long c = i / (4 * A);
    const int r = (int)(i - c * 4 * A), k = r / (int)A, p = r - k * (int)A;
    const long long gb = c * 4 * M1 + k * M1, db = c * M1 * A;
    T v2 = 0;
    for (long long m = 0; m < M1; ++m) v2 += gr[gb + m] * gD[db + m * A + p];
    ggr = (ggr + v2) * scale;


// @kernel compact
// @in raw int64 owner, raw float64 d, raw int64 centers, raw int64 cols, int64 nnei, int64 nc
// @out int64 owner_c, int64 own, raw float64 dc, bool valid
// compaction of a chunk: element i = (centre c, kept column j) of (n, nc); owner, d (n, nnei[, 3])
    const long long c = i / nc, src = c * nnei + cols[i - c * nc];
    const long long o = owner[src];
    owner_c = o; valid = o >= 0; own = o >= 0 ? o : centers[c];
    dc[3 * i] = d[3 * src]; dc[3 * i + 1] = d[3 * src + 1]; dc[3 * i + 2] = d[3 * src + 2];
