"""The CUDA row kernels of DPA-1's attention (cuda/attn_rows.cu) = attention.py's array code, no GPU needed:
the source compiled with g++ and run with threaded 32-lane warps, and compiled for sm_90 with NVRTC.
(On a GPU: tests/test_engine_attn_gpu.py runs the whole se_atten engine with these kernels on.)"""

from __future__ import annotations

import ctypes
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from engine_helpers import THREADED_CUDA_STUB, build_cpp

from dpsnake.engine.attn.attention import _pair_terms, _rows_backward, _rows_forward

LAUNCH = r"""
extern "C" void fwd(unsigned grid, unsigned block, const REAL* L, const REAL* sw, const REAL* r,
                    const unsigned char* mask, long long rows, REAL* T, REAL* A) {
  launch(grid, block, [=] { attn_fwd(L, sw, r, mask, rows, T, A); });
}
extern "C" void bwd(unsigned grid, unsigned block, REAL* dA, const REAL* T, const REAL* Lq, const REAL* sw,
                    const REAL* r, long long rows, REAL* dS, REAL* dR) {
  launch(grid, block, [=] { attn_bwd(dA, T, Lq, sw, r, rows, dS, dR); });
}
"""


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def _inputs(B, n, dtype, seed=0):
    """Logits, switch, unit vectors and a mask with empty slots, a centre without neighbours (batch 1)
    and one with every slot filled (batch 2)."""
    rng = np.random.default_rng(seed)
    mask = rng.uniform(size=(B, n)) < 0.7
    mask[1] = False
    mask[2] = True
    sw = np.where(mask, rng.uniform(0.0, 1.0, size=(B, n)), 0.0)
    r = rng.normal(size=(B, n, 3))
    r /= np.linalg.norm(r, axis=2, keepdims=True)
    r[~mask] = 0.0
    L = rng.normal(scale=3.0, size=(B, n, n))
    return [np.ascontiguousarray(a.astype(dtype)) for a in (L, sw, r)] + [mask]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("smooth,dotr", [(1, 1), (1, 0), (0, 1), (0, 0)])
def test_row_kernels_match_array_code(tmp_path, dtype, smooth, dotr):
    from dpsnake.engine.cuda.attn_rows import WPB, source

    B, n = 3, 45  # two values per lane, the second column block partly padding
    tol = 3e-6 if dtype == "float32" else 1e-13
    lib = build_cpp(
        tmp_path, f"rows_{dtype}_{smooth}{dotr}", THREADED_CUDA_STUB + source(dtype, n, smooth, dotr) + LAUNCH
    )
    p = SimpleNamespace(smooth=bool(smooth), dotr=bool(dotr))
    L, sw, r, mask = _inputs(B, n, dtype)
    S, R, F, row_m, key_m = _pair_terms(np, p, mask, r, sw[..., None], np.dtype(dtype))
    T_ref, A_ref = _rows_forward(np, p, L.copy(), S, F, row_m, key_m)
    assert np.isfinite(T_ref).all() and not T_ref[1].any()  # no NaN from the centre without neighbours
    rows = B * n
    mask_u8 = mask.astype(np.uint8)
    for grid in (2, 7):  # grid-stride: fewer warps than rows, and more
        T = L.copy()  # in place, as attn_rows.forward runs it
        A = np.full_like(L, np.nan)
        lib.fwd(grid, 32 * WPB, _ptr(T), _ptr(sw), _ptr(r), _ptr(mask_u8), ctypes.c_longlong(rows), _ptr(T), _ptr(A))
        np.testing.assert_allclose(T, T_ref, rtol=0, atol=tol)
        if smooth or dotr:
            np.testing.assert_allclose(A, A_ref, rtol=0, atol=tol)
    rng = np.random.default_rng(1)
    dA = rng.normal(size=L.shape).astype(dtype)
    Lq = rng.normal(scale=3.0, size=L.shape).astype(dtype)
    dS0 = rng.normal(size=L.shape).astype(dtype)
    dR0 = rng.normal(size=L.shape).astype(dtype)
    dS_ref, dR_ref = (dS0.copy() if smooth else None), (dR0.copy() if dotr else None)
    dL_ref = _rows_backward(np, p, dA.copy(), T_ref, lambda: Lq.copy(), S, R, F, dS_ref, dR_ref)
    scale = np.abs(dL_ref).max()
    for grid in (2, 7):
        dL, dS, dR = dA.copy(), dS0.copy(), dR0.copy()
        lib.bwd(
            grid,
            32 * WPB,
            _ptr(dL),
            _ptr(T_ref),
            _ptr(Lq),
            _ptr(sw),
            _ptr(r),
            ctypes.c_longlong(rows),
            _ptr(dS),
            _ptr(dR),
        )
        np.testing.assert_allclose(dL, dL_ref, rtol=0, atol=tol * max(scale, 1.0))
        np.testing.assert_allclose(dS, dS_ref if smooth else dS0, rtol=0, atol=tol * max(np.abs(dS0).max(), 1.0) * 4)
        np.testing.assert_allclose(dR, dR_ref if dotr else dR0, rtol=0, atol=tol * max(np.abs(dR0).max(), 1.0) * 4)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n", [120, 32, 200])
def test_row_kernels_compile_for_sm90(dtype, n):
    pytest.importorskip("nvidia.cuda_nvrtc")
    from test_engine_cuda_compile import compile_cuda

    from dpsnake.engine.cuda.attn_rows import source

    for smooth, dotr in ((1, 1), (0, 0)):
        ptx = compile_cuda(source(dtype, n, smooth, dotr))
        assert ".entry attn_fwd" in ptx and ".entry attn_bwd" in ptx
