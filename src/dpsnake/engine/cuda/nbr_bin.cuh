/* bin bb[3] of position p[3] in system row g of the geometry table, and its flat bin key */
    long long bb[3];
    for (int k = 0; k < 3; ++k) {
        long long v = (long long)floor((p[k] - geo[g + 22 + k]) / geo[g + 25 + k]);
        const long long hi = (long long)geo[g + 28 + k] - 1;
        bb[k] = v < 0 ? 0 : (v > hi ? hi : v);
    }
    const long long key = (long long)geo[g + 31] + (bb[0] * (long long)geo[g + 29] + bb[1])
                          * (long long)geo[g + 30] + bb[2];
