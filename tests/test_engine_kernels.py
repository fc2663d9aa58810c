"""The CUDA kernels of the engine, compiled with g++ for the CPU (one thread per block, warp
shuffles of a single lane) and checked against the NumPy array code they replace on GPUs."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest

from test_engine_helpers import overfull_cuni_batch

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
static void __syncthreads() {}
"""


def _build(tmp_path, name, src):
    cpp = tmp_path / f"{name}.cpp"
    cpp.write_text(STUB + src)
    so = tmp_path / f"{name}.so"
    subprocess.run(["g++", "-O1", "-shared", "-fPIC", "-o", str(so), str(cpp)], check=True)
    return ctypes.CDLL(str(so))


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def test_select_kernel_matches_array_code(cuni, tmp_path, monkeypatch):
    from dpsnake.engine import kernels
    from dpsnake.engine.model import load_model

    m = load_model(cuni["dp"])
    nnei, nt = m.nnei, m.ntypes
    lib = _build(tmp_path, "select", kernels._SELECT_SRC % {"nnei": nnei, "ntypes": nt} + """
extern "C" void run(long long n, double rcut, const double* cpos, const long long* cidx,
    const long long* bs, const long long* bc, const double* ep, const long long* eo,
    const long long* et, const long long* ei, const int* sel, const int* sec, long long* ow,
    double* d, bool* ov) {
  blockDim.x = 1; threadIdx.x = 0;
  for (long long i = 0; i < n; ++i) { blockIdx.x = (unsigned)i;
    select_nb(n, rcut, cpos, cidx, bs, bc, ep, eo, et, ei, sel, sec, ow, d, ov); } }
""")

    def emulated(xp, rcut, sel, sec, cpos, cidx, bstart, bcnt, epos, eown, etype, eidx):
        n = len(cidx)
        owner = np.full((n, nnei), -1, dtype=np.int64)
        d = np.zeros((n, nnei, 3))
        over = np.zeros(n, dtype=bool)
        args = [np.ascontiguousarray(a) for a in (cpos, cidx, bstart.astype(np.int64), bcnt.astype(np.int64),
                                                  epos, eown, etype, eidx)]
        sel32, sec32 = np.asarray(sel, np.int32), np.asarray(sec[:-1], np.int32)
        lib.run(ctypes.c_longlong(n), ctypes.c_double(rcut), *[_ptr(a) for a in args], _ptr(sel32),
                _ptr(sec32), _ptr(owner), _ptr(d), _ptr(over))
        return owner, d, over

    monkeypatch.setattr(kernels, "select_neighbors", emulated)
    nb, centers = overfull_cuni_batch(m)
    ref = nb.chunk(centers)
    nb.use_kernel = True
    got = nb.chunk(centers)
    assert ref.overflow.any() and ref.valid.sum() > 10 * len(centers)
    np.testing.assert_array_equal(got.owner, ref.owner)
    np.testing.assert_array_equal(got.overflow, ref.overflow)
    np.testing.assert_allclose(got.d, ref.d, rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fused_embedding_kernel_matches_nets(cu_model, tmp_path, dtype):
    from dpsnake.engine.fused import _source, _Spec
    from dpsnake.engine.model import load_model
    from dpsnake.engine.nets import Layer, Net

    rng = np.random.default_rng(3)

    def lay(i, o, act, idt=True):
        return Layer(rng.normal(size=(i, o)) * 0.5, rng.normal(size=o) * 0.1,
                     rng.normal(size=o) if idt else None, act, True)

    nets = [load_model(cu_model["dp"]).embeddings[0]]
    nets += [Net([lay(1, 6, a), lay(6, 6, a), lay(6, 12, a, False)])
             for a in ("relu6", "softplus", "sigmoid", "gelu", "silu", "silut:1.5")]
    npdt = np.float32 if dtype == "float32" else np.float64
    tol = 1e-5 if dtype == "float32" else 1e-13
    for k, net in enumerate(nets):
        spec = _Spec(net)
        lib = _build(tmp_path, f"fused{k}", _source(spec, dtype) + """
extern "C" void set_cw(const T* w) { memcpy(CW, w, sizeof(CW)); }
extern "C" void fwd(const T* Rn, int n, int nnei, int a, int b, T* gr) {
  blockDim.x = 1; threadIdx.x = 0; for (int i = 0; i < n; ++i) { blockIdx.x = i; emb_fwd(Rn, nnei, a, b, gr); } }
extern "C" void bwd(const T* Rn, const T* dgr, int n, int nnei, int a, int b, T* g) {
  blockDim.x = 1; threadIdx.x = 0; for (int i = 0; i < n; ++i) { blockIdx.x = i; emb_bwd(Rn, dgr, nnei, a, b, g); } }
""")
        lib.set_cw(_ptr(spec.pack(net).astype(npdt)))
        n, nnei, a, b = 3, 11, 2, 9
        Rn = rng.normal(size=(n, nnei, 4)).astype(npdt)
        M = spec.sizes[-1]
        gr = np.zeros((n, 4, M), npdt)
        lib.fwd(_ptr(Rn), n, nnei, a, b, _ptr(gr))
        netc = net.to(np, npdt)
        G, cache = netc.forward(np, Rn[:, a:b, 0:1])
        ref = np.matmul(Rn[:, a:b, :].transpose(0, 2, 1), G)
        assert np.abs(gr - ref).max() <= tol * np.abs(ref).max()
        dgr = rng.normal(size=(n, 4, M)).astype(npdt)
        g = np.zeros((n, nnei, 4), npdt)
        lib.bwd(_ptr(Rn), _ptr(dgr), n, nnei, a, b, _ptr(g))
        gref = np.matmul(G, dgr.transpose(0, 2, 1))
        gref[:, :, 0:1] += netc.backward(np, np.matmul(Rn[:, a:b, :], dgr), cache)
        assert np.abs(g[:, a:b] - gref).max() <= tol * np.abs(gref).max()
        assert not g[:, :a].any() and not g[:, b:].any()


@pytest.fixture(scope="module")
def cuni(dp_model):
    return dp_model(data="CuNi")
