"""The CUDA row kernels of DPA-1's attention (cuda/attn_rows.cu) = attention.py's array code, no GPU needed:
the source compiled with g++ and run with threaded 32-lane warps, and compiled for sm_90 with NVRTC.
(On a GPU: tests/test_engine_attn_gpu.py runs the whole se_atten engine with these kernels on.)"""

from __future__ import annotations

import ctypes
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from engine_helpers import THREADED_CUDA_STUB, build_cpp, rel_err

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
@pytest.mark.parametrize("smooth,dotr,npad", [(1, 1, 0), (1, 0, 0), (0, 1, 0), (0, 0, 0), (1, 1, 6), (1, 0, 75)])
def test_row_kernels_match_array_code(tmp_path, dtype, smooth, dotr, npad):
    """npad: empty keys left out of the n slots (the smooth softmax counts them: NPAD)."""
    from dpsnake.engine.cuda.attn_rows import WPB, source

    B, n = 3, 45  # two values per lane, the second column block partly padding
    tol = 3e-6 if dtype == "float32" else 1e-13
    lib = build_cpp(
        tmp_path,
        f"rows_{dtype}_{smooth}{dotr}_{npad}",
        THREADED_CUDA_STUB + source(dtype, n, smooth, dotr, npad) + LAUNCH,
    )
    p = SimpleNamespace(smooth=bool(smooth), dotr=bool(dotr))
    L, sw, r, mask = _inputs(B, n, dtype)
    S, R, F, row_m, key_m = _pair_terms(np, p, mask, r, sw[..., None], np.dtype(dtype))
    T_ref, A_ref = _rows_forward(np, p, L.copy(), S, F, row_m, key_m, npad)
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


NORM_LAUNCH = r"""
extern "C" void qf(unsigned g, unsigned b, REAL* z, const REAL* bias, int hb, long long rows, long long pr, REAL* inv) {
  launch(g, b, [=] { qkv_fwd(z, bias, hb, rows, pr, inv); });
}
extern "C" void qb(unsigned g, unsigned b, REAL* dz, const REAL* z, const REAL* inv, long long rows, long long pr, REAL sc) {
  launch(g, b, [=] { qkv_bwd(dz, z, inv, rows, pr, sc); });
}
extern "C" void lf(unsigned g, unsigned b, REAL* h, const REAL* bo, int hb, const REAL* x, const REAL* gm, const REAL* bt,
                   REAL eps, long long rows, REAL* rstd, REAL* out) {
  launch(g, b, [=] { ln_fwd(h, bo, hb, x, gm, bt, eps, rows, rstd, out); });
}
extern "C" void lb(unsigned g, unsigned b, const REAL* d, const REAL* xh, const REAL* rs, const REAL* gm, long long rows, REAL* dh) {
  launch(g, b, [=] { ln_bwd(d, xh, rs, gm, rows, dh); });
}
"""


