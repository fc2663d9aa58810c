"""The warp-per-centre neighbour-selection kernel (cuda/select_nb_warp.cu, the default), compiled
with g++ for the CPU with real concurrency: each 32-thread block runs as 32 OS
threads with a barrier for __syncthreads and real atomics, so the lanes race for shared-memory slots
as on a GPU. Checked against the array code, including the spill path (CAP exceeded)."""

from __future__ import annotations

import ctypes
import shutil

import numpy as np
import pytest
from engine_helpers import THREADED_CUDA_STUB, build_cpp, check_kernel_selection, fcc, frame

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")

SERIAL_STUB = """#include <cmath>
#define __global__
#define __restrict__
struct D3 { unsigned x, y, z; };
static D3 blockDim, blockIdx, threadIdx;
template <class X> X atomicAdd(X* a, X v) { X o = *a; *a += v; return o; }
template <class X> X atomicMax(X* a, X v) { X o = *a; if (v > o) *a = v; return o; }
"""

ARGS = (
    "long long n, double rcut, const double* cpos, const long long* cidx, const long long* bs, "
    "const long long* bc, const double* ep, const long long* eo, const long long* et, "
    "const long long* ei, const int* sel, const int* sec, long long* ow, double* d, bool* ov, int* stats"
)
CALL = "n, rcut, cpos, cidx, bs, bc, ep, eo, et, ei, sel, sec, ow, d, ov, stats"


class _Launch:
    """Stands in for a cupy.RawKernel: k(grid, block, args) on NumPy arrays."""

    def __init__(self, lib):
        self.lib = lib

    def __call__(self, grid, block, args):
        conv = []
        for a in args:
            if isinstance(a, np.ndarray) and a.ndim > 0:
                assert a.flags.c_contiguous
                conv.append(a.ctypes.data_as(ctypes.c_void_p))
            elif np.asarray(a).dtype.kind == "f":
                conv.append(ctypes.c_double(float(a)))
            else:
                conv.append(ctypes.c_longlong(int(a)))
        self.lib.run(*conv)


@pytest.fixture(scope="module")
def cuni(dp_model):
    return dp_model(data="CuNi")


@pytest.mark.parametrize("cap", [256, 12])
def test_warp_select_kernel_matches_array_code(cuni, tmp_path, monkeypatch, cap):
    from dpsnake.engine.cuda import selection as kernels
    from dpsnake.engine.model import load_model
    from dpsnake.engine.neighbor import NeighborBuilder
    from dpsnake.engine.settings import EngineContext, EngineSettings

    m = load_model(cuni["dp"])
    nnei, nt = m.nnei, m.ntypes
    lanes = kernels.WARP_LANES
    warp = build_cpp(
        tmp_path,
        f"warp{cap}",
        THREADED_CUDA_STUB
        + kernels.warp_source(nnei, nt, cap, lanes)
        + f"""
extern "C" void run({ARGS}, bool* spill) {{
  launch((unsigned)n, {lanes}, [=] {{ select_nb_warp({CALL}, spill); }}); }}
""",
    )
    serial = build_cpp(
        tmp_path,
        "serial",
        SERIAL_STUB
        + kernels.select_source(nnei, nt)
        + f"""
extern "C" void run({ARGS}, const bool* only, long long use_only) {{
  blockDim.x = 1; threadIdx.x = 0;
  for (long long i = 0; i < n; ++i) {{ blockIdx.x = (unsigned)i; select_nb({CALL}, only, use_only); }} }}
""",
    )
    monkeypatch.setattr(kernels, "_select_warp_kernel", lambda *a: _Launch(warp))
    monkeypatch.setattr(kernels, "_select_kernel", lambda *a: _Launch(serial))
    ctx = EngineContext(EngineSettings(select="warp"))  # its broken set: a failure must not hide
    spilled = []
    real = kernels.select_neighbors

    def counting(xp, *args, only=None, out=None, consts=None):  # how many centres the mask selects
        spilled.append(len(args[4]) if only is None else int(only.sum()))
        return real(xp, *args, only=only, out=out, consts=consts)

    monkeypatch.setattr(kernels, "select_neighbors", counting)
    ncent = check_kernel_selection(m, ctx)
    # the serial kernel runs once, masked to the centres that spilled: most with cap 12, none at 256
    assert len(spilled) == 1
    assert 0 < spilled[0] < ncent if cap < 20 else spilled[0] == 0
    assert not ctx.broken
    # exact distance ties (a perfect lattice, over-full lists): the array code may break them either
    # way, the serial kernel keeps enumeration order; the warp kernel must do exactly the same
    at = fcc(a=3.0, rep=(2, 2, 2), rattle=0.0, ni_frac=0.5, seed=43)
    nb = NeighborBuilder(
        np,
        at.positions,
        frame(at, ["Cu", "Ni"])[2],
        np.zeros(len(at), dtype=int),
        at.cell.array[None],
        np.array([True]),
        m.rcut,
        m.sel,
        ctx=ctx,
    )
    nb.use_kernel = True
    centers = np.arange(len(at))
    got = nb.chunk(centers)
    nb.ctx = EngineContext(EngineSettings(select="thread"))
    ser = nb.chunk(centers)
    assert ser.overflow.all()
    np.testing.assert_array_equal(got.owner, ser.owner)
    np.testing.assert_array_equal(got.d, ser.d)
    np.testing.assert_array_equal(got.overflow, ser.overflow)
