"""Block-per-centre descriptor kernels (engine/cuda/desc.py) against the array code:
compiled with g++ for the CPU (each block's threads as OS threads with a real barrier for
__syncthreads, shared arrays shared by them), with NVRTC for sm_90, and on a GPU when there is one."""

from __future__ import annotations

import ctypes
import shutil

import numpy as np
import pytest
from engine_helpers import THREADED_CUDA_STUB, build_cpp, cupy_or_skip

LAUNCH = r"""
extern "C" void fwd(unsigned grid, unsigned block, const T* gr, long long n, T* D) {
  launch(grid, block, [=] { desc_fwd(gr, n, D); });
}
extern "C" void bwd(unsigned grid, unsigned block, const T* gr, const T* gD, long long n, T scale, T* ggr) {
  launch(grid, block, [=] { desc_bwd(gr, gD, n, scale, ggr); });
}
"""


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def _reference(gr, gD, A, scale):
    """The array code of descriptor.py: D = gr^T gr[:, :, :A]; ggr = (gr1 gD^T + [p < A] gr gD) scale."""
    D = np.matmul(gr.transpose(0, 2, 1), gr[:, :, :A])
    ggr = np.matmul(gr[:, :, :A], gD.transpose(0, 2, 1))
    ggr[:, :, :A] += np.matmul(gr, gD)
    return D.reshape(len(gr), -1), ggr * scale


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_kernels_match_array_code(tmp_path, dtype):
    from dpsnake.engine.cuda.desc import source

    npdt = np.float32 if dtype == "float32" else np.float64
    ct = ctypes.c_float if dtype == "float32" else ctypes.c_double
    tol = 2e-6 if dtype == "float32" else 1e-14
    M1, A, n = 50, 12, 5  # M1 not a multiple of a warp, A not a power of two
    lib = build_cpp(tmp_path, f"desc_{dtype}", THREADED_CUDA_STUB + source(dtype, M1, A) + LAUNCH)
    rng = np.random.default_rng(3)
    gr = rng.normal(size=(n, 4, M1)).astype(npdt)
    gD = rng.normal(size=(n, M1, A)).astype(npdt)
    scale = 1.0 / 46
    D_ref, ggr_ref = _reference(gr.astype(np.float64), gD.astype(np.float64), A, scale)
    for grid, block in ((2, 64), (5, 128), (3, 32)):  # grid-stride over centres, fewer threads than values
        D = np.full((n, M1 * A), np.nan, npdt)
        lib.fwd(grid, block, _ptr(gr), ctypes.c_longlong(n), _ptr(D))
        assert np.abs(D - D_ref).max() <= tol * np.abs(D_ref).max()
        ggr = np.full((n, 4, M1), np.nan, npdt)
        lib.bwd(grid, block, _ptr(gr), _ptr(gD), ctypes.c_longlong(n), ct(scale), _ptr(ggr))
        assert np.abs(ggr - ggr_ref).max() <= tol * np.abs(ggr_ref).max()


def test_shared_memory_limit_falls_back():
    from dpsnake.engine.cuda.desc import shared_bytes, supported

    assert supported("float64", 100, 16) and shared_bytes("float64", 100, 16) == (400 + 1700) * 8
    assert supported("float32", 240, 16)
    assert not supported("float64", 256, 32)  # 75 KiB: the elementwise kernels run instead
    assert not supported("float32", 8, 16)  # axis > M1 is not a descriptor


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_kernels_compile_for_h100(dtype):
    pytest.importorskip("nvidia.cuda_nvrtc")
    from test_engine_cuda_compile import compile_cuda

    from dpsnake.engine.cuda.desc import source

    ptx = compile_cuda(source(dtype, 100, 16))
    assert ".entry desc_fwd" in ptx and ".entry desc_bwd" in ptx


def test_on_gpu_block_equals_elementwise(monkeypatch):
    cp = cupy_or_skip()
    from dpsnake.engine.cuda import elementwise as ew

    rng = np.random.default_rng(4)
    for dt, tol in ((np.float64, 1e-13), (np.float32, 2e-6)):
        gr = cp.asarray(rng.normal(size=(3000, 4, 100)).astype(dt))
        gD = cp.asarray(rng.normal(size=(3000, 100, 16)).astype(dt))
        out = {}
        for mode in ("block", "elementwise"):
            block = mode == "block"
            out[mode] = (
                cp.asnumpy(ew.descriptor(cp, gr, 16, block)),
                cp.asnumpy(ew.descriptor_grad(cp, gr, gD, 0.02, block)),
            )
        D_ref, ggr_ref = _reference(cp.asnumpy(gr).astype(np.float64), cp.asnumpy(gD).astype(np.float64), 16, 0.02)
        for D, ggr in out.values():
            assert np.abs(D - D_ref).max() <= tol * np.abs(D_ref).max()
            assert np.abs(ggr - ggr_ref).max() <= tol * np.abs(ggr_ref).max()
