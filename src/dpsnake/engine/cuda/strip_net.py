"""The geometric embedding net of se_atten / se_atten_v2 in strip mode and its type gate as two fused CUDA
kernels (CuPy RawModule, source generated per net like fused.py's):

- forward:  G = Gs (1 + T[row] w), Gs = net(Rn[..., 0]) (a 1-input net), written (slots, M);
- backward: from gG = dL/dG, dL/ds (s = Rn[..., 0]) and dL/dw = sum_j gG_j Gs_j T_j (with ``w``).

The array code (attn/descriptor.py) runs the net as cuBLAS GEMMs and fused tanh layers that keep every
layer's derivative (25 + 50 + 100 floats per slot for DeePMD-kit's [25, 50, 100]), then the gate kernels
(strip_gate.py), and back through both: about ten passes over (slots, M) arrays. Here a thread runs one
slot's net in registers from weights staged in shared memory (fused.py's layer code), nothing but G is
stored, and the backward recomputes the net (recompute rather than store). A warp's 32 slots go through a
(32, 33) shared tile per 32 columns, so that G and gG move as whole 128-byte rows; the gate is applied
there (the table read along rows). ``w``: sw times the mask where ``smooth_type_embedding``, else None
(w = 1): the gate then has no dL/dw.

Used where the nets are fused (``EngineSettings.fused``: "auto" FP32 nets, "on" FP64 too) and the net's
input is 1 wide (strip mode). H100, 256 x 108 CuNi, se_atten_v2 of DeePMD-kit's example size in mixed + TF32: a
force call 2.001 against 2.164 us/atom with the net through cuBLAS and the gate kernels; the kernels take 2.0 +
4.3 ms of its 52.8 ms (docs/benchmarks.md "Session 35"); session 39: FP32 tanh as 1 - 2 / (exp(2|x|) + 1), the
kernels 5.747 -> 5.456 ms over 27,648 x 88 slots (bench/profiling/strip_net_probe.py; 16% of a force call). Session
40 (H100, one call, 4.007 -> 2.940 ms backward, 1.530 -> 1.349 forward): tanh on ex2/rcp.approx, each lane gating its
own slot (no per-row shuffles), and ``PAIR`` (the forward on two slots per thread, half the weight reads). TF32
tensor cores (strip_net_tc.py) stay off: their best pair (1.090 + 2.691 ms) is 12% faster but moves G by 6.6e-4.
Tested without a GPU (tests/test_engine_strip_net.py:
g++ with threaded warps against nets.py + the gate's array code; NVRTC for sm_90) and on the GPU
(tests/test_engine_attn_gpu.py).
"""

from __future__ import annotations

import numpy as np

from dpsnake.engine.cuda import fused
from dpsnake.engine.cuda.fused import _LANES, _act_code, _dot_row, _Spec, hidden_chain

WPB = 4  # warps per block (a slot per thread)
SMEM_MAX = 227 * 1024  # dynamic shared memory per block (sm_80, sm_90)
PAIR = True  # the forward on two slots per thread (_columns_pair): 1.398 -> 1.349 ms (session 40, H100)
TP = 33  # row stride of a warp's tile (32 columns + 1: the row and column walks hit 32 banks)


def _last_layer(spec: _Spec) -> tuple:
    """The last layer's spec, the vector width, and its bias and idt at column j as expressions."""
    last = spec.layers[-1]
    bias = f"SW[{last['b']} + j]" if last["b"] is not None else "(T)0"
    idt = f"SW[{last['idt']} + j]" if last["idt"] is not None else "(T)1"
    return last, spec.vw, bias, idt


