"""The fused FP64 attention core (cuda/attn_core.cu) = attention.py's array code, no GPU needed: the source
compiled with g++ and run with threaded 32-lane warps, the FP64 tensor-core ``mma`` emulated per warp with
the PTX fragment layout; and compiled for sm_90 with NVRTC. (On a GPU: tests/test_engine_attn_gpu.py runs
the whole se_atten engine with it on.)"""

from __future__ import annotations

import ctypes
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from engine_helpers import THREADED_CUDA_STUB, build_cpp, rel_err
from test_engine_attn_rows import _EmuRows, _inputs, _ptr

from dpsnake.engine.attn.attention import _pair_terms, _rows_backward, _rows_forward

# mma.m8n8k4.f64 as a warp: lane 4 g + t holds a[g][t], b[t][g], c[g][2t], c[g][2t + 1]
EMU = r"""
#define DMMA 1
#define DYN_SMEM(name) static double name[N * (N + 1) + 4 * N + N * (H + 4)]
static double DM_A[1024], DM_B[1024];
static void dmma(double& c0, double& c1, double a, double b) {
  const unsigned th = threadIdx.x, w = th / 32, base = th & ~31u, g = (th & 31u) >> 2, t = th & 3u;
  DM_A[th] = a, DM_B[th] = b;
  WBAR[w]->arrive_and_wait();
  double s0 = 0, s1 = 0;
  for (unsigned k = 0; k < 4; ++k) {
    const double ag = DM_A[base + 4 * g + k];
    s0 += ag * DM_B[base + 4 * (2 * t) + k], s1 += ag * DM_B[base + 4 * (2 * t + 1) + k];
  }
  WBAR[w]->arrive_and_wait();
  c0 += s0, c1 += s1;
}
"""

LAUNCH = r"""
extern "C" void fwd(unsigned grid, const double* z, const double* sw, const double* r, const unsigned char* mask,
                    long long B, double s, double* o) {
  launch(grid, 32 * NW, [=] { attn_core_fwd(z, sw, r, mask, B, s, o); });
}
extern "C" void bwd(unsigned grid, const double* z, const double* dout, const double* sw, const double* r,
                    const unsigned char* mask, long long B, double s, double* dz, double* dsw, double* dr) {
  launch(grid, 32 * NW, [=] { attn_core_bwd(z, dout, sw, r, mask, B, s, dz, dsw, dr); });
}
"""


def build(tmp_path, n, H, smooth, dotr, npad):
    from dpsnake.engine.cuda.attn_core import source

    tag = f"core_{n}_{H}_{int(smooth)}{int(dotr)}_{npad}"
    return build_cpp(tmp_path, tag, THREADED_CUDA_STUB + EMU + source(n, H, smooth, dotr, npad) + LAUNCH)


def reference(p, z, sw, r, mask, s, do, npad):
    """attention.py's array code of one layer's core: o = A v, and (dL k, dL^T q, A^T do), (dS + dS^T) sw,
    (dR + dR^T) r from do."""
    q, k, v = z
    S, R, F, row_m, key_m = _pair_terms(np, p, mask, r, sw[..., None], np.float64)
    T, A = _rows_forward(np, p, np.matmul(q * s, k.swapaxes(1, 2)), S, F, row_m, key_m, npad)
    T, A = T.copy(), A.copy()
    B, n = mask.shape
    dS, dR = np.zeros((B, n, n)), np.zeros((B, n, n))
    dA = np.matmul(do, v.swapaxes(1, 2))
    Lq = lambda: np.matmul(q * s, k.swapaxes(1, 2))  # noqa: E731
    dL = _rows_backward(np, p, dA, T, Lq, S, R, F, dS if p.smooth else None, dR if p.dotr else None)
    dz = np.stack([dL @ k, dL.swapaxes(1, 2) @ q, A.swapaxes(1, 2) @ do])
    dsw = np.matmul(dS + dS.swapaxes(1, 2), sw[..., None])[..., 0]
    dr = np.matmul(dR + dR.swapaxes(1, 2), r)
    return A @ v, dz, dsw, dr


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")
@pytest.mark.parametrize("smooth,dotr,npad", [(1, 1, 0), (1, 0, 0), (0, 1, 0), (0, 0, 0), (1, 1, 7)])
def test_core_kernels_match_array_code(tmp_path, smooth, dotr, npad):
    """Centre 1 has no neighbours, centre 2 every slot; n 40 (two values per lane, one partial), H 16;
    grids of fewer blocks than centres and more. npad: empty keys left out (the smooth softmax counts them)."""
    B, n, H, s = 3, 40, 16, 0.37
    lib = build(tmp_path, n, H, smooth, dotr, npad)
    p = SimpleNamespace(smooth=bool(smooth), dotr=bool(dotr))
    _, sw, r, mask = _inputs(B, n, "float64")
    rng = np.random.default_rng(3)
    z = rng.normal(size=(3, B, n, H))
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    z *= 3.0  # logits of a few units, as normalized q, k with s ~ 1 give
    do = rng.normal(size=(B, n, H))
    o_ref, dz_ref, dsw_ref, dr_ref = reference(p, z, sw, r, mask, s, do, npad)
    m8 = mask.astype(np.uint8)
    for grid in (2, 5):
        o = np.full((B, n, H), np.nan)
        lib.fwd(grid, _ptr(z), _ptr(sw), _ptr(r), _ptr(m8), ctypes.c_longlong(B), ctypes.c_double(s), _ptr(o))
        assert rel_err(o, o_ref) < 1e-13
        dz = np.full_like(z, np.nan)
        dsw0, dr0 = rng.normal(size=(B, n)), rng.normal(size=(B, n, 3))  # added to, not overwritten
        dsw, dr = dsw0.copy(), dr0.copy()
        args = (z, do, sw, r, m8, ctypes.c_longlong(B), ctypes.c_double(s), dz, dsw, dr)
        lib.bwd(grid, *[_ptr(a) if isinstance(a, np.ndarray) else a for a in args])
        assert rel_err(dz, dz_ref) < 1e-13
        assert rel_err(dsw - dsw0, dsw_ref) < 1e-12 if smooth else np.array_equal(dsw, dsw0)
        assert rel_err(dr - dr0, dr_ref) < 1e-12 if dotr else np.array_equal(dr, dr0)


