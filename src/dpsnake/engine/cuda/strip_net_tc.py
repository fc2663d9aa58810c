"""strip_net.py's kernels on TF32 tensor cores (``mma.m16n8k8``), for settings.tf32 with ``strip_tc``: the strip-mode
geometric net of se_atten / se_atten_v2 and its type gate, G = Gs (1 + T[row] w) forward, dL/ds and dL/dw
backward, a warp per 16 neighbour slots.

strip_net.py runs a slot per thread with FP32 FMAs on weights read from shared memory: bound by those reads
(one 16-byte broadcast per four FMAs; 190 clock cycles per slot and SM for DeePMD-kit's [25, 50, 100] on an
H100, forward). Here every layer after the first is a product of the warp's 16 x nin activations with W on
tensor cores (a B fragment, 8 bytes per lane, per 1,024 multiply-adds), the first layer (1 input) and every
activation elementwise in the accumulator layout, so nothing leaves the registers between layers. TF32
rounds the products' inputs to 10 mantissa bits, as cuBLAS's TF32 GEMMs of the array code with settings.tf32
do (the accumulators FP32).

Layout (attn_layer.cu's header has the fragment layout): an accumulator tile feeds the next product as its A
operand with its columns 2t, 2t + 1 read as the k indices t, t + 4, and W's rows permuted alike
(attn_layer.pack_b(permuted=True)). A layer's outputs sit at "positions" chosen so that a resnet layer's
residual (x, or concat(x, x)) is in the same lane and fragment element as the output it adds to: concat's
second copy at position p + W_in (W_in: the input's positions, a multiple of 8), identity at p; other layers
at 0..nout-1. Unused positions hold 0 (idt 0 there) and meet zero rows of the next W. The backward recomputes
the net (recompute rather than store), streams the last layer in chunks of tiles (z, the gate, dz), and
multiplies each chunk's dz by W^T on tensor cores into dL/dh of the layer below. A warp's 16 rows of G (and,
backward, of gG with the gate applied) go through a (16, M) shared tile as whole rows; the B fragments are read
through L1 (they are the same for every warp), the biases, idt, w0 and the column map staged in shared memory.

Off by default (EngineSettings.strip_tc): the first build, which moved G, gG and the table element by element and
held 255 registers in the backward, was slower than strip_net.py on an H100; this one is not measured yet
(bench/profiling/strip_net_probe.py; docs/benchmarks.md "Session 35"). Tested without a GPU
(tests/test_engine_strip_net.py: g++ with threaded warps and the products emulated, against nets.py on the
TF32-rounded weights + the gate's array code; NVRTC and ptxas for sm_90); tests/test_engine_attn_gpu.py on a GPU.
"""

from __future__ import annotations

import numpy as np

from dpsnake.engine.cuda.attn_layer import pack_b, tf32_round
from dpsnake.engine.cuda.fused import _act_code
from dpsnake.engine.cuda.strip_net import TANH_F32, StripNet

WPB = 4  # warps per block, 16 slots each
BWD_MINB = 3  # blocks per SM the backward is compiled for: 168 registers (124 B of spills), 12 warps per SM; 0: 253
CH = 2  # n tiles of the last layer per chunk
FWD_CH = 2  # the forward's (4: 128 registers, no spills either; with DIRECT no faster, session 40)
DIRECT = False  # G and gG element by element (no tiles): backward 2.691 vs 3.805 ms, forward 2.245 vs 1.108 (H100)


