"""The whole-layer TF32 attention kernel (cuda/attn_layer.cu, forward) = attention.py's array code, no GPU
needed: the source compiled with g++ and run with threaded 32-lane warps, ``mma.m16n8k8`` emulated per warp
with the PTX fragment layout (exact FP32 products: the weights unrounded, so the test sees the kernel's logic,
not TF32's rounding); and compiled for sm_90 with NVRTC. On a GPU: tests/test_engine_attn_gpu.py."""

from __future__ import annotations

import ctypes
import shutil

import numpy as np
import pytest
from engine_helpers import THREADED_CUDA_STUB, build_cpp, rel_err

from dpsnake.engine.attn import attention as att
from dpsnake.engine.cuda import attn_layer

# mma.m16n8k8 (.tf32 operands as FP32 bits) as a warp: lane 4 g + t holds A[g][t], A[g+8][t], A[g][t+4],
# A[g+8][t+4]; B[t][g], B[t+4][g]; C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]
EMU = r"""
#include <cstring>
#define TMMA 1
struct float2 { float x, y; };
static float2 make_float2(float a, float b) { return {a, b}; }
static float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
static uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
// FP16 as cvt.rn (g++'s _Float16 rounds to nearest, ties to even)
static unsigned short f2h(float x) { _Float16 h = (_Float16)x; unsigned short u; std::memcpy(&u, &h, 2); return u; }
static float h2f(unsigned short u) { _Float16 h; std::memcpy(&h, &u, 2); return (float)h; }
static void __syncwarp() { WBAR[threadIdx.x / 32]->arrive_and_wait(); }
static float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static unsigned tf32(float x) { return __float_as_uint(x); }
static float TM_A[1024][4], TM_B[1024][2];
static void tmma(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, float b0, float b1) {
  const unsigned th = threadIdx.x, w = th / 32, base = th & ~31u, g = (th & 31u) >> 2, t = th & 3u;
  TM_A[th][0] = __uint_as_float(a0), TM_A[th][1] = __uint_as_float(a1);
  TM_A[th][2] = __uint_as_float(a2), TM_A[th][3] = __uint_as_float(a3);
  TM_B[th][0] = b0, TM_B[th][1] = b1;
  WBAR[w]->arrive_and_wait();
  double s[4] = {0, 0, 0, 0};
  for (unsigned e = 0; e < 4; ++e) {
    const unsigned row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
    for (unsigned k = 0; k < 8; ++k)
      s[e] += (double)TM_A[base + 4 * (row & 7) + (k & 3)][(row >= 8) + 2 * (k >= 4)] *
              (double)TM_B[base + 4 * col + (k & 3)][k >= 4];
  }
  WBAR[w]->arrive_and_wait();
  for (unsigned e = 0; e < 4; ++e) c[e] += (float)s[e];
}
// mma.m16n8k16 (.f16 operands, two per register, the lower index in the low half): lane 4 g + t holds A[g][2t, 2t+1],
// A[g+8][2t, 2t+1], A[g][2t+8, 2t+9], A[g+8][2t+8, 2t+9]; B[2t, 2t+1][g], B[2t+8, 2t+9][g]; C as m16n8k8's
static unsigned h2pack(float lo, float hi) { return f2h(lo) | ((unsigned)f2h(hi) << 16); }
static unsigned HM_A[1024][4], HM_B[1024][2];
static float hhalf(unsigned u, unsigned k) { return h2f((unsigned short)((k & 1) ? u >> 16 : u & 0xffffu)); }
static void hmma(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
  const unsigned th = threadIdx.x, w = th / 32, base = th & ~31u, g = (th & 31u) >> 2, t = th & 3u;
  HM_A[th][0] = a0, HM_A[th][1] = a1, HM_A[th][2] = a2, HM_A[th][3] = a3, HM_B[th][0] = b0, HM_B[th][1] = b1;
  WBAR[w]->arrive_and_wait();
  double s[4] = {0, 0, 0, 0};
  for (unsigned e = 0; e < 4; ++e) {
    const unsigned row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
    for (unsigned k = 0; k < 16; ++k)
      s[e] += (double)hhalf(HM_A[base + 4 * (row & 7) + ((k & 7) >> 1)][(row >= 8) + 2 * (k >= 8)], k) *
              (double)hhalf(HM_B[base + 4 * col + ((k & 7) >> 1)][k >= 8], k);
  }
  WBAR[w]->arrive_and_wait();
  for (unsigned e = 0; e < 4; ++e) c[e] += (float)s[e];
}
// cp.async as late as the PTX allows: a thread's copies land only when its wait_group lets their group go, so
// a stage read before its wait reads stale data
struct CpAsync { void* d; const void* s; };
static thread_local std::vector<std::vector<CpAsync>> CP_GROUPS;
static thread_local std::vector<CpAsync> CP_OPEN;
static void cp_async16(void* d, const void* s) { CP_OPEN.push_back({d, s}); }
static void cp_async_commit() { CP_GROUPS.push_back(CP_OPEN); CP_OPEN.clear(); }
template <int NP> static void cp_async_wait() {
  while (CP_GROUPS.size() > NP) {
    for (const CpAsync& c : CP_GROUPS.front()) std::memcpy(c.d, c.s, 16);
    CP_GROUPS.erase(CP_GROUPS.begin());
  }
}
#define DYN_SMEM(name) static float name[N * (H + 8) + H * (N + 8) + 5 * N + 2 * N * (H + 8)]
"""

