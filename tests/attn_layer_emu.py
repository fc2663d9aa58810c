"""The whole-layer attention kernels (cuda/attn_layer.cu) without a GPU: the CUDA source compiled with g++ and run
with threaded 32-lane warps (engine_helpers.THREADED_CUDA_STUB), ``mma.m16n8k8`` (TF32) and ``mma.m16n8k16`` (FP16)
emulated per warp with the PTX fragment layouts, ``cp.async`` as late as the PTX allows. ``Emu`` runs
cuda/attn_layer.py's forward / backward on NumPy arrays; ``two_layer_case`` and ``chain`` build a two-layer case
and run it as the engine chains the layers. Used by tests/test_engine_attn_layer.py (the kernels' logic) and
tests/test_engine_attn_layer_precision.py (their rounding)."""

from __future__ import annotations

import ctypes

import numpy as np
from engine_helpers import THREADED_CUDA_STUB, build_cpp

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
static float ex2f(float x) { return std::exp2(x); }  // ex2.approx's ~2 ulp not emulated
static void prefetch_l2(const void*) {}  // a hint: nothing to emulate
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
// ldmatrix.x4 (.b16) as a warp: lane 8m + r gives row r of matrix m; lane 4g + t gets, of matrix m, row g, columns
// 2t, 2t + 1 (ldsm4) or rows 2t, 2t + 1 of column g (ldsm4t)
static const unsigned short* LM_P[1024];
static void ldsm_(unsigned (&r)[4], const void* p, bool trans) {
  const unsigned th = threadIdx.x, w = th / 32, base = th & ~31u, g = (th & 31u) >> 2, t = th & 3u;
  LM_P[th] = static_cast<const unsigned short*>(p);
  WBAR[w]->arrive_and_wait();
  for (unsigned m = 0; m < 4; ++m) {
    const unsigned short* const* rows = LM_P + base + 8 * m;
    r[m] = trans ? rows[2 * t][g] | ((unsigned)rows[2 * t + 1][g] << 16)
                 : rows[g][2 * t] | ((unsigned)rows[g][2 * t + 1] << 16);
  }
  WBAR[w]->arrive_and_wait();
}
static void ldsm4(unsigned (&r)[4], const void* p) { ldsm_(r, p, false); }
static void ldsm4t(unsigned (&r)[4], const void* p) { ldsm_(r, p, true); }
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
// dynamic shared memory (LAUNCH sizes it), all NaN at each launch: a GPU's starts as whatever was there, so a read
// of a place not written first shows up
extern float SMEM_EMU[];
#define DYN_SMEM(name) float* name = SMEM_EMU
"""

# the emulator's TF32 conversion: exact (the kernels' logic) or cvt.rna's rounding (their precision)
EXACT_TF32 = "static unsigned tf32(float x) { return __float_as_uint(x); }"
ROUND_TF32 = "static unsigned tf32(float x) { return (__float_as_uint(x) + 0x1000u) & 0xFFFFE000u; }"
assert EXACT_TF32 in EMU

LAUNCH = r"""
float SMEM_EMU[N * (H + 8) + H * (N + 8) + 5 * N + 2 * N * (H + 8) + N * (N + 8)];
template <class F> static void launch_nan_smem(unsigned grid, F body) {
  std::memset(SMEM_EMU, 0xff, sizeof SMEM_EMU);
  launch(grid, 32 * NW, body);
}
extern "C" void fwd(unsigned grid, const float* x, const float2* wqkv, const float* bqkv, const float2* wout,
                    const float* bout, const float* gamma, const float* beta, float eps, const float* sw,
                    const float* r, const unsigned char* mask, long long B, int n, float s, float* out, ystore* y,
                    float* inv, xhstore* xhat, float* rstd) {
  launch_nan_smem(grid, [=] {
    attn_layer_fwd(x, wqkv, bqkv, wout, bout, gamma, beta, eps, sw, r, mask, B, n, s, out, y, inv, xhat, rstd);
  });
}
#if KEEP
extern "C" void bwd(unsigned grid, const float* dout, const xhstore* xhat, const float* rstd, const float* gamma,
                    const ystore* y, const float* inv, const float2* woutT, const float2* wqkvT, const float* sw,
                    const float* r, const unsigned char* mask, long long B, int n, float s, float* scratch, float* dx,
                    float* dsw, float* dr) {
  launch_nan_smem(grid, [=] {
    attn_layer_bwd(dout, xhat, rstd, gamma, y, inv, woutT, wqkvT, sw, r, mask, B, n, s, scratch, dx, dsw, dr);
  });
}
#endif
"""


def ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


class Emu:
    """attn_layer.py's forward / backward with the kernels run by g++ (threaded warps), on NumPy FP32 arrays;
    ``keep``: a force call's kernels (the forward keeps the backward's inputs), else the forward alone; ``wring``: W
    rings in both kernels (WRING = BRING), ``wdeep``: the deep ones, ``yh``: q, k, v kept in FP16 (YH) or FP32 (0);
    ``f16``: the forward's products on FP16 operands (F16; 0 by default: TF32's layout, whose emulated products
    are exact, so that the tests see the kernels' logic); ``ex2``: the softmax on ex2 (EX2; the emulator's is
    std::exp2); ``xh``: xhat kept in FP16 (XH); ``pref``: the
    next centre's rows toward L2 (PREF; no-ops here); None: as attn_layer.defines sets them."""

    def __init__(self, tmp_path, p, n, E, H, keep=True, wring=None, tf32=False, wdeep=None, yh=0, f16=0, b16=0,
                 ex2=None, xh=None, pref=None):  # fmt: skip
        self.p = p
        defs = attn_layer.defines(n, E, H, p.smooth, p.dotr, p.normalize, p.nnei, keep)
        flags = (("WRING", wring), ("BRING", wring), ("WDEEP", wdeep), ("YH", yh), ("F16", f16), ("B16", b16))
        for k, v in (*flags, ("EX2", ex2), ("XH", xh), ("PREF", pref)):
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
            dts = (attn_layer.y_dtype(self.defs), np.float32, attn_layer.xhat_dtype(self.defs), np.float32)
            cache = [np.full(s, np.nan, dtype=dt) for s, dt in zip(shapes, dts)]
        wqkv, wout = lw.forward_weights(bool(self.defs["F16"]))
        w = (wqkv, lw.bqkv, wout, lw.bout, lw.gamma, lw.beta)
        kp = [ptr(a) for a in cache] if keep else [None] * 4
        self.lib.fwd(grid, ptr(f32[0]), *map(ptr, w), ctypes.c_float(lw.eps), ptr(f32[1]), ptr(f32[2]),
                     ptr(m8), ctypes.c_longlong(B), ctypes.c_int(n), ctypes.c_float(self.p.scaling), ptr(out),
                     *kp)  # fmt: skip
        return (out, cache) if keep else out

    def backward(self, lw, cache, dout, mask, r, sw, grid, dsw, dr):
        B, n, E = dout.shape
        f32 = [np.ascontiguousarray(a, dtype=np.float32) for a in (dout, sw.reshape(B, n), r)]
        m8 = np.ascontiguousarray(mask, dtype=np.uint8)
        dx = np.full((B, n, E), np.nan, dtype=np.float32)
        scratch = np.full(grid * attn_layer.scratch_floats(self.defs["N"], self.defs["B16"]), np.nan, dtype=np.float32)
        y, inv, xhat, rstd = cache
        woutT, wqkvT = lw.backward_weights(bool(self.defs["B16"]))
        self.lib.bwd(grid, ptr(f32[0]), ptr(xhat), ptr(rstd), ptr(lw.gamma), ptr(y), ptr(inv),
                     ptr(woutT), ptr(wqkvT), ptr(f32[1]), ptr(f32[2]), ptr(m8), ctypes.c_longlong(B),
                     ctypes.c_int(n), ctypes.c_float(self.p.scaling), ptr(scratch), ptr(dx), ptr(dsw),
                     ptr(dr))  # fmt: skip
        return dx


def two_layer_case(monkeypatch, dotr, normalize, smooth, ns, H=32, E=20, nb=4, extra=None):
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


def chain(emu, lws, inputs, dG_out, bwd_grid=3):
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
