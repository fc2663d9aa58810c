"""Array-namespace helpers so one code path serves NumPy and CuPy.

Only what the array API lacks lives here: scatter-add (segment sums), segment min/max, device moves;
and what the NumPy path runs fastest with: :func:`keep_freed_memory` (the CPU allocator), :func:`dot3`
and :func:`take_rows` (small NumPy operations that are slow in their general form).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

import numpy as np

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 << 20  # glibc's largest documented value on 64-bit systems (its dynamic maximum)
_TRIM_THRESHOLD = 1 << 30


@functools.cache  # process-wide: once is enough
def keep_freed_memory() -> bool:
    """Let glibc keep freed work memory in the process (once per process; True if set).

    The NumPy path allocates and frees temporaries of a few MB per chunk. glibc serves those with
    mmap and returns them on free, so each new one is zero-filled page by page by the kernel: on
    the 2-core development machine half the time of a se_atten_v2 force call went to that (sys time
    4.9 of 19.6 s; docs/benchmarks.md "The engine on CPUs"). With mmap only above 32 MiB and the
    heap trimmed only above 1 GiB free, freed blocks are reused: 2x per call. Process-wide, so the
    engine sets it only for NumPy work (EngineSettings ``keep_heap``); a no-op off glibc.
    """
    ok = False
    if platform.libc_ver()[0] == "glibc":
        try:
            mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
            ok = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
        except (OSError, AttributeError):  # the C library cannot be loaded: leave the allocator as it is
            ok = False
    return ok


def dot3(a, b):
    """(..., 3) . (..., 3) -> (...): ``(a * b).sum(axis=-1)``. On NumPy the three products summed in
    the same order (the same bits): a reduction over a length-3 axis costs ~4x that there (the
    neighbour search of a 256-atom batch: 1.6 of 17 ms per force call). CuPy keeps one reduction
    (one kernel launch rather than five)."""
    if isinstance(a, np.ndarray):
        out = a[..., 0] * b[..., 0]
        out += a[..., 1] * b[..., 1]
        out += a[..., 2] * b[..., 2]
        return out
    return (a * b).sum(axis=-1)


def take_rows(xp, a, index):
    """``a[index]`` for an integer array ``index`` of any shape: rows of ``a`` (..., k). NumPy's
    ``take`` along axis 0 gives the same array ~7x faster than fancy indexing with a 2-D index."""
    return xp.take(a, index, axis=0)


def is_cupy(x) -> bool:
    """True if ``x`` is a CuPy array (checked by module name, so CuPy need not be installed)."""
    return type(x).__module__.startswith("cupy")


def array_namespace(*arrays):
    """The module (``numpy`` or ``cupy``) that owns the arrays; NumPy for Python scalars/lists."""
    for a in arrays:
        if a is not None and is_cupy(a):
            import cupy

            return cupy
    return np


def device_key(xp) -> tuple:
    """(namespace, device id) for caches of arrays kept on a device (-1 for NumPy)."""
    return (xp.__name__, xp.cuda.Device().id if xp.__name__ == "cupy" else -1)


def to_numpy(x) -> np.ndarray:
    """Host copy of an array of either namespace."""
    if is_cupy(x):
        return x.get()
    return np.asarray(x)


class HostCopy:
    """A copy of a small device array to the host that does not wait for the device now.

    On CuPy the copy goes into pinned memory, queued on the current stream, and an event marks
    its end; :meth:`result` waits for that event only (the device may still be running later
    work). On NumPy it is the array itself.
    """

    def __init__(self, x):
        self._event = None
        if not is_cupy(x):
            self._buf = np.asarray(x)
            return
        import cupy
        import cupyx

        self._buf = cupyx.empty_pinned(x.shape, dtype=x.dtype)
        # (ascontiguousarray makes 0-d arrays 1-d: shaped back for the copy into the 0-d buffer)
        cupy.asnumpy(cupy.ascontiguousarray(x).reshape(x.shape), out=self._buf, blocking=False)
        self._event = cupy.cuda.Event(disable_timing=True)
        self._event.record()

    def result(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._buf


def asarray(xp, x, dtype=None):
    """``x`` as an array of namespace ``xp`` (copies host -> device when needed)."""
    if xp is np:
        return np.asarray(to_numpy(x), dtype=dtype)
    return xp.asarray(x, dtype=dtype)


def segment_sum(xp, index, values, nseg: int):
    """Sum ``values`` (n, ...) into ``nseg`` rows by ``index`` (n,) ints; returns (nseg, ...) float64.

    One sum over (segment, component) bins: on CuPy one atomic scatter-add (cupy.bincount would read
    max(index) back to the host, a sync; this one is also capturable in a CUDA graph); on NumPy
    bincount (np.add.at is slow), each bin adding its elements in order.
    """
    index = xp.asarray(index).reshape(-1)
    tail = values.shape[1:]
    k = 1
    for d in tail:
        k *= d
    idx = index if k == 1 else (index[:, None] * k + xp.arange(k)[None, :]).reshape(-1)
    w = values.reshape(-1).astype(xp.float64)
    if xp.__name__ == "cupy":
        import cupyx

        out = xp.zeros(nseg * k)
        cupyx.scatter_add(out, idx, w)
    else:
        out = xp.bincount(idx, weights=w, minlength=nseg * k)
    return out.reshape((nseg, *tail))


def segment_minmax(xp, index, values, nseg: int):
    """Per-segment min and max of ``values`` (n, k) by ``index`` (n,); empty segments give +inf/-inf."""
    k = values.shape[1]
    lo = xp.full((nseg, k), xp.inf, dtype=values.dtype)
    hi = xp.full((nseg, k), -xp.inf, dtype=values.dtype)
    if xp is np:
        np.minimum.at(lo, index, values)
        np.maximum.at(hi, index, values)
    else:
        import cupyx

        cupyx.scatter_min(lo, index, values)
        cupyx.scatter_max(hi, index, values)
    return lo, hi