# the emulator's TF32 conversion: exact (the kernels' logic) or cvt.rna's rounding (their precision)
EXACT_TF32 = "static unsigned tf32(float x) { return __float_as_uint(x); }"
ROUND_TF32 = "static unsigned tf32(float x) { return (__float_as_uint(x) + 0x1000u) & 0xFFFFE000u; }"
assert EXACT_TF32 in EMU

LAUNCH = r"""
extern "C" void fwd(unsigned grid, const float* x, const float2* wqkv, const float* bqkv, const float2* wout,
                    const float* bout, const float* gamma, const float* beta, float eps, const float* sw,
                    const float* r, const unsigned char* mask, long long B, int n, float s, float* out, ystore* y,
                    float* inv, float* xhat, float* rstd) {
  launch(grid, 32 * NW, [=] {
    attn_layer_fwd(x, wqkv, bqkv, wout, bout, gamma, beta, eps, sw, r, mask, B, n, s, out, y, inv, xhat, rstd);
  });
}
#if KEEP
extern "C" void bwd(unsigned grid, const float* dout, const float* xhat, const float* rstd, const float* gamma,
                    const ystore* y, const float* inv, const float2* woutT, const float2* wqkvT, const float* sw,
                    const float* r, const unsigned char* mask, long long B, int n, float s, float* scratch, float* dx,
                    float* dsw, float* dr) {
  launch(grid, 32 * NW, [=] {
    attn_layer_bwd(dout, xhat, rstd, gamma, y, inv, woutT, wqkvT, sw, r, mask, B, n, s, scratch, dx, dsw, dr);
  });
}
#endif
"""


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


class _Emu:
    """attn_layer.py's forward / backward with the kernels run by g++ (threaded warps), on NumPy FP32 arrays;
    ``keep``: a force call's kernels (the forward keeps the backward's inputs), else the forward alone; ``wring``: W
    rings in both kernels (WRING = BRING), ``wdeep``: the deep ones, ``yh``: q, k, v kept in FP16 (YH) or FP32 (0);
    ``f16``: the forward's products on FP16 operands (F16; 0 by default: TF32's layout, whose emulated products
    are exact, so that the tests see the kernels' logic); None: as attn_layer.defines sets them."""

    def __init__(self, tmp_path, p, n, E, H, keep=True, wring=None, tf32=False, wdeep=None, yh=0, f16=0, b16=0):
        self.p = p
        defs = attn_layer.defines(n, E, H, p.smooth, p.dotr, p.normalize, p.nnei, keep)
        for k, v in (("WRING", wring), ("BRING", wring), ("WDEEP", wdeep), ("YH", yh), ("F16", f16), ("B16", b16)):
            defs[k] = defs[k] if v is None else v
        self.defs = defs
        tag = "_".join(str(v) for v in self.defs.values()) + ("_tf32" if tf32 else "")
        emu = EMU.replace(EXACT_TF32, ROUND_TF32) if tf32 else EMU
        src = THREADED_CUDA_STUB + emu + attn_layer.source(**self.defs) + LAUNCH
        self.lib = build_cpp(tmp_path, f"layer_{tag}", src)

    def forward(self, lw, x, mask, r, sw, grid, keep=False):
        B, n, E = x.shape
        f32 = [np.ascontiguousarray(a, dtype=np.float32) for a in (x, sw.reshape(B, n), r)]
        m8 = np.ascontiguousarray(mask, dtype=np.uint8)
        out = np.full((B, n, E), np.nan, dtype=np.float32)
        cache = None
        if keep:
            shapes = ((3, B, n, lw.H), (3, B, n), (B, n, E), (B, n))
            cache = [np.full(s, np.nan, dtype=attn_layer.y_dtype(self.defs) if k == 0 else np.float32)
                     for k, s in enumerate(shapes)]  # fmt: skip
        wqkv, wout = lw.forward_weights(bool(self.defs["F16"]))
        w = (wqkv, lw.bqkv, wout, lw.bout, lw.gamma, lw.beta)
        kp = [_ptr(a) for a in cache] if keep else [None] * 4
        self.lib.fwd(grid, _ptr(f32[0]), *map(_ptr, w), ctypes.c_float(lw.eps), _ptr(f32[1]), _ptr(f32[2]),
                     _ptr(m8), ctypes.c_longlong(B), ctypes.c_int(n), ctypes.c_float(self.p.scaling), _ptr(out),
                     *kp)  # fmt: skip
        return (out, cache) if keep else out

    def backward(self, lw, cache, dout, mask, r, sw, grid, dsw, dr):
        B, n, E = dout.shape
        f32 = [np.ascontiguousarray(a, dtype=np.float32) for a in (dout, sw.reshape(B, n), r)]
        m8 = np.ascontiguousarray(mask, dtype=np.uint8)
        dx = np.full((B, n, E), np.nan, dtype=np.float32)
        scratch = np.full(grid * attn_layer.scratch_floats(self.defs["N"]), np.nan, dtype=np.float32)
        y, inv, xhat, rstd = cache
        woutT, wqkvT = lw.backward_weights(bool(self.defs["B16"]))
        self.lib.bwd(grid, _ptr(f32[0]), _ptr(xhat), _ptr(rstd), _ptr(lw.gamma), _ptr(y), _ptr(inv),
                     _ptr(woutT), _ptr(wqkvT), _ptr(f32[1]), _ptr(f32[2]), _ptr(m8), ctypes.c_longlong(B),
                     ctypes.c_int(n), ctypes.c_float(self.p.scaling), _ptr(scratch), _ptr(dx), _ptr(dsw),
                     _ptr(dr))  # fmt: skip
        return dx


