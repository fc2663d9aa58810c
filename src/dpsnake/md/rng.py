"""Counter-based random numbers: one independent stream per walker, computed on the device.

A normal deviate is a pure function of (walker seed, step, stream, counter), so

- a walker sees the same noise whether it runs alone or inside any batch (the counter is the atom's
  index *within its walker*, never its position in the flat array);
- a resumed run needs no generator state in the checkpoint (the step number is enough);
- NumPy and CuPy produce bit-identical numbers (plain uint64 arithmetic, no library generator).

The hash is SplitMix64's finaliser (Steele, Lea, Flood 2014) applied to ``key + golden * counter``;
``key`` mixes the seed, the step and the stream. Uniforms take the top 53 bits; normals use Box-Muller.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB

# streams: which random numbers of one step these are (never reuse a stream for two purposes)
LANGEVIN = 1
BUSSI = 2
BAROSTAT = 3


def _mix(xp, z):
    """SplitMix64 finaliser on a uint64 array (wrap-around multiplication is intended)."""
    z = (z ^ (z >> xp.uint64(30))) * xp.uint64(_M1)
    z = (z ^ (z >> xp.uint64(27))) * xp.uint64(_M2)
    return z ^ (z >> xp.uint64(31))


def walker_keys(xp, seeds, step, stream: int):
    """Per-walker keys (S,) uint64 for one (step, stream); ``seeds`` (S,) uint64.

    ``step``: an int, or a 0-d uint64 array in ``xp`` (the same keys; a CUDA graph replays with
    the step read from device memory instead of a constant baked into the captured kernels).
    """
    with np.errstate(over="ignore"):
        if isinstance(step, (int, np.integer)):
            base = np.uint64((int(step) * 16 + int(stream) + 1) * _GOLDEN % (1 << 64))
        else:  # uint64 arithmetic wraps modulo 2^64, as the line above
            base = (step * xp.uint64(16) + xp.uint64(int(stream) + 1)) * xp.uint64(_GOLDEN)
        return _mix(xp, _mix(xp, seeds ^ xp.uint64(0x5DEECE66D)) + base)


def _uniform(xp, key, counter):
    """Uniform deviates in (0, 1) from key and counter (same shapes, uint64)."""
    h = _mix(xp, key + counter * xp.uint64(_GOLDEN))
    return ((h >> xp.uint64(11)).astype(xp.float64) + 0.5) * (2.0**-53)


_NORMALS_SRC = """
    unsigned long long h[2];
    for (int q = 0; q < 2; ++q) {
        unsigned long long y = key + (2ull * counter + q) * 0x9E3779B97F4A7C15ull;
        y = (y ^ (y >> 30)) * 0xBF58476D1CE4E5B9ull;
        y = (y ^ (y >> 27)) * 0x94D049BB133111EBull;
        h[q] = y ^ (y >> 31);
    }
    const double u1 = ((double)(h[0] >> 11) + 0.5) * 1.1102230246251565e-16;
    const double u2 = ((double)(h[1] >> 11) + 0.5) * 1.1102230246251565e-16;
    out = sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
"""
_kernel = None


def normals(xp, key, counter):
    """Standard normal deviates, one per (key, counter) element (uint64 arrays of one shape)."""
    if xp.__name__ == "cupy":  # one kernel instead of ~30 (the same operations, the same numbers)
        global _kernel
        if _kernel is None:
            _kernel = xp.ElementwiseKernel(
                "uint64 key, uint64 counter", "float64 out", _NORMALS_SRC, "dps_normals", options=("--fmad=false",)
            )
        return _kernel(key, counter)
    c2 = counter * xp.uint64(2)
    u1 = _uniform(xp, key, c2)
    u2 = _uniform(xp, key, c2 + xp.uint64(1))
    return xp.sqrt(-2.0 * xp.log(u1)) * xp.cos(2.0 * np.pi * u2)


def atom_normals(xp, seeds, system, local, step, stream: int):
    """(N, 3) normals for the flat atoms: ``seeds`` (S,) uint64, ``system`` (N,), ``local`` (N,) index in walker.

    Element (i, c) uses counter ``3 * local[i] + c`` of its walker's stream.
    """
    key = walker_keys(xp, seeds, step, stream)[system][:, None]
    counter = local.astype(xp.uint64)[:, None] * xp.uint64(3) + xp.arange(3, dtype=xp.uint64)[None, :]
    return normals(xp, xp.broadcast_to(key, counter.shape), counter)


def system_normals(xp, seeds, step, stream: int, k: int):
    """(S, k) normals, one row per walker (counters 0..k-1 of the walker's stream)."""
    key = walker_keys(xp, seeds, step, stream)[:, None]
    counter = xp.broadcast_to(xp.arange(k, dtype=xp.uint64)[None, :], (seeds.shape[0], k))
    return normals(xp, xp.broadcast_to(key, counter.shape), counter)
