"""The smooth switch of DeePMD-kit's environment matrix (shared by descriptor.py and tabulate.py)."""

from __future__ import annotations


def switch(xp, r, rs, rc):
    """Quintic switch sw(r) and dsw/dr (DeePMD-kit's compute_smooth_weight): 1 below rs, 0 above rc."""
    rcl = xp.clip(r, rs, rc)
    u = (rcl - rs) / (rc - rs)
    u2 = u * u
    sw = u2 * u * (-6.0 * u2 + 15.0 * u - 10.0) + 1.0
    dsw = -30.0 * u2 * (u - 1.0) ** 2 / (rc - rs)
    dsw = xp.where((r > rs) & (r < rc), dsw, 0.0)
    return sw, dsw