def _run(tmp_path, p, lw, x, mask, r, sw, grid):
    """The emulated kernel's output for one layer's input x (B, n, E) FP32."""
    return _Emu(tmp_path, p, x.shape[1], x.shape[2], lw.H, keep=False).forward(lw, x, mask, r, sw, grid)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")
@pytest.mark.parametrize(
    "dotr,normalize,smooth,ns,nobias",
    [(True, True, True, 27, False), (False, True, True, 32, False), (True, False, False, 27, False),
     (False, True, False, 19, True), (True, True, True, 48, True)],
)  # fmt: skip
def test_layer_kernel_equals_array_code(tmp_path, monkeypatch, dotr, normalize, smooth, ns, nobias):
    """Both layers of a DeePMD-kit NeighborGatedAttention (random weights; E 20: padded to 24 inside), each
    layer's output from the kernel vs attention.py's ``_layer_forward`` in FP64. ns < 48: a chunk of fewer
    slots (padded to a multiple of 16 inside; smooth: the rest counted in the softmax); centre 0 full,
    centre 1 empty; grids of fewer blocks than centres and more."""
    import test_engine_attention as ta

    monkeypatch.setattr(ta, "NNEI", 48)
    monkeypatch.setattr(ta, "E", 20)
    monkeypatch.setattr(ta, "H", 32)
    _, data = ta.reference(2, dotr, normalize, smooth, {"nobias": nobias} if nobias else {})
    p = att.AttentionLayers.from_serialized(data).to(np, np.dtype("float64"))
    G, mask, r, sw = (np.ascontiguousarray(a[:, :ns]) for a in ta.inputs(nb=4))
    S, _, F, row_m, key_m = att._pair_terms(np, p, mask, r, sw, np.float64)
    x = G
    for layer in p.layers:
        want, _ = att._layer_forward(np, p, layer, x, S, F, row_m, key_m, keep=False)
        lw = attn_layer.LayerWeights.of(layer, np, round_tf32=False)
        for grid in (3, 6):
            got = _run(tmp_path, p, lw, x, mask, r, sw, grid)
            assert rel_err(got, want) < 2e-6, (grid, rel_err(got, want))
        x = want


def _two_layer_case(monkeypatch, dotr, normalize, smooth, ns, H=32, E=20, nb=4, extra=None):
    """A two-layer NeighborGatedAttention (nnei 48) and inputs of ``ns`` slots, with the FP64 array code's
    forward and backward: (p, (G, mask, r, sw), dG_out, (out, df/dG, df/dr, df/dsw))."""
    import test_engine_attention as ta

    monkeypatch.setattr(ta, "NNEI", 48)
    monkeypatch.setattr(ta, "E", E)
    monkeypatch.setattr(ta, "H", H)
    _, data = ta.reference(2, dotr, normalize, smooth, extra or {})
    p = att.AttentionLayers.from_serialized(data).to(np, np.dtype("float64"))
    inputs = tuple(np.ascontiguousarray(a[:, :ns]) for a in ta.inputs(nb=nb))
    want, cache = att.attention_forward(p, *inputs)
    dG_out = np.random.default_rng(5).standard_normal(want.shape)
    return p, inputs, dG_out, (want, *att.attention_backward(p, cache, dG_out))