def _ceil8(k: int) -> int:
    return -(-k // 8) * 8


class Plan:
    """Positions of each layer's outputs and the packed parameters (one FP32 array): per layer its bias, idt
    (0 at unused positions) and, for the first, w; the last layer's column of each position (-1: unused) (these
    ``n_vec`` floats staged in shared memory); the B fragments of every layer after the first, then of their
    W^T."""

    def __init__(self, net):
        L = net.layers
        if L[0].nin != 1 or len(L) < 2:
            raise ValueError("strip_net_tc: a 1-input net of two layers at least")
        self.acts = [l.activation.lower() for l in L]
        for a in self.acts:
            _act_code(a)  # raises for an activation without kernel code
        self.res, self.pos, self.width = [], [], []
        for k, l in enumerate(L):
            res = 1 if (l.resnet and l.nout == l.nin) else (2 if (l.resnet and l.nout == 2 * l.nin) else 0)
            if k == 0 or res == 0:
                p, w = np.arange(l.nout), _ceil8(l.nout)
            elif res == 1:
                p, w = self.pos[-1], self.width[-1]
            else:
                p, w = np.concatenate([self.pos[-1], self.pos[-1] + self.width[-1]]), 2 * self.width[-1]
            self.res.append(res)
            self.pos.append(p)
            self.width.append(w)
        self.M = L[-1].nout
        vec, self.off = [], {}

        def put(name, a):
            self.off[name] = sum(len(v) for v in vec)
            vec.append(np.asarray(a, dtype=np.float32).ravel())

        for k, l in enumerate(L):
            W, p = self.width[k], self.pos[k]
            b, it = np.zeros(W), np.zeros(W)
            b[p] = 0.0 if l.b is None else np.asarray(l.b, dtype=np.float64).ravel()
            it[p] = 1.0 if l.idt is None else np.asarray(l.idt, dtype=np.float64).ravel()
            put(f"b{k}", b)
            put(f"i{k}", it)
            if k == 0:
                w0 = np.zeros(W)
                w0[p] = np.asarray(l.w, dtype=np.float64)[0]
                put("w0", w0)
        col = np.full(self.width[-1], -1, dtype=np.int32)
        col[self.pos[-1]] = np.arange(self.M)
        put("col", col.view(np.float32))
        self.n_vec = sum(len(v) for v in vec)  # what the kernels stage in shared memory
        frags = []
        for k in range(1, len(L)):
            wpos = np.zeros((self.width[k - 1], self.width[k]))
            wpos[np.ix_(self.pos[k - 1], self.pos[k])] = np.asarray(L[k].w, dtype=np.float64)
            frags.append((k, wpos))
        for k, wpos in frags:
            put(f"B{k}", tf32_round(pack_b(wpos, permuted=True)))
        for k, wpos in frags:
            put(f"BT{k}", tf32_round(pack_b(wpos.T, permuted=True)))
        self.params = np.concatenate(vec)
        self.params = np.concatenate([self.params, np.zeros(-len(self.params) % 4, np.float32)])


def _elementwise(plan: Plan, k: int, src: str, dst: str, deriv: bool, s: str | None = None) -> list:
    """Layer k's activation in place on the accumulators ``dst`` (z without bias), residual from ``src``
    (layer k - 1's outputs; the first layer: its input s0 / s1 given as ``s``), dD{k} = act' idt with ``deriv``."""
    nt = plan.width[k] // 8
    c = [f"#pragma unroll\nfor (int c = 0; c < {nt}; ++c)\n#pragma unroll\nfor (int e = 0; e < 4; ++e) {{",
         "  const int pos = 8 * c + 2 * t + (e & 1);",
         f"  T z = {dst}[c][e] + P[{plan.off[f'b{k}']} + pos];",
         f"  T y, d; {_act_code(plan.acts[k])}",
         f"  const T it = P[{plan.off[f'i{k}']} + pos];",
         "  y *= it;"]  # fmt: skip
    if deriv:
        c.append(f"  dD{k}[c][e] = d * it;")
    if plan.res[k]:
        if k == 0:
            c.append(f"  y += (e < 2) ? {s}0 : {s}1;")
        else:
            c.append(f"  y += {src}[c % {plan.width[k - 1] // 8}][e];")
    c += [f"  {dst}[c][e] = y;", "}"]
    return c


def _first(plan: Plan, deriv: bool) -> list:
    """The first layer (1 input): z = s w0 + b0 per position, in the accumulator layout."""
    nt = plan.width[0] // 8
    c = [f"T h0[{nt}][4];"] + ([f"T dD0[{nt}][4];"] if deriv else [])
    c += [f"#pragma unroll\nfor (int c = 0; c < {nt}; ++c)\n#pragma unroll\nfor (int e = 0; e < 4; ++e)",
          f"  h0[c][e] = ((e < 2) ? s0 : s1) * P[{plan.off['w0']} + 8 * c + 2 * t + (e & 1)];"]  # fmt: skip
    return c + _elementwise(plan, 0, "", "h0", deriv, s="s")


def _product(a: str, kt: int, bname: int, acc: str, n_lo: str, n_hi: str, stride: int) -> list:
    """acc[n - n_lo][.] += a[k] W[k][n] over the kt k tiles of ``a`` (accumulators, TF32-rounded as A) and n
    tiles n_lo..n_hi - 1 of the B fragments at ``bname`` (``stride`` n tiles per k tile)."""
    return [f"#pragma unroll\nfor (int k = 0; k < {kt}; ++k) {{",
            "  KEEP_ORDER;",
            f"  const unsigned a0 = tf32({a}[k][0]), a1 = tf32({a}[k][2]), a2 = tf32({a}[k][1]), a3 = tf32({a}[k][3]);",
            f"  #pragma unroll\n  for (int n = {n_lo}; n < {n_hi}; ++n) {{",
            f"    const float2 b = PB[({bname} >> 1) + (k * {stride} + n) * 32 + lane];",
            f"    tmma({acc}[n - ({n_lo})], a0, a1, a2, a3, b.x, b.y);",
            "  }", "}"]  # fmt: skip


def _hidden(plan: Plan, deriv: bool) -> tuple[list, str]:
    """Layers 1 .. last - 1 (products + activations); the name of the last layer's input."""
    c, src = [], "h0"
    for k in range(1, len(plan.width) - 1):
        nt, kt = plan.width[k] // 8, plan.width[k - 1] // 8
        c += [f"T h{k}[{nt}][4];"] + ([f"T dD{k}[{nt}][4];"] if deriv else [])
        c += [
            f"#pragma unroll\nfor (int n = 0; n < {nt}; ++n) h{k}[n][0] = h{k}[n][1] = h{k}[n][2] = h{k}[n][3] = 0.f;"
        ]
        c += _product(src, kt, plan.off[f"B{k}"], f"h{k}", "0", str(nt), nt)
        c += _elementwise(plan, k, src, f"h{k}", deriv)
        src = f"h{k}"
    return c, src


def _last_chunks(plan: Plan, src: str, bwd: bool, direct: bool = False, CH: int = CH) -> list:
    """The last layer in chunks of CH n tiles (more: more independent products per k step, more registers): z,
    activation, residual, gate; forward stores G, backward forms dz = dL/dz (gin from gG and the gate), adds the residual's share to dh and dz W^T to dh. ``direct``: G and gG
    move between the accumulators and memory element by element (the gate's table read where it is needed),
    else through the warp's tiles as whole rows."""
    k = len(plan.width) - 1
    NT, KT = plan.width[k] // 8, plan.width[k - 1] // 8
    c = []
    for c0 in range(0, NT, CH):
        ch = min(CH, NT - c0)
        c += [f"{{ KEEP_ORDER; T zc[{ch}][4];",
              f"#pragma unroll\nfor (int n = 0; n < {ch}; ++n) zc[n][0] = zc[n][1] = zc[n][2] = zc[n][3] = 0.f;"]  # fmt: skip
        c += _product(src, KT, plan.off[f"B{k}"], "zc", str(c0), str(c0 + ch), NT)
        c += [f"#pragma unroll\nfor (int n = 0; n < {ch}; ++n)\n#pragma unroll\nfor (int e = 0; e < 4; ++e) {{",
              f"  const int pos = 8 * ({c0} + n) + 2 * t + (e & 1);",
              f"  const int j = __float_as_int(P[{plan.off['col']} + pos]);",
              f"  T z = zc[n][e] + P[{plan.off[f'b{k}']} + pos];",
              f"  T y, d; {_act_code(plan.acts[k])}",
              f"  const T it = P[{plan.off[f'i{k}']} + pos];",
              "  y *= it;"]  # fmt: skip
        if plan.res[k]:
            c.append(f"  y += {src}[({c0} + n) % {KT}][e];")
        c.append("  const bool up = e < 2;")
        if direct:  # row r0 or r1 of G / gG, its table row and w
            c += ["  const bool ok = j >= 0 && (up ? in0 : in1);",
                  "  const long long pr = up ? r0 : r1;",
                  "  const T tv = ok ? table[(long long)(up ? rp0 : rp1) * M + j] : 0.f, wr = up ? wp0 : wp1;"]  # fmt: skip
        if not bwd and direct:
            c += ["  if (ok) G[pr * M + j] = y * (tv * wr) + y;  /* as strip_gate.cu: Gs (T w) + Gs */", "}"]
        elif not bwd:
            c += ["  if (j >= 0) tile[(up ? g : g + 8) * LDT + j] = y;", "}"]
        else:
            if direct:
                c += ["  T gin = 0.f;",
                      "  if (ok) {",
                      "    const T g_ = gG[pr * M + j];",
                      "    gin = g_ * (tv * wr + 1.f);",
                      "    if (has_w) { if (up) gwa0 += g_ * tv * y; else gwa1 += g_ * tv * y; }",
                      "  }"]  # fmt: skip
            else:
                c += ["  T gin = 0.f;",
                      "  if (j >= 0) {",
                      "    const int q = (up ? g : g + 8) * LDT + j;",
                      "    gin = tile[q];",
                      "    if (has_w) { if (up) gwa0 += tile2[q] * y; else gwa1 += tile2[q] * y; }",
                      "  }"]  # fmt: skip
            c.append("  zc[n][e] = gin * d * it;")
            if plan.res[k]:
                c.append(f"  dh[({c0} + n) % {KT}][e] += gin;")
            c.append("}")
            # dh += dz W^T: the chunk's tiles are k tiles of W^T (KT n tiles each)
            c += [f"#pragma unroll\nfor (int q = 0; q < {ch}; ++q) {{",
                  "  const unsigned a0 = tf32(zc[q][0]), a1 = tf32(zc[q][2]), a2 = tf32(zc[q][1]), a3 = tf32(zc[q][3]);",
                  f"  #pragma unroll\n  for (int n = 0; n < {KT}; ++n) {{",
                  f"    const float2 b = PB[({plan.off[f'BT{k}']} >> 1) + (({c0} + q) * {KT} + n) * 32 + lane];",
                  "    tmma(dh[n], a0, a1, a2, a3, b.x, b.y);",
                  "  }", "}"]  # fmt: skip
        c.append("}")
    return c


def _hidden_back(plan: Plan) -> list:
    """dh (dL/d outputs of layer last - 1) down to dh of layer 0, then ds = dL/ds per row, summed over the lanes."""
    c, cur = [], "dh"
    for k in range(len(plan.width) - 2, 0, -1):
        nt, kt = plan.width[k] // 8, plan.width[k - 1] // 8
        nxt = f"dg{k - 1}"
        c += [f"T {nxt}[{kt}][4];",
              f"#pragma unroll\nfor (int n = 0; n < {kt}; ++n) {nxt}[n][0] = {nxt}[n][1] = {nxt}[n][2] = {nxt}[n][3] = 0.f;"]  # fmt: skip
        if plan.res[k]:
            c.append(f"#pragma unroll\nfor (int n = 0; n < {nt}; ++n)\n#pragma unroll\nfor (int e = 0; e < 4; ++e) "
                     f"{nxt}[n % {kt}][e] += {cur}[n][e];")  # fmt: skip
        c.append(f"#pragma unroll\nfor (int n = 0; n < {nt}; ++n)\n#pragma unroll\nfor (int e = 0; e < 4; ++e) "
                 f"{cur}[n][e] *= dD{k}[n][e];")  # fmt: skip
        c += _product(cur, nt, plan.off[f"BT{k}"], nxt, "0", str(kt), kt)
        cur = nxt
    nt0 = plan.width[0] // 8
    c += ["T ds0 = 0.f, ds1 = 0.f;",
          f"#pragma unroll\nfor (int n = 0; n < {nt0}; ++n)\n#pragma unroll\nfor (int e = 0; e < 4; ++e) {{",
          f"  T v = {cur}[n][e] * dD0[n][e] * P[{plan.off['w0']} + 8 * n + 2 * t + (e & 1)];"]  # fmt: skip
    if plan.res[0]:
        c.append(f"  v += {cur}[n][e];")
    c += ["  if (e < 2) ds0 += v; else ds1 += v;", "}"]
    return c


def source(plan: Plan, bwd_minb: int = BWD_MINB, direct: bool = DIRECT, fwd_ch: int = FWD_CH) -> str:
    """CUDA source of snet_tc_fwd and snet_tc_bwd for ``plan``'s net (FP32, TF32 products); ``bwd_minb``: the
    backward's blocks per SM for the register bound (0: none); ``direct``: _last_chunks' (no tiles); ``fwd_ch``: the
    forward's n tiles per chunk (4: 128 registers, no spills; the backward's 2: 4 spills more)."""
    hid_f, src = _hidden(plan, False)
    hid_b, src_b = _hidden(plan, True)
    kl = len(plan.width) - 1
    nl = "\n"
    head = """
    extern __shared__ __align__(16) float P[];
    for (int q = threadIdx.x; q < NV; q += blockDim.x) P[q] = prm[q];
    __syncthreads();
    const float2* __restrict__ PB = reinterpret_cast<const float2*>(prm);  /* B fragments: L1 / L2 */
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, wid = threadIdx.x >> 5;
    float* tile = P + NV + wid * (NTILE * 16 * LDT);
    float* tile2 = tile + 16 * LDT;
    for (long long p0 = ((long long)blockIdx.x * WPB + wid) * 16; p0 < slots; p0 += (long long)gridDim.x * WPB * 16) {
        const long long r0 = p0 + g, r1 = r0 + 8;
        const bool in0 = r0 < slots, in1 = r1 < slots;
        const T s0 = in0 ? Rn[4 * r0] : 0.f, s1 = in1 ? Rn[4 * r1] : 0.f;
        const int rp0 = in0 ? row[r0] : 0, rp1 = in1 ? row[r1] : 0;
        const T wp0 = (in0 && has_w) ? w[r0] : 1.f, wp1 = (in1 && has_w) ? w[r1] : 1.f;"""
    # the warp's 16 rows of G / gG move through its tile as whole rows: row r's table row and w from lane 4 (r % 8)
    rows = """for (int r = 0; r < 16; ++r) {
            const long long pr = p0 + r;
            const int rr = __shfl_sync(0xffffffffu, r < 8 ? rp0 : rp1, 4 * (r & 7));
            const T wr = __shfl_sync(0xffffffffu, r < 8 ? wp0 : wp1, 4 * (r & 7));
            const T* tr = table + (long long)rr * M;
            for (int j = lane; j < M; j += 32) {"""
    store = f"""__syncwarp();
        {rows}
                const T gs_ = tile[r * LDT + j];
                if (pr < slots) G[pr * M + j] = gs_ * (tr[j] * wr) + gs_;  /* as strip_gate.cu: Gs (T w) + Gs */
            }}
        }}
        __syncwarp();"""
    load = f"""__syncwarp();
        {rows}
                const T gg = pr < slots ? gG[pr * M + j] : 0.f, tv = tr[j];
                tile[r * LDT + j] = gg * (tv * wr + 1.f);
                if (has_w) tile2[r * LDT + j] = gg * tv;
            }}
        }}
        __syncwarp();"""
    return f"""
typedef float T;
{TANH_F32}
#define EXP expf
#define LOG logf
#define M {plan.M}
#define WPB {WPB}
#define NV {plan.n_vec}
#define LDT {plan.M + 1 - plan.M % 2}  /* the tiles' row stride: odd, rows and columns hit distinct banks */
/* a compiler barrier per chunk of the last layer: without it the unrolled chunks' loads are hoisted (spills) */
#define KEEP_ORDER asm volatile("" ::: "memory")
#ifndef TMMA
__device__ __forceinline__ unsigned tf32(float x) {{
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;\\n" : "=r"(r) : "f"(x));
  return r;
}}
/* c (16 x 8) += a (16 x 8) b (8 x 8), FP32 accumulators */
__device__ __forceinline__ void tmma(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, float b0,
                                     float b1) {{
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {{%0, %1, %2, %3}}, {{%4, %5, %6, %7}}, {{%8, %9}}, "
      "{{%0, %1, %2, %3}};\\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(__float_as_uint(b0)), "r"(__float_as_uint(b1)));
}}
#endif

/* G (slots, M) = Gs (1 + table[row] w), Gs = net(Rn[p, 0]); Rn (slots, 4), row (slots), w (slots) if has_w */
extern "C" __global__ void __launch_bounds__(32 * WPB, 4) snet_tc_fwd(
    const T* __restrict__ Rn, const long long slots, const float* __restrict__ prm, const T* __restrict__ table,
    const int* __restrict__ row, const T* __restrict__ w, const int has_w, T* __restrict__ G)
{{
#define NTILE {0 if direct else 1}
{head}
        {nl.join(_first(plan, False))}
        {nl.join(hid_f)}
        {nl.join(_last_chunks(plan, src, False, direct, fwd_ch))}
        {"" if direct else store}
    }}
#undef NTILE
}}

/* gs (slots) = dL/dRn[p, 0] and, if has_w, gw (slots) = dL/dw from gG (slots, M) = dL/dG */
extern "C" __global__ void __launch_bounds__(32 * WPB{f", {bwd_minb}" if bwd_minb else ""}) snet_tc_bwd(
    const T* __restrict__ Rn, const long long slots, const float* __restrict__ prm, const T* __restrict__ table,
    const int* __restrict__ row, const T* __restrict__ w, const int has_w, const T* __restrict__ gG,
    T* __restrict__ gs, T* __restrict__ gw)
{{
#define NTILE {0 if direct else 2}
{head}
        {"" if direct else load}
        {nl.join(_first(plan, True))}
        {nl.join(hid_b)}
        T dh[{plan.width[kl - 1] // 8}][4];
        #pragma unroll
        for (int n = 0; n < {plan.width[kl - 1] // 8}; ++n) dh[n][0] = dh[n][1] = dh[n][2] = dh[n][3] = 0.f;
        T gwa0 = 0.f, gwa1 = 0.f;
        {nl.join(_last_chunks(plan, src_b, True, direct))}
        {nl.join(_hidden_back(plan))}
        ds0 += __shfl_xor_sync(0xffffffffu, ds0, 1); ds0 += __shfl_xor_sync(0xffffffffu, ds0, 2);
        ds1 += __shfl_xor_sync(0xffffffffu, ds1, 1); ds1 += __shfl_xor_sync(0xffffffffu, ds1, 2);
        gwa0 += __shfl_xor_sync(0xffffffffu, gwa0, 1); gwa0 += __shfl_xor_sync(0xffffffffu, gwa0, 2);
        gwa1 += __shfl_xor_sync(0xffffffffu, gwa1, 1); gwa1 += __shfl_xor_sync(0xffffffffu, gwa1, 2);
        if (t == 0 && in0) {{ gs[r0] = ds0; if (has_w) gw[r0] = gwa0; }}
        if (t == 0 && in1) {{ gs[r1] = ds1; if (has_w) gw[r1] = gwa1; }}
    }}
#undef NTILE
}}
"""


def smem_bytes(plan: Plan, direct: bool = DIRECT) -> tuple:
    """Dynamic shared memory of (forward, backward) in bytes: the vectors, then per warp one or two (16, LDT) tiles
    (none with ``direct``)."""
    ldt = plan.M + 1 - plan.M % 2
    return tuple(4 * (plan.n_vec + WPB * (0 if direct else k) * 16 * ldt) for k in (1, 2))


class StripNetTC(StripNet):
    """strip_net.StripNet's interface on the tensor-core kernels (FP32 arrays; settings.tf32 and strip_tc)."""

    def __init__(self, net, bwd_minb: int = BWD_MINB, direct: bool = DIRECT, fwd_ch: int = FWD_CH):
        self.plan = Plan(net)
        names = ("snet_tc_fwd", "snet_tc_bwd")
        src, smem = source(self.plan, bwd_minb, direct, fwd_ch), smem_bytes(self.plan, direct)
        self._load(src, names, smem, self.plan.params, "float32", self.plan.M, 32 * WPB, 16 * WPB)


def supported(net) -> str | None:
    """None if the kernels can run ``net``, else why not."""
    try:
        plan = Plan(net)
    except ValueError as exc:
        return str(exc)
    if max(smem_bytes(plan)) > 227 * 1024:
        return "parameters do not fit in shared memory"
    return None


def get(net) -> StripNetTC:
    """Compiled StripNetTC for ``net`` (cached on the net object)."""
    if getattr(net, "_strip_net_tc", None) is None:
        net._strip_net_tc = StripNetTC(net)
    return net._strip_net_tc