class _EmuCore:
    """cuda/attn_core.py's module interface with the kernels run by g++ (for attention.py's fused path)."""

    def __init__(self, tmp_path, n, H, smooth, dotr, npad):
        self.lib = build(tmp_path, n, H, smooth, dotr, npad)
        self.calls = 0

    def forward(self, z, sw, r, mask, scale, smooth, dotr, npad=0):
        self.calls += 1
        o = np.empty(z.shape[1:])
        args = (z, sw, r, mask.astype(np.uint8), ctypes.c_longlong(z.shape[1]), ctypes.c_double(scale), o)
        self.lib.fwd(4, *[_ptr(a) if isinstance(a, np.ndarray) else a for a in args])
        return o

    def backward(self, z, do, sw, r, mask, scale, dz, dsw, dr, smooth, dotr, npad=0):
        self.calls += 1
        args = (z, np.ascontiguousarray(do), sw, r, mask.astype(np.uint8), ctypes.c_longlong(z.shape[1]))
        args += (ctypes.c_double(scale), dz, dsw, dr)
        self.lib.bwd(4, *[_ptr(a) if isinstance(a, np.ndarray) else a for a in args])
        return dz


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")
@pytest.mark.parametrize(
    "dotr,normalize,smooth,ns",
    [(True, True, True, 48), (False, True, False, 48), (True, False, True, 32), (False, True, True, 40)],
)
def test_attention_block_on_the_fused_core_equals_array_code(tmp_path, monkeypatch, dotr, normalize, smooth, ns):
    """attention_forward / attention_backward of two FP64 layers on the fused core (plus the q/k/v and
    LayerNorm kernels) = the array code; ``ns`` < 48: a chunk that runs only its first ns slots."""
    import test_engine_attention as ta

    from dpsnake.engine.attn import attention as att

    monkeypatch.setattr(ta, "NNEI", 48)
    monkeypatch.setattr(ta, "E", 40)
    monkeypatch.setattr(ta, "H", 24)
    _, data = ta.reference(2, dotr, normalize, smooth, {})
    p = att.AttentionLayers.from_serialized(data).to(np, np.dtype("float64"))
    G, mask, r, sw = (np.ascontiguousarray(a[:, :ns]) for a in ta.inputs(nb=3))
    want, cache = att.attention_forward(p, G, mask, r, sw)
    dG_out = np.random.default_rng(5).standard_normal(want.shape)
    want_b = att.attention_backward(p, cache, dG_out)
    emu = _EmuRows(tmp_path, p, mask, r, sw, "float64")
    emu.core = _EmuCore(tmp_path, ns, p.hidden_dim, smooth, dotr, emu.npad)
    monkeypatch.setattr(att._Rows, "make", staticmethod(lambda *a, **k: emu))
    got, cache = att.attention_forward(p, G, mask, r, sw)
    got_b = att.attention_backward(p, cache, dG_out)
    assert emu.core.calls == 4  # both layers, forward and backward
    assert rel_err(got, want) < 1e-12
    for g, w in zip(got_b, want_b):
        assert rel_err(g, w) < 1e-12


def test_supported_says_why_not():
    from dpsnake.engine.cuda.attn_core import supported

    assert supported(np.float64, 88, 128) is None
    assert "FP64" in supported(np.float32, 88, 128)
    assert "multiples of 8" in supported(np.float64, 45, 128)
    assert "registers" in supported(np.float64, 120, 128)
    assert "shared memory" in supported(np.float64, 96, 256)


@pytest.mark.parametrize("n,H", [(88, 128), (80, 128), (96, 64), (8, 8)])
def test_core_kernels_compile_for_sm90(n, H):
    pytest.importorskip("nvidia.cuda_nvrtc")
    from test_engine_cuda_compile import compile_cuda

    from dpsnake.engine.cuda.attn_core import source

    for smooth, dotr, npad in ((1, 1, 32), (0, 0, 0), (1, 0, 0)):
        ptx = compile_cuda(source(n, H, smooth, dotr, npad))
        assert ".entry attn_core_fwd" in ptx and ".entry attn_core_bwd" in ptx
        assert "mma.sync.aligned.m8n8k4.row.col.f64" in ptx