def _chain(emu, lws, inputs, dG_out, bwd_grid=3):
    """Both layers through the emulated kernels as the engine chains them: forward keeping (grid 3), then backward
    (``bwd_grid``). Returns (each layer's input, the output, the caches, df/dG, df/dsw, df/dr)."""
    G, mask, r, sw = inputs
    B, n, _ = G.shape
    x, xs, caches = G.astype(np.float32), [], []
    for lw in lws:
        xs.append(x)
        x, c = emu.forward(lw, x, mask, r, sw, grid=3, keep=True)
        caches.append(c)
    dsw, dr = np.zeros((B, n), dtype=np.float32), np.zeros((B, n, 3), dtype=np.float32)
    dx = dG_out.astype(np.float32)
    for lw, c in zip(reversed(lws), reversed(caches)):
        dx = emu.backward(lw, c, dx, mask, r, sw, bwd_grid, dsw, dr)
    return xs, x, caches, dx, dsw, dr


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")
@pytest.mark.parametrize(
    "dotr,normalize,smooth,ns,nobias,wring,wdeep,H,E",
    [(True, True, True, 27, False, 1, 1, 32, 20), (False, True, True, 32, True, 1, 1, 32, 20),
     (True, False, False, 27, False, 1, 1, 32, 20), (False, True, False, 19, False, 1, 0, 32, 20),
     (True, True, False, 48, False, 1, 1, 32, 20), (True, True, True, 40, False, 0, 1, 32, 20),
     (True, True, True, 33, False, 1, 0, 24, 20), (True, True, True, 33, False, 1, 1, 24, 20),
     (True, True, True, 27, False, 1, 1, 32, 64)],
)  # fmt: skip
def test_layer_kernels_forward_keep_and_backward_equal_array_code(tmp_path, monkeypatch, dotr, normalize, smooth, ns,
                                                                  nobias, wring, wdeep, H, E):  # fmt: skip
    """Two layers forward (keeping what backward reads) and backward with the kernels, chained per layer as the
    engine would, = attention_forward / attention_backward's array code in FP64: the output, df/dG, df/d r,
    df/d sw (each layer's d sw, d r terms added by its backward; the grid smaller than the centres). WRING 0: the
    weights read by each warp from device memory instead of through shared memory; WDEEP 0: every product through
    the two-stage ring (not the deep rings in free shared arrays). H 24: an odd number of H's tiles (with WDEEP 0
    the backward's do in halves of 2 and 1). E 64: deep rings that wrap (5 stages for 8 tiles) and products that
    fall back to the two-stage ring (too few stages fit), in one kernel."""
    extra = {"nobias": nobias} if nobias else None
    p, inputs, dG_out, (want, want_dG, want_dr, want_dsw) = _two_layer_case(
        monkeypatch, dotr, normalize, smooth, ns, H=H, E=E, extra=extra
    )
    G, mask = inputs[:2]
    emu = _Emu(tmp_path, p, G.shape[1], G.shape[2], p.hidden_dim, wring=wring, wdeep=wdeep)
    lws = [attn_layer.LayerWeights.of(layer, np, round_tf32=False) for layer in p.layers]
    _, x, caches, dx, dsw, dr = _chain(emu, lws, inputs, dG_out)
    assert rel_err(x, want) < 2e-6
    assert np.isfinite(caches[0][0][:, mask]).all()
    assert rel_err(dx, want_dG) < 2e-6, rel_err(dx, want_dG)
    if smooth:
        assert rel_err(dsw, want_dsw[..., 0]) < 2e-6, rel_err(dsw, want_dsw[..., 0])
    else:
        assert not dsw.any()
    if dotr:
        assert rel_err(dr, want_dr) < 2e-6, rel_err(dr, want_dr)
    else:
        assert not dr.any()


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")
@pytest.mark.parametrize(
    "dotr,normalize,smooth,ns,wring,H,E",
    [(False, False, False, 27, 1, 32, 20), (False, False, True, 27, 1, 32, 20), (True, False, True, 40, 0, 32, 20),
     (True, True, True, 16, 1, 32, 20), (True, True, True, 48, 1, 8, 8), (False, True, False, 19, 1, 24, 16),
     (True, True, True, 27, None, 32, 19)],
)  # fmt: skip
def test_layer_kernels_other_flag_sets_and_shapes(tmp_path, monkeypatch, dotr, normalize, smooth, ns, wring, H, E):
    """The flag sets the tests above leave out (dotr, normalize, smooth: off/off/off, off/off/on, on/off/on, the
    last without the ring), one warp (16 slots), H = E = 8 (one tile), E a multiple of 8, E odd (single-float
    accesses where pairs do not fit; the engine's rings): the forward alone (KEEP 0) = the keeping forward, both =
    the FP64 array code, and the backward (a grid larger than the centres) too."""
    p, inputs, dG_out, (want, want_dG, want_dr, want_dsw) = _two_layer_case(
        monkeypatch, dotr, normalize, smooth, ns, H=H, E=E
    )
    G, mask, r, sw = inputs
    n = G.shape[1]
    emu = _Emu(tmp_path, p, n, E, H, wring=wring)
    alone = _Emu(tmp_path, p, n, E, H, keep=False, wring=wring)
    lws = [attn_layer.LayerWeights.of(layer, np, round_tf32=False) for layer in p.layers]
    xs, x, _, dx, dsw, dr = _chain(emu, lws, inputs, dG_out, bwd_grid=5)
    for lw, xin, xout in zip(lws, xs, xs[1:] + [x]):
        assert rel_err(alone.forward(lw, xin, mask, r, sw, grid=5), xout) < 1e-6
    assert rel_err(x, want) < 2e-6
    assert rel_err(dx, want_dG) < 2e-6, rel_err(dx, want_dG)
    assert (rel_err(dsw, want_dsw[..., 0]) < 2e-6) if smooth else not dsw.any()
    assert (rel_err(dr, want_dr) < 2e-6) if dotr else not dr.any()


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")
@pytest.mark.parametrize(
    "dotr,smooth,ns,wring,H,E",
    [(True, True, 27, 1, 32, 20), (True, True, 33, 1, 24, 20), (False, False, 19, 0, 24, 16),
     (True, True, 27, 1, 32, 64)],
)  # fmt: skip
def test_fp16_cache_is_the_fp32_cache_rounded(tmp_path, monkeypatch, dotr, smooth, ns, wring, H, E):
    """YH (a force call's kernels with NORMALIZE keep q, k, v in FP16): the forward's y is the FP32 build's rounded
    to FP16 (bit for bit, in the same order: the layout is shared), everything else it writes equal; the backward
    from it equals the FP32 build's backward from that rounded y (to the atomics' last bits); both near the FP64
    array code (the rounding moves df/dG ~3e-6, df/dr and df/dsw ~2e-4 with exact products; with TF32's, < 1%: next
    test). H 24: an odd last tile (stored alone); E 64: the deep rings that wrap."""
    p, inputs, dG_out, (want, want_dG, want_dr, want_dsw) = _two_layer_case(
        monkeypatch, dotr, True, smooth, ns, H=H, E=E
    )
    G, mask, r, sw = inputs
    n = G.shape[1]
    e16, e32 = (_Emu(tmp_path, p, n, E, H, wring=wring, yh=yh) for yh in (1, 0))
    assert attn_layer.defines(n, E, H, smooth, dotr, True, p.nnei)["YH"] == 1  # the engine's build
    lws = [attn_layer.LayerWeights.of(layer, np, round_tf32=False) for layer in p.layers]
    xs, x, caches, dx, dsw, dr = _chain(e16, lws, inputs, dG_out)
    for lw, xin, xout, c16 in zip(lws, xs, xs[1:] + [x], caches):
        out32, c32 = e32.forward(lw, xin, mask, r, sw, grid=3, keep=True)
        assert c16[0].dtype == np.float16 and c32[0].dtype == np.float32
        assert np.array_equal(c16[0].view(np.uint16), c32[0].astype(np.float16).view(np.uint16))
        assert np.array_equal(xout, out32) and all(np.array_equal(a, b) for a, b in zip(c16[1:], c32[1:]))
    # the backward, last layer: from the FP16 y and from the FP32 build's y rounded
    lw, c16 = lws[-1], caches[-1]
    _, c32 = e32.forward(lw, xs[-1], mask, r, sw, grid=3, keep=True)
    c32[0] = c32[0].astype(np.float16).astype(np.float32)
    z = [np.zeros(a.shape, np.float32) for a in (mask, r, mask, r)]
    b16 = e16.backward(lw, c16, dG_out.astype(np.float32), mask, r, sw, 5, z[0], z[1])
    b32 = e32.backward(lw, c32, dG_out.astype(np.float32), mask, r, sw, 5, z[2], z[3])
    # to the last bits: the kernel's shared-memory atomics (d sw, d r, and the p's of dx) sum in any order
    assert rel_err(b16, b32) < 1e-6 and rel_err(z[0], z[2]) < 1e-6 and rel_err(z[1], z[3]) < 1e-6
    assert rel_err(x, want) < 2e-6 and rel_err(dx, want_dG) < 1e-5, (rel_err(x, want), rel_err(dx, want_dG))
    assert (rel_err(dsw, want_dsw[..., 0]) < 1e-3) if smooth else not dsw.any()
    assert (rel_err(dr, want_dr) < 1e-3) if dotr else not dr.any()


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")
def test_layer_kernels_within_tf32_rounding(tmp_path, monkeypatch):
    """The kernels' precision without a GPU: operands rounded as cvt.rna does and the weights as
    LayerWeights.of rounds them, two layers forward (keeping, q, k, v in FP16 as the engine's build) and backward
    vs the FP64 array code. The bounds are ~4x what this emulation gives (out 2.9e-5, df/dG 1.1e-5, df/dr 2.3e-4,
    df/dsw 5.5e-4, the same to 1% with an FP32 y and with session 31's kernels; on an H100 the cuBLAS TF32 path at
    the bench's shape: 1.5e-5, 2.3e-5, 5.3e-4, 4.6e-4), and exact operands give < 2e-6 (tests above): the rounding
    is what is measured."""
    p, inputs, dG_out, (want, want_dG, want_dr, want_dsw) = _two_layer_case(monkeypatch, True, True, True, 40, nb=6)
    G = inputs[0]
    emu = _Emu(tmp_path, p, G.shape[1], G.shape[2], p.hidden_dim, tf32=True, yh=None)
    assert emu.defs["YH"] == 1
    lws = [attn_layer.LayerWeights.of(layer, np) for layer in p.layers]
    _, x, _, dx, dsw, dr = _chain(emu, lws, inputs, dG_out)
    errs = [rel_err(x, want), rel_err(dx, want_dG), rel_err(dr, want_dr), rel_err(dsw, want_dsw[..., 0])]
    assert errs[0] > 1e-6 and errs[0] < 1.2e-4 and errs[1] < 5e-5 and errs[2] < 1e-3 and errs[3] < 2e-3, errs


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")
@pytest.mark.parametrize(
    "dotr,normalize,smooth,ns,H,E,wring",
    [(True, True, True, 40, 32, 20, None), (False, False, False, 27, 32, 19, None), (True, True, False, 33, 16, 16, None),
     (True, True, True, 27, 32, 64, 1)],
)  # fmt: skip
def test_fp16_products_within_tf32_rounding(tmp_path, monkeypatch, dotr, normalize, smooth, ns, H, E, wring):
    """F16 and B16 (the products on m16n8k16 FP16 operands; the engine's build where H % 16 == 0): two layers
    forward keeping and backward vs the FP64 array code, against the same on TF32 operands, both with cvt.rna's
    rounding elsewhere. FP16 keeps TF32's 10 mantissa bits, so the errors match (this emulation: out 2.9e-5 both;
    df/dG 1.12e-5 both, df/dr 1.29e-4 vs 1.27e-4, df/dsw 2.5e-4 vs 2.2e-4); a wrong fragment layout gives errors of
    order 1. E 19: odd features (x's pairs' single-float tail); H 16: one k tile of q; E 64 with the rings in both
    kernels (the backward's do in one piece through the deep ring in v's space). The forward alone = the keeping
    one."""
    p, inputs, dG_out, (want, want_dG, want_dr, want_dsw) = _two_layer_case(
        monkeypatch, dotr, normalize, smooth, ns, H=H, E=E, nb=6
    )
    G = inputs[0]
    d = attn_layer.defines(G.shape[1], E, H, smooth, dotr, normalize, p.nnei)
    assert d["F16"] == d["B16"] == 1
    lws = [attn_layer.LayerWeights.of(layer, np) for layer in p.layers]
    errs = {}
    for h in (1, 0):
        emu = _Emu(tmp_path, p, G.shape[1], E, H, tf32=True, yh=None, f16=h, b16=h, wring=wring, wdeep=wring)
        xs, x, caches, dx, dsw, dr = _chain(emu, lws, inputs, dG_out)
        assert np.isfinite(caches[0][0][:, inputs[1]]).all()
        errs[h] = [rel_err(x, want), rel_err(dx, want_dG)]
        errs[h] += [rel_err(dr, want_dr) if dotr else 0.0, rel_err(dsw, want_dsw[..., 0]) if smooth else 0.0]
        if h:
            alone = _Emu(tmp_path, p, G.shape[1], E, H, keep=False, tf32=True, f16=1)
            assert rel_err(alone.forward(lws[1], xs[1], *inputs[1:], grid=5), x) < 1e-6
    assert errs[1][0] > 1e-6, errs  # rounded, not exact
    for e16, e32 in zip(errs[1], errs[0]):
        assert e16 <= 1.3 * e32 + 1e-7, errs


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")
def test_fp16_backward_scales_the_gradient(tmp_path, monkeypatch):
    """B16 brings each centre's largest |dh| to [1/16, 1/8) by a power of two before its FP16 operands and undoes it
    after: a cotangent 2^-24 times smaller (dE/dG of a model's size can sit below FP16's smallest normal, 6e-5, where
    unscaled operands would lose bits) gives the results 2^-24 times smaller, to the shared-memory atomics' last
    bits; so does one 2^12 larger."""
    p, inputs, dG_out, _ = _two_layer_case(monkeypatch, True, True, True, 40)
    G, mask, r, sw = inputs
    emu = _Emu(tmp_path, p, G.shape[1], G.shape[2], p.hidden_dim, tf32=True, yh=None, f16=1, b16=1)
    lw = attn_layer.LayerWeights.of(p.layers[-1], np)
    _, cache = emu.forward(lw, G.astype(np.float32), mask, r, sw, grid=3, keep=True)
    res = {}
    for k in (0, -24, 12):
        dsw, dr = np.zeros(mask.shape, np.float32), np.zeros(r.shape, np.float32)
        dx = emu.backward(lw, cache, (dG_out * 2.0**k).astype(np.float32), mask, r, sw, 5, dsw, dr)
        res[k] = [a * 2.0**-k for a in (dx, dsw, dr)]
    for k in (-24, 12):
        assert all(rel_err(a, b) < 1e-6 for a, b in zip(res[k], res[0])), k