def _columns(spec: _Spec, bwd: bool) -> str:
    """The last layer, 32 columns at a time (chunk start jj static, the column loop not unrolled: one copy
    of its code), then the chunk's static pass: residual (htop[j % NIN], j static) and, backward, dL/dw's
    residual share. Each lane gates its own slot (table row tr = table[rp, jj:], w = wp), so the tile moves
    plain rows. Forward: the tile gets G = (Gs (+ residual)) (T w + 1). Backward: gG's rows come in, then the
    tile holds gin = dL/dGs = gG (T w + 1) (and GT = gG T with w), dh[NIN] += gin's backward through the
    layer."""
    last, vw, bias, idt = _last_layer(spec)
    M, nin, out = last["nout"], last["nin"], []
    for jj in range(0, M, 32):
        qn = min(32, M - jj)
        body = ["KEEP_ORDER;", f"const int j = {jj} + q;", f"T z = {bias};"]
        body += _dot_row(last, "j", "HTOP", "z", wname="w" if bwd else None, vw=vw)
        body += [f"T y, d; {_act_code(last['act'])}", f"const T it = {idt};", "y *= it;"]
        if not bwd:
            body.append("tile[lane * TP + q] = y;")
        else:
            body += ["const T gin = tile[lane * TP + q];", "if (has_w) gwa = FMA(GT[lane * TP + q], y, gwa);",
                     "const T dz = gin * d * it;"]  # fmt: skip
            for q4 in range(last["ninp"] // vw):
                for e in range(vw):
                    k = q4 * vw + e
                    if k < nin:
                        body.append(f"dh[{k}] = FMA(dz, w{q4}.{_LANES[e]}, dh[{k}]);")
        out.append(f"{{ const T* tr = table + (long long)rp * M + {jj};")
        if bwd:  # gG's rows in, then each lane gates its own row in place: gin = gG (T w + 1), GT = gG T
            out += ["__syncwarp();", _load_tile(jj), "__syncwarp();", "#pragma unroll 4",
                    f"for (int q = 0; q < {qn}; ++q) {{",
                    "  const T g = tile[lane * TP + q], tv = tr[q];",
                    "  tile[lane * TP + q] = g * FMA(tv, wp, (T)1);",
                    "  if (has_w) GT[lane * TP + q] = g * tv;", "}"]  # fmt: skip
        out += ["__syncwarp();", "#pragma unroll 1", f"for (int q = 0; q < {qn}; ++q) {{", *body, "}"]
        for q in range(qn):
            k = (jj + q) % nin
            if bwd and last["res"]:
                out.append(f"dh[{k}] += tile[lane * TP + {q}];")
                out.append(f"if (has_w) gwa = FMA(GT[lane * TP + {q}], HTOP[{k}], gwa);")
            elif not bwd:
                res = f" + HTOP[{k}]" if last["res"] else ""
                out.append(f"tile[lane * TP + {q}] = (tile[lane * TP + {q}]{res}) * FMA(tr[{q}], wp, (T)1);")
        if not bwd:
            out += ["__syncwarp();", _store_tile(jj)]
        out.append("}")
    return "\n".join(out)


def _columns_pair(spec: _Spec) -> str:
    """The forward's last layer for two slots per thread (``pair``: slot a = wb + lane in the tile's row lane, b =
    a + 32 in row lane + 32): each weight vector read from shared memory feeds both slots' dot products, half the
    shared-memory reads per FMA of _columns (whose broadcasts bound it)."""
    last, vw, bias, idt = _last_layer(spec)
    M, nin, out = last["nout"], last["nin"], []
    for jj in range(0, M, 32):
        qn = min(32, M - jj)
        body = ["KEEP_ORDER;", f"const int j = {jj} + q;", f"T za = {bias}, zb = za, za1_ = (T)0, zb1_ = (T)0;"]
        for q4 in range(last["ninp"] // vw):
            body.append(f"const V w_{q4} = *(const V*)(SW + {last['w']} + j * {last['ninp']} + {q4 * vw});")
            for e in range(vw):
                k = q4 * vw + e
                if k < nin:
                    sfx = "" if k % 2 == 0 else "1_"  # odd k: second accumulators (chains half as long)
                    body.append(f"za{sfx} = FMA(ha[{k}], w_{q4}.{_LANES[e]}, za{sfx});")
                    body.append(f"zb{sfx} = FMA(hb[{k}], w_{q4}.{_LANES[e]}, zb{sfx});")
        body += ["za += za1_; zb += zb1_;", f"const T it = {idt};"]
        for ab, r in (("a", "lane"), ("b", "lane + 32")):
            body.append(f"{{ const T z = z{ab}; T y, d; {_act_code(last['act'])} tile[({r}) * TP + q] = y * it; }}")
        out += ["__syncwarp();", "#pragma unroll 1", f"for (int q = 0; q < {qn}; ++q) {{", *body, "}"]
        for q in range(qn):
            k = (jj + q) % nin
            for x, r in (("a", "lane"), ("b", "lane + 32")):
                res = f" + h{x}[{k}]" if last["res"] else ""
                out.append(f"tile[({r}) * TP + {q}] = (tile[({r}) * TP + {q}]{res}) * "
                           f"FMA(table[(long long)rp{x} * M + {jj + q}], wp{x}, (T)1);")  # fmt: skip
        out += ["__syncwarp();", _store_tile(jj, pair=True)]
    return "\n".join(out)


def _store_tile(jj: int, pair: bool = False) -> str:
    """Forward: the warp's tile (G of its 32 slots, or 64 with ``pair``, columns jj..jj+31) stored as rows of G."""
    return f"""if ({jj} + lane < M) {{
  const int nr = (int)min((long long){64 if pair else 32}, slots - wb);
  T* gp = G + wb * M + {jj} + lane;
  for (int r = 0; r < nr; ++r) gp[r * M] = tile[r * TP + lane];
}}"""


def _load_tile(jj: int) -> str:
    """Backward: rows of gG (columns jj..jj+31) of the warp's slots into the tile (0 past the ends)."""
    return f"""{{
  const int nr = (int)min((long long)32, slots - wb);
  const bool cj = {jj} + lane < M;
  const T* gp = gG + wb * M + {jj} + lane;
  #pragma unroll 8
  for (int r = 0; r < 32; ++r) tile[r * TP + lane] = (cj && r < nr) ? gp[r * M] : (T)0;
}}"""


# FP32 tanh as 1 - 2 / (2^(2 log2(e) |x|) + 1) with the sign of x, on ex2.approx.ftz and rcp.approx.ftz (relative
# errors ~2^-22, 2^-23): 6 instructions (2 on the MUFU) against tanhf's ~16 (a polynomial below |x| 0.6 and exp +
# rcp above, both computed) and __expf / __fdividef's ~10 (their range checks: the argument here is >= 0 and the
# divisor >= 2, so none is needed); the nets' 175 tanh per slot were ~20% of the kernels' instructions. Absolute
# error <= ~3e-7 near 0 (ex2's relative error there; tanhf's error is relative). g++ (the emulator): expf and /.
TANH_F32 = r"""
__device__ __forceinline__ float tanh_f32(float x) {
#ifdef __CUDACC__
  float e, r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(2.8853900817779268f * fabsf(x)));
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(e + 1.f));
  return copysignf(fmaf(-2.f, r, 1.f), x);
#else
  return copysignf(1.f - 2.f / (expf(2.f * fabsf(x)) + 1.f), x);
#endif
}
#define TANH tanh_f32"""


def source(spec: _Spec, dtype: str, pair: bool = False) -> str:
    """CUDA source of strip_net_fwd and strip_net_bwd for the net of ``spec``; ``pair``: the forward runs two slots
    per thread (_columns_pair)."""
    T = "float" if dtype == "float32" else "double"
    f = "f" if T == "float" else ""
    V = "float4" if T == "float" else "double2"
    last = spec.layers[-1]
    M, NIN = last["nout"], last["nin"]
    hid_f, htop, hid_b, closes, x0grad = hidden_chain(spec)
    nl_ = "\n"
    minb = 3 if dtype == "float32" else 0  # as fused.py's backward: 168 registers for 3 blocks of 128 per SM
    # per thread: its slot p = wb + lane (wb: the warp's first slot), its table row rp and gate weight wp
    stage = """
    extern __shared__ __align__(16) unsigned char smem_[];
    T* SW = (T*)smem_;
    for (int q = threadIdx.x; q < NWS; q += blockDim.x) SW[q] = Wg[q];
    __syncthreads();
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;"""
    slot = f"""const bool in = p < slots;
        const int rp = in ? row[p] : 0;
        const T wp = (in && has_w) ? w[p] : (T)1;
        T h0[1]; h0[0] = in ? Rn[4 * p] : (T)0;
        {nl_.join(hid_f)}"""
    head = f"""{stage}
    T* tile = SW + NWS + wid * (32 * TP);
    for (long long wb = ((long long)blockIdx.x * WPB + wid) * 32; wb < slots; wb += (long long)gridDim.x * WPB * 32) {{
        const long long p = wb + lane;
        {slot}"""
    fwd_body = f"""{head}
        {_columns(spec, False)}"""
    if pair:  # slot a's and b's hidden layers one after the other (their outputs kept in ha, hb), then the last layer
        a, b = (f"""{{ const long long p = wb + {off}lane;
            {slot}
            #pragma unroll
            for (int k = 0; k < NIN; ++k) h{x}[k] = HTOP[k];
            rp{x} = rp; wp{x} = wp; }}""" for x, off in (("a", ""), ("b", "32 + ")))  # fmt: skip
        fwd_body = f"""{stage}
    T* tile = SW + NWS + wid * (64 * TP);
    for (long long wb = ((long long)blockIdx.x * WPB + wid) * 64; wb < slots; wb += (long long)gridDim.x * WPB * 64) {{
        T ha[NIN], hb[NIN], wpa, wpb;
        int rpa, rpb;
        {a}
        __syncwarp();  /* keeps ptxas from interleaving a's and b's hidden layers: 255 registers and spills, else 168 */
        {b}
        const int rp = rpa; const T wp = wpa;
        {_columns_pair(spec)}"""
    return f"""
typedef {T} T;
typedef {V} V;
{TANH_F32 if T == "float" else "#define TANH tanh"}
#define EXP exp{f}
#define LOG log{f}
#define FMA fma{f}
#define M {M}
#define NIN {NIN}
#define NWS {spec.nw}
#define WPB {WPB}
#define TP {TP}
#define HTOP {htop}
/* a compiler barrier per output column (fused.py: without it the weight loads of many columns are hoisted) */
#define KEEP_ORDER asm volatile("" ::: "memory")

/* G (slots, M) = Gs (1 + table[row] w), Gs = net(Rn[p, 0]); Rn (slots, 4), row (slots) int, w (slots) if has_w */
extern "C" __global__ void __launch_bounds__(32 * WPB) strip_net_fwd(
    const T* __restrict__ Rn, const long long slots, const T* __restrict__ Wg, const T* __restrict__ table,
    const int* __restrict__ row, const T* __restrict__ w, const int has_w, T* __restrict__ G)
{{{fwd_body}
    }}
}}

/* gs (slots) = dL/dRn[p, 0] and, if has_w, gw (slots) = dL/dw from gG (slots, M) = dL/dG */
extern "C" __global__ void __launch_bounds__(32 * WPB{f", {minb}" if minb else ""}) strip_net_bwd(
    const T* __restrict__ Rn, const long long slots, const T* __restrict__ Wg, const T* __restrict__ table,
    const int* __restrict__ row, const T* __restrict__ w, const int has_w, const T* __restrict__ gG,
    T* __restrict__ gs, T* __restrict__ gw)
{{{head}
        T dh[NIN], gwa = (T)0;
        #pragma unroll
        for (int k = 0; k < NIN; ++k) dh[k] = (T)0;
        T* GT = SW + NWS + (WPB + wid) * (32 * TP);
        {_columns(spec, True)}
        {{
            {nl_.join(hid_b)}
            if (in) gs[p] = {x0grad};
            {closes}
        }}
        if (in && has_w) gw[p] = gwa;
    }}
}}
"""


def smem_bytes(spec: _Spec, itemsize: int, pair: bool = False) -> tuple:
    """Dynamic shared memory of (forward, backward) in bytes: the weights, then per warp a tile (of 32 rows, 64
    with ``pair``) or, backward, two."""
    return (spec.nw + WPB * (64 if pair else 32) * TP) * itemsize, (spec.nw + 2 * WPB * 32 * TP) * itemsize


def supported(net, dtype: str) -> str | None:
    """None if the kernels can run ``net`` in ``dtype``, else why not."""
    why = fused.supported(net)
    spec = _Spec(net, 4 if dtype == "float32" else 2)
    if why is None and max(smem_bytes(spec, np.dtype(dtype).itemsize, pair=True)) > SMEM_MAX:  # pair: the most
        why = "weights and tiles do not fit in shared memory"
    return why


class StripNet:
    """A strip-mode geometric net and its type gate as two CUDA kernels (the module doc); strip_net_tc.StripNetTC
    runs its tensor-core kernels through the same launches."""

    def __init__(self, net, dtype: str, pair: bool = PAIR):
        why = supported(net, dtype)
        if why:
            raise ValueError(why)
        spec, isz = _Spec(net, 4 if dtype == "float32" else 2), np.dtype(dtype).itemsize
        self._load(source(spec, dtype, pair), ("strip_net_fwd", "strip_net_bwd"), smem_bytes(spec, isz, pair),
                   spec.pack(net), dtype, spec.sizes[-1], 32 * WPB, 32 * WPB)  # fmt: skip

    def _load(self, src, names, smem, params, dtype, M, threads, per_block):
        """Compile ``src``'s kernels ``names`` (forward, backward) with dynamic shared memory ``smem`` (bytes of
        each); ``params`` (host) the kernels' parameter array; ``per_block`` slots per block and round."""
        import cupy

        self.dtype, self.M, self.threads, self.per_block = np.dtype(dtype), int(M), int(threads), int(per_block)
        mod = cupy.RawModule(code=src, options=("-std=c++14",))
        self.fwd, self.bwd = (mod.get_function(k) for k in names)
        self.smem = smem
        for k, nbytes in zip((self.fwd, self.bwd), self.smem):
            if nbytes > 48 * 1024:
                k.max_dynamic_shared_size_bytes = nbytes
        self.w = cupy.asarray(np.asarray(params).astype(self.dtype))
        self.nsm = cupy.cuda.Device().attributes["MultiProcessorCount"]

    def _args(self, Rn, table, row, w):
        import cupy

        slots = Rn.size // 4
        grid = max(1, min(-(-slots // self.per_block), self.nsm * 16))
        wa = Rn if w is None else cupy.ascontiguousarray(w, dtype=self.dtype)
        args = (cupy.ascontiguousarray(Rn), np.int64(slots), self.w, cupy.ascontiguousarray(table, dtype=self.dtype),
                cupy.ascontiguousarray(row, dtype=np.int32), wa, np.int32(w is not None))  # fmt: skip
        return slots, grid, args

    def forward(self, Rn, table, row, w):
        """G (..., M) from Rn (..., 4) (its channel 0 the net's input), table (rows, M), row (...) int,
        w (...) or None (1)."""
        import cupy

        slots, grid, args = self._args(Rn, table, row, w)
        G = cupy.empty((*Rn.shape[:-1], self.M), dtype=self.dtype)
        if slots:
            self.fwd((grid,), (self.threads,), args + (G,), shared_mem=self.smem[0])
        return G

    def backward(self, Rn, gG, table, row, w):
        """(dL/dRn[..., 0] (...), dL/dw (...) or None without ``w``) from gG = dL/dG (..., M), the rest as
        :meth:`forward` takes them."""
        import cupy

        slots, grid, args = self._args(Rn, table, row, w)
        gs = cupy.empty(Rn.shape[:-1], dtype=self.dtype)
        gw = cupy.empty(Rn.shape[:-1], dtype=self.dtype) if w is not None else gs
        if slots:
            gG = cupy.ascontiguousarray(gG, dtype=self.dtype)
            self.bwd((grid,), (self.threads,), args + (gG, gs, gw), shared_mem=self.smem[1])
        return gs, (gw if w is not None else None)


def get_strip_net(net, dtype: str) -> StripNet:
    """Compiled StripNet for ``net`` (cached on the net object, per dtype)."""
    cache = getattr(net, "_strip_net", None)
    if cache is None:
        cache = net._strip_net = {}
    if dtype not in cache:
        cache[dtype] = StripNet(net, dtype)
    return cache[dtype]
