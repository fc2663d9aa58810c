/* per direction k, the range lo[k]..hi[k] of cell shifts s whose image f[k] + s lies within the margin
   (periodic directions, bit k of pmask; the others: the zero shift only) */
        int lo[3], hi[3];
        for (int k = 0; k < 3; ++k) {
            lo[k] = 1; hi[k] = 0;
            if ((pmask >> k) & 1) {
                for (int s = -(int)nimg; s <= (int)nimg; ++s) {
                    const double v = f[k] + (double)s;
                    if (v >= -geo[g + 18 + k] && v < 1.0 + geo[g + 18 + k]) {
                        if (lo[k] > hi[k]) lo[k] = s;
                        hi[k] = s;
                    }
                }
            } else { lo[k] = 0; hi[k] = 0; }
        }