def test_pack_b16_fragment_order():
    """pack_b16's [kt, mt, 4 g + t] registers are FP16 pairs (w[k][c], w[k + 1][c]), (w[k + 8][c], w[k + 9][c]),
    k = 16 kt + 2 t, c = 8 mt + g, the lower k in the low half; zero past the matrix."""
    w = np.arange(20 * 10, dtype=np.float64).reshape(20, 10) / 8 + 1.0
    b = attn_layer.pack_b16(w)
    assert b.shape == (2, 2, 32, 2) and b.dtype == np.float32
    u = b.view(np.uint32)

    def halves(x):
        return [float(np.array([x & 0xFFFF], np.uint16).view(np.float16)[0]),
                float(np.array([x >> 16], np.uint16).view(np.float16)[0])]  # fmt: skip

    g, t = 5, 3
    assert halves(u[0, 0, 4 * g + t, 0]) == [float(np.float16(w[6, 5])), float(np.float16(w[7, 5]))]
    assert halves(u[0, 0, 4 * g + t, 1]) == [float(np.float16(w[14, 5])), float(np.float16(w[15, 5]))]
    assert halves(u[1, 1, 4 * 1 + 1, 0]) == [float(np.float16(w[18, 9])), float(np.float16(w[19, 9]))]
    assert halves(u[1, 1, 4 * 1 + 1, 1]) == [0.0, 0.0]  # rows 26, 27: padding
    assert halves(u[0, 1, 4 * 2 + 0, 0]) == [0.0, 0.0]  # column 10: padding


