/* Elementwise kernels of the neighbour build (nbr.py), same format as elementwise.cu. Per-system
   geometry is one row of GEO = 32 doubles (nbr.pack_geometry): inv 0-8, h 9-17, margin 18-20,
   pbc 21 (bit mask: bit k set when direction k is periodic), lo 22-24, bsize 25-27, nb 28-30,
   boff 31. Non-periodic directions of slabs and wires have unit rows in h (neighbor.effective_cells):
   no wrapping and no images along them. */

// @kernel nb_wrap
// @in int64 sys, raw float64 coords, raw float64 geo, int64 nimg
// @out raw float64 frac, raw float64 wrapped, raw int64 cbin, int64 nghost
// one atom: wrap into the cell (along periodic directions), its bin, how many ghost images it has
    const long long g = sys * 32;
    const int pmask = (int)geo[g + 21];
    const bool per = pmask != 0;  // periodic in some direction
    double c[3] = {coords[3 * i], coords[3 * i + 1], coords[3 * i + 2]};
    double f[3], p[3];
    for (int j = 0; j < 3; ++j) {
        f[j] = c[0] * geo[g + j] + c[1] * geo[g + 3 + j] + c[2] * geo[g + 6 + j];
        if ((pmask >> j) & 1) f[j] = f[j] - floor(f[j]);
    }
    for (int j = 0; j < 3; ++j)
        p[j] = per ? f[0] * geo[g + 9 + j] + f[1] * geo[g + 12 + j] + f[2] * geo[g + 15 + j] : c[j];
    for (int j = 0; j < 3; ++j) { frac[3 * i + j] = f[j]; wrapped[3 * i + j] = p[j]; }

#include "nbr_bin.cuh"

    for (int k = 0; k < 3; ++k) cbin[3 * i + k] = bb[k];

#include "nbr_range.cuh"

    // images in range per direction (an empty range, lo > hi, only for a NaN position: no ghosts)
    long long nimage = 1;
    for (int k = 0; k < 3; ++k) nimage *= hi[k] >= lo[k] ? hi[k] - lo[k] + 1 : 0;
    nghost = per && nimage > 0 ? nimage - 1 : 0;


// @kernel nb_ghosts
// @in int64 sys, int64 ends, int64 nghost, raw float64 frac, raw float64 wrapped, raw int64 cbin, raw float64 geo, int64 nimg, int64 natoms, int64 cap
// @out raw int64 eown, raw float64 epos, raw int64 ekey
// one atom: its own ext entry at i, then its ghosts (shifts in meshgrid order, zero shift
// skipped) from natoms + ends - nghost (ends: inclusive cumulative sum of nghost); ghosts at
// cap and beyond are not written (the arrays were sized from a guess; the call is redone)
    const long long g = sys * 32;
    const int pmask = (int)geo[g + 21];
    const bool per = pmask != 0;
    eown[i] = i;
    for (int j = 0; j < 3; ++j) epos[3 * i + j] = wrapped[3 * i + j];
    ekey[i] = (long long)geo[g + 31] + (cbin[3 * i] * (long long)geo[g + 29] + cbin[3 * i + 1])
              * (long long)geo[g + 30] + cbin[3 * i + 2];
    if (per && nghost > 0) {
        const double f[3] = {frac[3 * i], frac[3 * i + 1], frac[3 * i + 2]};

#include "nbr_range.cuh"

        long long o = natoms + ends - nghost;
        for (int a = lo[0]; a <= hi[0]; ++a)
        for (int b = lo[1]; b <= hi[1]; ++b)
        for (int c = lo[2]; c <= hi[2]; ++c) {
            if (a == 0 && b == 0 && c == 0) continue;
            double p[3];
            for (int j = 0; j < 3; ++j)
                p[j] = wrapped[3 * i + j] + ((double)a * geo[g + 9 + j] + (double)b * geo[g + 12 + j]
                                             + (double)c * geo[g + 15 + j]);

#include "nbr_bin.cuh"

            if (o < cap) {
                eown[o] = i;
                for (int j = 0; j < 3; ++j) epos[3 * o + j] = p[j];
                ekey[o] = key;
            }
            ++o;
        }
    }


// @kernel nb_sorted
// @in int64 o, raw float64 epos, raw int64 eown, raw int64 atype
// @out raw float64 spos, int64 sown, int64 stype
// ext entries in bin order: position, owner, type (one gather pass)
    for (int j = 0; j < 3; ++j) spos[3 * i + j] = epos[3 * o + j];
    sown = eown[o];
    stype = atype[eown[o]];