class _EmuRows:
    """attention.py's ``_Rows`` with the CUDA sources run by g++ with threaded warps (same interface),
    so attention_forward / attention_backward take the kernels' path on NumPy arrays."""

    def __init__(self, tmp_path, p, mask, r, sw, dtype):
        from dpsnake.engine.cuda import attn_norm, attn_rows

        n, dt = mask.shape[1], np.dtype(dtype).name
        self.npad = (p.nnei - n) if p.smooth else 0  # slots left out (attention.py's _Rows.make)
        self.ct = ctypes.c_float if dt == "float32" else ctypes.c_double
        tag = f"{dt}_{n}_{int(p.smooth)}{int(p.dotr)}_{self.npad}"
        src = attn_rows.source(dt, n, p.smooth, p.dotr, self.npad)
        self.rows_lib = build_cpp(tmp_path, f"r_{tag}", THREADED_CUDA_STUB + src + LAUNCH)
        self.norm_libs = {
            D: build_cpp(tmp_path, f"n_{dt}_{D}", THREADED_CUDA_STUB + attn_norm.source(dt, D) + NORM_LAUNCH)
            for D in {p.hidden_dim, p.embed_dim}
        }
        self.sw = np.ascontiguousarray(sw.reshape(mask.shape).astype(dtype))
        self.r = np.ascontiguousarray(r.astype(dtype))
        self.mask = np.ascontiguousarray(mask)
        self.norm = self
        self.core = None  # the fused FP64 core: tests/test_engine_attn_core.py sets one
        self.layer = None  # the whole-layer TF32 kernels: tests/test_engine_attn_layer.py
        self.calls = 0

    def or_any(self, a):
        return self.sw if a is None else a

    @staticmethod
    def bmm(a, b, ta=False, tb=False, alpha=1.0, out=None, beta=0.0):  # cuda/bmm.py's contract (GPU tests)
        r = alpha * np.matmul(a.swapaxes(1, 2) if ta else a, b.swapaxes(1, 2) if tb else b)
        if out is None:
            assert beta == 0
            return r
        out[...] = r + beta * out if beta else r
        return out

    def _go(self, lib, name, *args):
        self.calls += 1
        getattr(lib, name)(5, 128, *[_ptr(a) if isinstance(a, np.ndarray) else a for a in args])

    def forward(self, L, sw, r, mask, smooth, dotr, npad=0):
        assert npad == self.npad
        A = np.empty_like(L) if (smooth or dotr) else L
        rows = L.shape[0] * L.shape[1]
        self._go(self.rows_lib, "fwd", L, sw, r, mask.astype(np.uint8), ctypes.c_longlong(rows), L, A)
        return L, A

    def backward(self, dA, T, Lq, sw, r, dS, dR, smooth, dotr, npad=0):
        rows = dA.shape[0] * dA.shape[1]
        self._go(self.rows_lib, "bwd", dA, T, Lq, sw, r, ctypes.c_longlong(rows), dS, dR)
        return dA

    def qkv_forward(self, z, b):
        P = z.shape[1] * z.shape[2]
        inv = np.empty(z.shape[:3] + (1,), z.dtype)
        bias = z if b is None else np.ascontiguousarray(b)
        ll = ctypes.c_longlong
        self._go(self.norm_libs[z.shape[3]], "qf", z, bias, int(b is not None), ll(3 * P), ll(P), inv)
        return inv

    def qkv_backward(self, dz, z, inv, scaling):
        P = dz.shape[1] * dz.shape[2]
        ll = ctypes.c_longlong
        self._go(self.norm_libs[dz.shape[3]], "qb", dz, z, inv, ll(3 * P), ll(P), self.ct(scaling))
        return dz

    def ln_forward(self, h, b, x, gamma, beta, eps):
        rows = h.shape[0] * h.shape[1]
        rstd, out = np.empty(h.shape[:2] + (1,), h.dtype), np.empty_like(h)
        bo = h if b is None else b
        x = np.ascontiguousarray(x)
        self._go(
            self.norm_libs[h.shape[2]],
            "lf",
            h,
            bo,
            int(b is not None),
            x,
            gamma,
            beta,
            self.ct(eps),
            ctypes.c_longlong(rows),
            rstd,
            out,
        )
        return out, h, rstd

    def ln_backward(self, dout, xhat, rstd, gamma):
        rows = xhat.shape[0] * xhat.shape[1]
        dh = np.empty_like(xhat)
        self._go(
            self.norm_libs[xhat.shape[2]],
            "lb",
            np.ascontiguousarray(dout),
            xhat,
            rstd,
            gamma,
            ctypes.c_longlong(rows),
            dh,
        )
        return dh


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")
@pytest.mark.parametrize(
    "dtype,dotr,normalize,smooth,extra,ns",
    [
        ("float64", True, True, True, {}, 45),
        ("float64", False, True, False, {"temperature": 0.7}, 45),
        ("float64", True, False, True, {"nobias": True}, 45),
        ("float32", True, True, True, {}, 45),
        ("float64", True, True, True, {}, 33),  # slots 33..44 left out (npad 12)
        ("float64", False, True, False, {}, 33),
    ],
)
def test_attention_block_on_the_kernels_equals_array_code(
    tmp_path, monkeypatch, dtype, dotr, normalize, smooth, extra, ns
):
    """attention_forward / attention_backward through every kernel (rows, q/k/v norm, LayerNorm) = the
    array code; ``ns`` < 45: a chunk that runs only its first ns slots."""
    import test_engine_attention as ta

    from dpsnake.engine.attn import attention as att

    monkeypatch.setattr(ta, "NNEI", 45)
    monkeypatch.setattr(ta, "E", 40)
    monkeypatch.setattr(ta, "H", 36)
    _, data = ta.reference(2, dotr, normalize, smooth, extra)
    p = att.AttentionLayers.from_serialized(data).to(np, np.dtype(dtype))
    G, mask, r, sw = (np.ascontiguousarray(a[:, :ns]) for a in ta.inputs(nb=3))
    G, r, sw = (a.astype(dtype) for a in (G, r, sw))
    want, cache = att.attention_forward(p, G, mask, r, sw)
    rng = np.random.default_rng(5)
    dG_out = rng.standard_normal(want.shape).astype(dtype)
    want_b = att.attention_backward(p, cache, dG_out)
    emu = _EmuRows(tmp_path, p, mask, r, sw, dtype)
    monkeypatch.setattr(att._Rows, "make", staticmethod(lambda *a, **k: emu))
    got, cache = att.attention_forward(p, G, mask, r, sw)
    got_b = att.attention_backward(p, cache, dG_out)
    assert emu.calls == 2 * (6 if normalize else 4)  # every kernel of both layers ran, forward and backward
    tol = 2e-5 if dtype == "float32" else 1e-12
    assert rel_err(got, want) < tol
    for g, w in zip(got_b, want_b):
        assert rel_err(g, w) < tol