def test_pack_b_fragment_order():
    """pack_b's [kt, mt, 4 g + t] pair is (w[k0][8 mt + g], w[k1][8 mt + g]) with the documented k0, k1, zero
    past the matrix."""
    w = np.arange(12 * 10, dtype=np.float64).reshape(12, 10) + 1.0
    plain, perm = attn_layer.pack_b(w, permuted=False), attn_layer.pack_b(w, permuted=True)
    assert plain.shape == perm.shape == (2, 2, 32, 2)
    g, t = 5, 3
    assert tuple(plain[0, 0, 4 * g + t]) == (w[t, g], w[t + 4, g])
    assert tuple(perm[1, 0, 4 * 1 + 1]) == (w[10, 1], w[11, 1])
    assert tuple(plain[1, 1, 4 * 2 + 2]) == (0.0, 0.0)  # column 10: padding
    assert plain[1, 1, 4 * 1 + 1, 0] == w[9, 9] and plain[1, 1, 4 * 1 + 1, 1] == 0.0
    assert plain[0, 1, 4 * 2 + 0, 0] == 0.0  # column 10: padding


def test_tf32_round_is_cvt_rna():
    """10 mantissa bits, to nearest, ties away from zero; exactly representable values unchanged."""
    a = np.array([1.0, 1.0 + 2.0**-11, -(1.0 + 2.0**-11), 1.0 + 2.0**-12, 3.0 * 2.0**-10], dtype=np.float32)
    got = attn_layer.tf32_round(a)
    assert got.tolist() == [1.0, 1.0 + 2.0**-10, -(1.0 + 2.0**-10), 1.0, 3.0 * 2.0**-10]


