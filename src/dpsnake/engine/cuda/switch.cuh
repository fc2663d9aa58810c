/* r, q = 1/(r + p), the quintic switch sw(u) of u = (r - rs)/(rc - rs) clamped (envmat.switch) */
    const double r = sqrt(dx * dx + dy * dy + dz * dz);
    const double q = 1.0 / (r + p);
    const double rcl = fmin(fmax(r, rs), rc);
    const double u = (rcl - rs) / (rc - rs);
    const double u2 = u * u;
    const double sw = u2 * u * (-6.0 * u2 + 15.0 * u - 10.0) + 1.0;
