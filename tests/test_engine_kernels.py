"""The CUDA kernels of the engine, compiled with g++ for the CPU (one thread per block, warp
shuffles of a single lane) and checked against the NumPy array code they replace on GPUs."""

from __future__ import annotations

import ctypes
import shutil

import numpy as np
import pytest
from engine_helpers import build_cpp, check_kernel_selection

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")

STUB = """#include <cmath>
#include <cstring>
#define __global__
#define __restrict__
#define __shared__ static
#define __constant__ static
using std::fabs;
struct D3 { unsigned x, y, z; };
static D3 blockDim, blockIdx, threadIdx;
template <class X> X __shfl_down_sync(unsigned, X, int) { return 0; }  // one lane per warp
template <class X> X atomicAdd(X* a, X v) { X o = *a; *a += v; return o; }
template <class X> X atomicMax(X* a, X v) { X o = *a; if (v > o) *a = v; return o; }
static void __syncthreads() {}
"""


def _build(tmp_path, name, src):
    return build_cpp(tmp_path, name, STUB + src)


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def test_select_kernel_matches_array_code(cuni, tmp_path, monkeypatch):
    from dpsnake.engine.cuda import selection as kernels
    from dpsnake.engine.model import load_model

    m = load_model(cuni["dp"])
    nnei, nt = m.nnei, m.ntypes
    lib = _build(
        tmp_path,
        "select",
        kernels.select_source(nnei, nt)
        + """
extern "C" void run(long long n, double rcut, const double* cpos, const long long* cidx,
    const long long* bs, const long long* bc, const double* ep, const long long* eo,
    const long long* et, const long long* ei, const int* sel, const int* sec, long long* ow,
    double* d, bool* ov, int* stats) {
  blockDim.x = 1; threadIdx.x = 0;
  for (long long i = 0; i < n; ++i) { blockIdx.x = (unsigned)i;
    select_nb(n, rcut, cpos, cidx, bs, bc, ep, eo, et, ei, sel, sec, ow, d, ov, stats, ov, 0); } }
""",
    )

    def emulated(xp, rcut, sel, sec, cpos, cidx, bstart, bcnt, epos, eown, etype, eidx, consts=None):
        n = len(cidx)
        owner = np.full((n, nnei), -1, dtype=np.int64)
        d = np.zeros((n, nnei, 3))
        over = np.zeros(n, dtype=bool)
        stats = np.zeros(len(sel) + 1, dtype=np.int32)
        args = [
            np.ascontiguousarray(a)
            for a in (cpos, cidx, bstart.astype(np.int64), bcnt.astype(np.int64), epos, eown, etype, eidx)
        ]
        sel32, sec32 = np.asarray(sel, np.int32), np.asarray(sec[:-1], np.int32)
        lib.run(
            ctypes.c_longlong(n),
            ctypes.c_double(rcut),
            *[_ptr(a) for a in args],
            _ptr(sel32),
            _ptr(sec32),
            _ptr(owner),
            _ptr(d),
            _ptr(over),
            _ptr(stats),
        )
        return owner, d, over, stats

    monkeypatch.setattr(kernels, "select_neighbors", emulated)
    check_kernel_selection(m)


@pytest.fixture(scope="module")
def cuni(dp_model):
    return dp_model(data="CuNi")