def test_supported_says_why_not():
    assert attn_layer.supported(np.float32, 88, 128) is None
    assert "FP32" in attn_layer.supported(np.float64, 88, 128)
    assert "registers" in attn_layer.supported(np.float32, 120, 128)
    assert "multiple of 8" in attn_layer.supported(np.float32, 88, 100)
    assert "registers" in attn_layer.supported(np.float32, 96, 512)
    assert "nnei 40" in attn_layer.supported(np.float32, 40, 128, nnei=40, smooth=True)  # padded to 48
    assert attn_layer.supported(np.float32, 40, 128, nnei=40, smooth=False) is None  # padded keys masked
    assert "registers" in attn_layer.supported(np.float32, 88, 128, E=200)


def test_launch_inputs_checked():
    """The kernels read raw pointers: a wrong dtype, layout or width is one ValueError, not garbage."""
    lw = attn_layer.LayerWeights.of(_layer(), np, round_tf32=False)
    B, n = 2, 5
    x, sw, r = np.zeros((B, n, 20), np.float32), np.zeros((B, n), np.float32), np.zeros((B, n, 3), np.float32)
    mask = np.ones((B, n), bool)
    attn_layer._check(lw, x, sw, r, mask)
    with pytest.raises(ValueError, match="features 21"):
        attn_layer._check(lw, np.zeros((B, n, 21), np.float32), sw, r, mask)
    with pytest.raises(ValueError, match="float64"):
        attn_layer._check(lw, x.astype(np.float64), sw, r, mask)
    with pytest.raises(ValueError, match="C-contiguous: False"):
        attn_layer._check(lw, x, sw, np.zeros((B, 3, n), np.float32).swapaxes(1, 2), mask)
    with pytest.raises(ValueError, match="expected bool"):
        attn_layer._check(lw, x, sw, r, mask.astype(np.uint8))


def _layer(E=20, H=32, seed=0):
    rng = np.random.default_rng(seed)
    return att.AttnLayer(rng.normal(size=(E, 3 * H)), None, rng.normal(size=(H, E)), None, np.ones(E), np.zeros(E),
                         1e-5, True, True, True, 0.5)  # fmt: skip


def test_defines():
    """Two blocks per SM at the bench's size; a force call's module (KEEP: the forward on the two-stage W ring, the
    backward on none, q, k, v kept in FP16) unless asked for the forward alone (the deep W rings)."""
    d = attn_layer.defines(88, 100, 128, 1, 1, 1, 120)
    assert d["MINB"] == 2 and d["KEEP"] == 1 and d["N"] == 96 and d["NPAD"] == 24
    alone = attn_layer.defines(88, 100, 128, 1, 1, 1, 120, keep=False)
    assert (d["WRING"], d["WDEEP"], d["BRING"], d["YH"]) == (1, 0, 0, 1)
    assert alone["KEEP"] == 0 and (alone["WRING"], alone["WDEEP"], alone["YH"]) == (1, 1, 0)
    assert attn_layer.defines(88, 100, 128, 1, 1, 0, 120)["YH"] == 0  # FP32 where q, k, v are not unit rows
    assert attn_layer.defines(88, 100, 128, 1, 1, 1, 120, smem_per_sm=164 * 1024)["MINB"] == 1  # sm_80: one block
    assert d["F16"] == alone["F16"] == d["B16"] == 1 and d["FMINB"] == d["MINB"]  # FP16 products where H % 16 == 0
    assert (
        attn_layer.defines(88, 100, 120, 1, 1, 1, 120)["F16"]
        == attn_layer.defines(88, 100, 120, 1, 1, 1, 120)["B16"]
        == 0
    )
    assert attn_layer.smem_bytes(96, 128, f16=True) == 2 * (96 * 136 + 128 * 104) + 4 * 5 * 96
    assert attn_layer.smem_bytes(96, 128, True, f16=True) == 2 * 2 * 96 * 136
    with pytest.raises(ValueError, match="exceed the model's nnei 90"):
        attn_layer.defines(88, 100, 128, 1, 1, 1, 90)


@pytest.mark.parametrize("n,E,H,flags", [(88, 100, 128, [(1, 1, 1)]), (64, 100, 64, [(0, 0, 0)]),
                                         (27, 20, 32, [(1, 1, 1), (0, 0, 0), (1, 0, 1)]), (27, 20, 24, [(1, 1, 1)])])  # fmt: skip
def test_layer_kernel_compiles_for_sm90(n, E, H, flags):
    """NVRTC for sm_90: the bench's shape (40 s for all flag sets: one here), a small one with every flag set, H 24
    (TF32 products: FP16's need H % 16 == 0)."""
    pytest.importorskip("nvidia.cuda_nvrtc")
    from test_engine_cuda_compile import compile_cuda

    for smooth, dotr, normalize in flags:
        defs = attn_layer.defines(n, E, H, smooth, dotr, normalize, 120)
        ptx = compile_cuda(attn_layer.source(**defs))
        assert ".entry attn_layer_fwd" in ptx and ".entry attn_layer_bwd" in ptx
        # FP16 products (F16, B16) where H % 16 == 0, else TF32's
        assert ("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32" in ptx) == (H % 16 != 0)
        assert ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx) == (H % 16 == 0)
    defs = attn_layer.defines(n, E, H, *flags[0], 120, keep=False)  # the forward alone
    ptx = compile_cuda(attn_layer.source(**defs))
    assert ".entry attn_layer_fwd" in ptx and ".entry attn_layer_bwd" not in ptx