// @kernel nb_count
// @in int64 key
// @out raw int64 count
// bin order by counting: atoms per bin (at key + 1, so that the inclusive scan is the edges),
// then each ext entry's place in its bin's range (in any order: atomics), then each bin's range
// sorted by ext index (a thread per bin, a few dozen entries), the order a stable sort gives
atomicAdd((unsigned long long*)&count[key + 1], 1ULL);

// @kernel nb_place
// @in int64 key, raw int64 edges
// @out raw int64 cursor, raw int64 order
    const long long p = edges[key] + (long long)atomicAdd((unsigned long long*)&cursor[key], 1ULL);
    order[p] = i;


// @kernel nb_binsort
// @in int64 lo, int64 hi
// @out raw int64 order
    for (long long a = lo + 1; a < hi; ++a) {
        const long long v = order[a];
        long long b = a;
        while (b > lo && order[b - 1] > v) { order[b] = order[b - 1]; --b; }
        order[b] = v;
    }


// @kernel nb_geometry
// @in raw float64 cells, raw float64 prev, float64 rcut, int64 nimg
// @out raw float64 geo, int64 flag
// one periodic system: its table row from its cell and the bin counts of an earlier table
// (prev), as pack_geometry of _CellGeometry with that grid; flag 0: usable, 1: usable, but the
// cell grew 2% past room for another bin (a new grid on the host next time), 2: not usable (singular
// cell, bins smaller than rcut, or more images than nimg): the call is redone on the host
    double h[9], cof[9], inv[9], m[3];
    for (int j = 0; j < 9; ++j) h[j] = cells[9 * i + j];
    for (int r = 0; r < 3; ++r)
        for (int k = 0; k < 3; ++k) {
            const double* u = h + 3 * ((r + 1) % 3);
            const double* v = h + 3 * ((r + 2) % 3);
            cof[3 * r + k] = u[(k + 1) % 3] * v[(k + 2) % 3] - u[(k + 2) % 3] * v[(k + 1) % 3];
        }
    const double det = h[0] * cof[0] + h[1] * cof[1] + h[2] * cof[2];
    for (int a = 0; a < 3; ++a)
        for (int b = 0; b < 3; ++b) inv[3 * a + b] = cof[3 * b + a] / det;
    for (int k = 0; k < 3; ++k)
        m[k] = rcut * sqrt(inv[k] * inv[k] + inv[3 + k] * inv[3 + k] + inv[6 + k] * inv[6 + k]);
    const long long g = 32 * i;
    long long f = fabs(det) > 1e-8 ? 0 : 2;  // NaN cells too
    for (int j = 0; j < 9; ++j) { geo[g + j] = inv[j]; geo[g + 9 + j] = h[j]; }
    for (int k = 0; k < 3; ++k) {
        double lo = 0.0, hi = 0.0;
        for (int r = 0; r < 3; ++r) {
            const double a = -m[r] * h[3 * r + k], b = (1.0 + m[r]) * h[3 * r + k];
            lo += a < b ? a : b;
            hi += a < b ? b : a;
        }
        const double ext = hi - lo > 0.0 ? hi - lo : 0.0, nb = prev[g + 28 + k];
        const double bs = ext > 0.0 ? ext / nb : 1.0;
        if (!(m[k] <= (double)nimg) || (nb > 1.0 && !(bs >= rcut * (1.0 - 1e-12)))) f = 2;
        else if (f == 0 && floor(ext / (1.02 * rcut)) > nb) f = 1;  // 2% past: a cell that
        // fluctuates about a bin boundary is not regridded (and then found too small) every step
        geo[g + 18 + k] = m[k];
        geo[g + 22 + k] = lo;
        geo[g + 25 + k] = bs;
        geo[g + 28 + k] = nb;
    }
    geo[g + 21] = 7.0;  // every direction periodic
    geo[g + 31] = prev[g + 31];
    flag = f;


// @kernel nb_ranges
// @in int64 cidx, raw int64 cbin, raw int64 system, raw float64 geo, raw int64 edges
// @out int64 start, int64 cnt
// (centre, one of 27 neighbouring bins) -> start and count of its atoms in bin order
    const long long b = i % 27, g = system[cidx] * 32;
    const long long o[3] = {b / 9 - 1, (b / 3) % 3 - 1, b % 3 - 1};
    long long bb[3];
    bool inb = true;
    for (int k = 0; k < 3; ++k) {
        bb[k] = cbin[3 * cidx + k] + o[k];
        inb = inb && bb[k] >= 0 && bb[k] < (long long)geo[g + 28 + k];
    }
    if (inb) {
        const long long id = (long long)geo[g + 31] + (bb[0] * (long long)geo[g + 29] + bb[1])
                             * (long long)geo[g + 30] + bb[2];
        start = edges[id];
        cnt = edges[id + 1] - edges[id];
    } else {
        start = edges[0];
        cnt = 0;
    }