@pytest.mark.parametrize("smooth,dotr,normalize", [(True, True, True), (True, False, False), (False, True, True)])
def test_left_out_slots_equal_deepmd(smooth, dotr, normalize):
    """A chunk that runs only its first ns slots (the rest empty: attention.py's module doc) gives what
    DeePMD-kit's NeighborGatedAttention gives on all nnei, forward (also the empty rows left out:
    empty_rows_forward); backward = our backward on all nnei, both to 1e-12."""
    import test_engine_attention as ta

    from dpsnake.engine.attn import attention as att

    nnei, ns = ta.NNEI, 6
    net, data = ta.reference(2, dotr, normalize, smooth, {})
    p = att.AttentionLayers.from_serialized(data).to(np, np.float64)
    G, mask, r, sw = ta.inputs(nb=4)
    mask[:, ns:] = False  # the trailing slots empty in every centre
    r[:, ns:], sw[:, ns:] = 0.0, 0.0  # (centre 0: its first ns slots filled; centre 1: none)
    with np.errstate(invalid="ignore"):  # DeePMD-kit's softmax of an all -inf row (zeroed after)
        want = net.call(G, mask, input_r=r, sw=sw)
    full, cache_full = att.attention_forward(p, G, mask, r, sw)
    assert rel_err(full, want) < 1e-12
    got, cache = att.attention_forward(p, *(np.ascontiguousarray(a[:, :ns]) for a in (G, mask, r, sw)))
    assert rel_err(got, want[:, :ns]) < 1e-12
    assert rel_err(att.empty_rows_forward(p, G[:, ns:]), want[:, ns:]) < 1e-12
    dG_out = np.random.default_rng(4).standard_normal(G.shape)
    want_b = att.attention_backward(p, cache_full, dG_out)
    got_b = att.attention_backward(p, cache, np.ascontiguousarray(dG_out[:, :ns]))
    for g, w in zip(got_b, want_b):
        assert rel_err(g, w[:, :ns]) < 1e-12
    assert nnei > ns


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("D", [128, 100, 8])
def test_norm_kernels_compile_for_sm90(dtype, D):
    pytest.importorskip("nvidia.cuda_nvrtc")
    from test_engine_cuda_compile import compile_cuda

    from dpsnake.engine.cuda.attn_norm import source

    ptx = compile_cuda(source(dtype, D))
    assert all(f".entry {k}" in ptx for k in ("qkv_fwd", "qkv_bwd", "ln_fwd", "ln_bwd"))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_bmm_equals_matmul_on_cupy(dtype):
    """cuda/bmm.py (cuBLAS op flags and alpha, no copies) = cupy.matmul of the transposed views."""
    from engine_helpers import cupy_or_skip

    cp = cupy_or_skip()
    from dpsnake.engine.cuda.bmm import bmm

    rng = np.random.default_rng(0)
    tol = 1e-5 if dtype == "float32" else 1e-13
    for ta in (False, True):
        for tb in (False, True):
            a = cp.asarray(rng.normal(size=(5, 7, 3) if ta else (5, 3, 7)).astype(dtype))
            b = cp.asarray(rng.normal(size=(5, 4, 7) if tb else (5, 7, 4)).astype(dtype))
            want = 0.7 * cp.matmul(a.swapaxes(1, 2) if ta else a, b.swapaxes(1, 2) if tb else b)
            got = bmm(a, b, ta=ta, tb=tb, alpha=0.7)
            assert got.shape == (5, 3, 4)
            assert float(cp.abs(got - want).max()) <= tol * float(cp.abs(want).max())
            out = cp.full((2, 5, 3, 4), cp.nan, dtype=dtype)
            bmm(a, b, ta=ta, tb=tb, alpha=0.7, out=out[1])
            assert float(cp.abs(out[1] - want).max()) <= tol * float(cp.abs(want).max())
            assert bool(cp.isnan(out[0]).all())
            acc = cp.asarray(rng.normal(size=(5, 3, 4)).astype(dtype))  # beta: accumulated in the GEMM
            want2 = want + 1.0 * acc
            bmm(a, b, ta=ta, tb=tb, alpha=0.7, out=acc, beta=1.0)
            assert float(cp.abs(acc - want2).max()) <= tol * float(cp.abs(want2).max())