@pytest.mark.parametrize(
    "dotr,normalize,smooth,ns", [(True, True, True, 88), (False, True, True, 64), (True, False, False, 88)]
)
def test_layer_kernel_on_gpu_within_tf32(monkeypatch, dotr, normalize, smooth, ns):
    """On a GPU (skipped without): the kernel on TF32 tensor cores at the bench's shape (E 100, H 128, nnei
    120) vs the FP64 array code, both layers: within TF32's rounding (2^-11 per operand)."""
    from engine_helpers import cupy_or_skip

    cp = cupy_or_skip()
    import test_engine_attention as ta

    monkeypatch.setattr(ta, "NNEI", 120)
    monkeypatch.setattr(ta, "E", 100)
    monkeypatch.setattr(ta, "H", 128)
    _, data = ta.reference(2, dotr, normalize, smooth, {})
    p = att.AttentionLayers.from_serialized(data)
    p64, p32 = p.to(cp, np.float64), p.to(cp, np.float32)
    G, mask, r, sw = (cp.asarray(np.ascontiguousarray(a[:, :ns])) for a in ta.inputs(nb=64))
    want, _ = att.attention_forward(p64, G, mask, r, sw, keep=False)
    x = cp.ascontiguousarray(G.astype(cp.float32))
    sw2, r32 = (cp.ascontiguousarray(a.astype(cp.float32)) for a in (sw.reshape(mask.shape), r))
    for layer in p32.layers:
        lw = attn_layer.LayerWeights.of(layer, cp)
        x = attn_layer.forward(lw, x, sw2, r32, cp.ascontiguousarray(mask), p.scaling, smooth, dotr, normalize, p.nnei)
    err = rel_err(cp.asnumpy(x), cp.asnumpy(want))
    print("attn_layer TF32 vs FP64", dotr, normalize, smooth, ns, f"{err:.1e}")
    assert err < 1e-2


class _EmuLayerModule:
    """cuda/attn_layer.py's interface (as attention.py calls it) with the kernels run by g++; weights unrounded."""

    class LayerWeights:
        @staticmethod
        def of(layer, xp):
            return attn_layer.LayerWeights.of(layer, xp, round_tf32=False)

    def __init__(self, tmp_path, p, n, E, H):
        self.emu = _Emu(tmp_path, p, n, E, H)  # a force call's kernels
        self.calls = 0

    def forward(self, lw, x, sw, r, mask, scale, smooth, dotr, normalize, nnei, keep=False):
        assert keep, "the forward alone is its own module (KEEP 0)"
        self.calls += 1
        return self.emu.forward(lw, x, mask, r, sw, grid=3, keep=keep)

    def backward(self, lw, cache, dout, sw, r, mask, scale, smooth, dotr, normalize, nnei, dsw, dr):
        self.calls += 1
        return self.emu.backward(lw, cache, dout, mask, r, sw, 3, dsw, dr)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")
@pytest.mark.parametrize("dotr,normalize,smooth,ns", [(True, True, True, 40), (False, True, False, 48)])
def test_attention_block_on_the_layer_kernels_equals_array_code(tmp_path, monkeypatch, dotr, normalize, smooth, ns):
    """attention_forward / attention_backward of two FP32 layers with ``_Rows.layer`` set (the path mixed + TF32
    takes on a GPU): both layers run in the layer kernels, forward and backward, = the FP64 array code."""
    import test_engine_attention as ta
    from test_engine_attn_rows import _EmuRows

    monkeypatch.setattr(ta, "NNEI", 48)
    monkeypatch.setattr(ta, "E", 20)
    monkeypatch.setattr(ta, "H", 32)
    _, data = ta.reference(2, dotr, normalize, smooth, {})
    serialized = att.AttentionLayers.from_serialized(data)
    p64, p32 = serialized.to(np, np.dtype("float64")), serialized.to(np, np.dtype("float32"))
    G, mask, r, sw = (np.ascontiguousarray(a[:, :ns]) for a in ta.inputs(nb=3))
    want, cache = att.attention_forward(p64, G, mask, r, sw)
    dG_out = np.random.default_rng(5).standard_normal(want.shape)
    want_b = att.attention_backward(p64, cache, dG_out)
    emu = _EmuRows(tmp_path, p32, mask, r, sw, "float32")
    emu.layer = _EmuLayerModule(tmp_path, p32, ns, 20, 32)
    monkeypatch.setattr(att._Rows, "make", staticmethod(lambda *a, **k: emu))
    emu.weights = att._Rows.weights.__get__(emu)
    got, cache = att.attention_forward(p32, G.astype(np.float32), mask, r, sw)
    got_b = att.attention_backward(p32, cache, dG_out.astype(np.float32))
    assert emu.layer.calls == 4  # both layers, forward and backward
    assert got.dtype == np.float32 and rel_err(got, want) < 2e-6
    for g, w in zip(got_b, want_b):
        assert g.shape == w.shape and rel_err(g, w) < 2e-6
