"""Fused embedding-net kernels (CUDA, via CuPy RawModule) for the se_e2_a descriptor.

The embedding matrix G (one M-vector per neighbour slot) and its derivatives are never written to
memory: each thread computes the embedding of one slot in registers, from weights staged once per
block in shared memory (rows of W^T read as float4 / double2 broadcasts), and

- forward: gr[i, c, j] += sum over slots s of Rn[i, s, c] * G(Rn[i, s, 0])[j]; the sum over the
  slots of a warp is a reduce-scatter (31 shuffles for 8 columns x 4 channels), then one shared
  atomic per lane; the residual part of the last layer (concat(x, x)) is summed once per input column.
- backward: given dL/dgr (n, 4, M), gRn[i, s, c] = dL/dRn[i, s, c], recomputing the forward pass
  (twice through the hidden layers: once for the last layer's input, once with derivatives) rather
  than storing it (CabanaMD's "recompute rather than store").

One block per centre atom (grid-stride, so each block stages the weights once). Generated per
network shape and dtype; the layer math is nets.py's (act, idt, resnet). The array code (cuBLAS
GEMMs + elementwise kernels) is the reference these kernels are tested against.

STATUS: on by default for FP32 nets (mixed precision; EngineSettings.fused: "auto" default, "on"
also FP64, "off" off). Checked in CI without a GPU: the generated source compiles for sm_90 with NVRTC
(tests/test_engine_cuda_compile.py; ptxas: forward 111 registers, no spills; backward 255
registers, 56 bytes of spills in FP32), and the same source, compiled with g++ and run with real
32-lane warps of std::threads, matches nets.py to 1e-12 (FP64) / 2e-5 (FP32)
(tests/test_engine_fused.py); on a GPU they agree with NumPy and are faster than cuBLAS for FP32 nets
but slower for FP64 ones (the backward's 255 registers leave 8 warps per SM), so FP64 keeps cuBLAS
(timings: docs/benchmarks.md, History).
"""

from __future__ import annotations

import math

import numpy as np

_ACT = {
    # name: CUDA body computing y (value) and d (derivative) from z
    "tanh": "y = TANH(z); d = (T)1 - y * y;",
    "none": "y = z; d = (T)1;",
    "linear": "y = z; d = (T)1;",
    "relu": "y = z > (T)0 ? z : (T)0; d = z > (T)0 ? (T)1 : (T)0;",
    "relu6": "y = z < (T)0 ? (T)0 : (z > (T)6 ? (T)6 : z); d = (z > (T)0 && z < (T)6) ? (T)1 : (T)0;",
    "softplus": "{ T e = EXP(-fabs(z)); y = z > (T)0 ? z + LOG((T)1 + e) : LOG((T)1 + e);"
    " d = (T)1 / ((T)1 + EXP(-z)); }",
    "sigmoid": "{ T s = (T)1 / ((T)1 + EXP(-z)); y = s; d = s * ((T)1 - s); }",
    "gelu": "{ const T c = (T)0.7978845608028654; T t = TANH(c * (z + (T)0.044715 * z * z * z));"
    " y = (T)0.5 * z * ((T)1 + t);"
    " d = (T)0.5 * ((T)1 + t) + (T)0.5 * z * ((T)1 - t * t) * c * ((T)1 + (T)3 * (T)0.044715 * z * z); }",
    "silu": "{ T s = (T)1 / ((T)1 + EXP(-z)); y = z * s; d = s * ((T)1 + z * ((T)1 - s)); }",
}
_ACT["gelu_tf"] = _ACT["gelu"]


def _act_code(name: str) -> str:
    name = name.lower()
    if name in _ACT:
        return _ACT[name]
    if name.startswith(("silut", "custom_silu")):
        thr = float(name.split(":")[-1]) if ":" in name else 3.0
        sg = 1 / (1 + math.exp(-thr))
        slope, const = float(sg + thr * sg * (1 - sg)), float(thr * sg)
        return (
            f"{{ T s = (T)1 / ((T)1 + EXP(-z)); if (z < (T){thr!r}) {{ y = z * s; d = s * ((T)1 + z * ((T)1 - s)); }}"
            f" else {{ T t = TANH((T){slope!r} * (z - (T){thr!r})); y = t + (T){const!r};"
            f" d = (T){slope!r} * ((T)1 - t * t); }} }}"
        )
    raise ValueError(f"no fused kernel for activation {name!r}")


class _Spec:
    """Layer sizes and offsets of the packed weights: per layer W^T (nout rows of nin padded to the
    vector width), bias, idt, each aligned to the vector width."""

    def __init__(self, net, vw: int):
        self.vw = vw
        self.sizes = [net.layers[0].nin] + [l.nout for l in net.layers]
        self.layers = []
        off = 0

        def take(k):
            nonlocal off
            o = off
            off += -(-k // vw) * vw
            return o

        for l in net.layers:
            ninp = -(-l.nin // vw) * vw
            d = {"nin": l.nin, "nout": l.nout, "ninp": ninp, "act": l.activation.lower()}
            d["w"] = take(l.nout * ninp)
            d["b"] = take(l.nout) if l.b is not None else None
            d["idt"] = take(l.nout) if l.idt is not None else None
            d["res"] = 1 if (l.resnet and l.nout == l.nin) else (2 if (l.resnet and l.nout == 2 * l.nin) else 0)
            self.layers.append(d)
        self.nw = off

    def pack(self, net) -> np.ndarray:
        out = np.zeros(self.nw)
        for l, d in zip(net.layers, self.layers):
            wt = np.zeros((d["nout"], d["ninp"]))
            wt[:, : d["nin"]] = np.asarray(l.w, dtype=np.float64).T
            out[d["w"] : d["w"] + wt.size] = wt.reshape(-1)
            if d["b"] is not None:
                out[d["b"] : d["b"] + d["nout"]] = np.asarray(l.b, dtype=np.float64).reshape(-1)
            if d["idt"] is not None:
                out[d["idt"] : d["idt"] + d["nout"]] = np.asarray(l.idt, dtype=np.float64).reshape(-1)
        return out


_LANES = "xyzw"


def _dot_row(L, row: str, src: str, z: str, wname: str | None = None, vw: int = 4) -> list:
    """Code for z += sum_k src[k] * W^T[row][k] with vector loads (k static); the loaded vectors are
    named wname0, wname1, ... (for reuse by the caller) when wname is given. Odd k go to a second
    accumulator so that the chain of dependent FMAs is half as long. Call sites are per-column
    scopes, so the names declared here are local to one column."""
    c = [f"T {z}1_ = (T)0;"]
    for q in range(L["ninp"] // vw):
        w = f"{wname or 'w_'}{q}"
        c.append(f"const V {w} = *(const V*)(SW + {L['w']} + ({row}) * {L['ninp']} + {q * vw});")
        for e in range(vw):
            k = q * vw + e
            if k < L["nin"]:
                acc = z if k % 2 == 0 else f"{z}1_"
                c.append(f"{acc} = FMA({src}[{k}], {w}.{_LANES[e]}, {acc});")
    c.append(f"{z} += {z}1_;")
    return c


def _hidden(L, ell: int, src: str, dst: str, deriv: bool, vw: int) -> str:
    """Hidden layer ``ell``: src[nin] -> dst[nout] (and dD{ell}[nout] = act'(z) idt)."""
    c = [f"T {dst}[{L['nout']}];"] + ([f"T dD{ell}[{L['nout']}];"] if deriv else [])
    c += [
        "#pragma unroll",
        f"for (int j = 0; j < {L['nout']}; ++j) {{",
        "  KEEP_ORDER;",
        f"  T z = {'SW[%d + j]' % L['b'] if L['b'] is not None else '(T)0'};",  # noqa: UP031
    ]
    c += ["  " + x for x in _dot_row(L, "j", src, "z", vw=vw)]
    c.append(f"  T y, d; {_act_code(L['act'])}")
    if L["idt"] is not None:
        c.append(f"  y *= SW[{L['idt']} + j]; d *= SW[{L['idt']} + j];")
    if L["res"]:
        c.append(f"  y += {src}[j % {L['nin']}];")
    if deriv:
        c.append(f"  dD{ell}[j] = d;")
    c += [f"  {dst}[j] = y;", "}"]
    return "\n".join(c)


def _layer_back(L, ell: int, src: str, dsrc: str, ddst: str, vw: int) -> str:
    """Backward of hidden layer ``ell`` column by column, recomputing z_j from its input src[nin]:
    dsrc[nout] = dL/dy -> ddst[nin] = dL/dx. Each W^T row is loaded once for z_j and dx."""
    nin, nout = L["nin"], L["nout"]
    c = [
        f"T {ddst}[{nin}];",
        "#pragma unroll",
        f"for (int k = 0; k < {nin}; ++k) {ddst}[k] = (T)0;",
        "#pragma unroll",
        f"for (int j = 0; j < {nout}; ++j) {{",
        "  KEEP_ORDER;",
        f"  T z = {'SW[%d + j]' % L['b'] if L['b'] is not None else '(T)0'};",  # noqa: UP031
    ]
    c += ["  " + x for x in _dot_row(L, "j", src, "z", wname=f"u{ell}_", vw=vw)]
    c.append(f"  T y, d; {_act_code(L['act'])}")
    if L["idt"] is not None:
        c.append(f"  d *= SW[{L['idt']} + j];")
    c.append(f"  const T dz = {dsrc}[j] * d;")
    for q in range(L["ninp"] // vw):
        for e in range(vw):
            k = q * vw + e
            if k < nin:
                c.append(f"  {ddst}[{k}] = FMA(dz, u{ell}_{q}.{_LANES[e]}, {ddst}[{k}]);")
    if L["res"]:
        c.append(f"  {ddst}[j % {nin}] += {dsrc}[j];")
    c.append("}")
    return "\n".join(c)


def _reduce_scatter(v: str = "v") -> str:
    """v[0..31] per lane -> v[0] on lane l = sum over the warp of v[l]."""
    c = []
    for off in (16, 8, 4, 2, 1):
        c.append(f"{{ const bool up = (lane & {off}) != 0;")
        for k in range(off):
            c.append(
                f"  {{ const T s_ = up ? {v}[{k}] : {v}[{k + off}]; const T k_ = up ? {v}[{k + off}] : {v}[{k}];"
                f" {v}[{k}] = k_ + __shfl_xor_sync(0xffffffffu, s_, {off}); }}"
            )
        c.append("}")
    return "\n".join(c)


def hidden_chain(spec: _Spec) -> tuple:
    """Code of the hidden layers (all but the last) of a 1-input net, per thread in registers:
    (forward: h0[1] -> htop[NIN], as a list of blocks; htop's name; backward: dh[NIN] = dL/dhtop -> dL/dh0,
    recomputing each layer's input from h0, as blocks opened with "{ " that ``closes`` closes; the
    expression of dL/dh0). Shared by fused.py's kernels and strip_net.py's."""
    L, vw = spec.layers, spec.vw
    nl = len(L)
    hid_f, src = [], "h0"
    for ell in range(nl - 1):
        hid_f.append(_hidden(L[ell], ell, src, f"h{ell + 1}", False, vw))
        src = f"h{ell + 1}"
    htop = src
    hid_b, dsrc = [], "dh"
    for ell in range(nl - 2, -1, -1):
        fw, src = [], "h0"
        for e2 in range(ell):
            fw.append(_hidden(L[e2], e2, src, f"q{ell}_{e2 + 1}", False, vw))
            src = f"q{ell}_{e2 + 1}"
        hid_b.append("{ " + "\n".join(fw) + "\n" + _layer_back(L[ell], ell, src, dsrc, f"dx{ell}", vw))
        dsrc = f"dx{ell}"
    x0grad = f"{dsrc}[0]" if nl > 1 else "dh[0]"
    return hid_f, htop, hid_b, "}" * (nl - 1), x0grad


def _source(spec: _Spec, dtype: str, minb: int | None = None) -> str:
    """CUDA source of both kernels; ``minb``: EngineSettings.fused_bwd_minb."""
    T = "float" if dtype == "float32" else "double"
    f = "f" if T == "float" else ""
    vw = spec.vw
    V = "float4" if T == "float" else "double2"
    L = spec.layers
    last = L[-1]
    M, NIN = last["nout"], last["nin"]
    hid_f, htop, hid_b, closes, x0grad = hidden_chain(spec)
    bias = f"SW[{last['b']} + j]" if last["b"] is not None else "(T)0"
    idt = f"SW[{last['idt']} + j]" if last["idt"] is not None else "(T)1"
    # forward: the last layer in groups of 8 columns, reduce-scattered over the warp
    col = [
        "T v[32];",
        "#pragma unroll",
        "for (int q = 0; q < 8; ++q) {",
        "  const int j = jj + q;",
        "  T y = (T)0;",
        f"  if ({'true' if M % 8 == 0 else 'j < M'}) {{",
        f"    T z = {bias};",
    ]
    col += ["    " + x for x in _dot_row(last, "j", htop, "z", vw=vw)]
    col += [
        f"    T d; {_act_code(last['act'])}",
        f"    y *= {idt};",
        "  }",
        "  v[4 * q] = r0 * y; v[4 * q + 1] = r1 * y; v[4 * q + 2] = r2 * y; v[4 * q + 3] = r3 * y;",
        "}",
        _reduce_scatter(),
        "if (jj + (lane >> 2) < M) atomicAdd(&GS[(lane & 3) * M + jj + (lane >> 2)], v[0]);",
    ]
    res_f = []
    if last["res"]:
        for k0 in range(0, NIN, 8):
            res_f.append("{ T v[32];")
            for q in range(8):
                k = k0 + q
                for c in range(4):
                    res_f.append(f"v[{4 * q + c}] = {'r%d * %s[%d]' % (c, htop, k) if k < NIN else '(T)0'};")  # noqa: UP031
            res_f.append(_reduce_scatter())
            res_f.append(
                f"if ({k0} + (lane >> 2) < NIN) atomicAdd(&GR[(lane & 3) * NIN + {k0} + (lane >> 2)], v[0]); }}"
            )
    # backward: last layer column by column, dh accumulated in registers
    nq = last["ninp"] // vw
    bwd_col = ["KEEP_ORDER;", f"T z = {bias};"] + _dot_row(last, "j", htop, "z", wname="w", vw=vw)
    bwd_col += [f"T y, d; {_act_code(last['act'])}", f"const T it = {idt};", "y *= it;"]
    if T == "float":
        bwd_col += ["const float4 g = *(const float4*)(GG + 4 * j);", "const T g0 = g.x, g1 = g.y, g2 = g.z, g3 = g.w;"]
    else:
        bwd_col += [
            "const double2 ga = *(const double2*)(GG + 4 * j), gb = *(const double2*)(GG + 4 * j + 2);",
            "const T g0 = ga.x, g1 = ga.y, g2 = gb.x, g3 = gb.y;",
        ]
    bwd_col += [
        "const T dG = r0 * g0 + r1 * g1 + r2 * g2 + r3 * g3;",
        "dr0 = FMA(y, g0, dr0); dr1 = FMA(y, g1, dr1); dr2 = FMA(y, g2, dr2); dr3 = FMA(y, g3, dr3);",
        "const T dz = dG * d * it;",
    ]
    for q in range(nq):
        for e in range(vw):
            k = q * vw + e
            if k < NIN:
                bwd_col.append(f"dh[{k}] = FMA(dz, w{q}.{_LANES[e]}, dh[{k}]);")
    res_b = []
    if last["res"]:
        res_b = [
            "#pragma unroll",
            "for (int k = 0; k < NIN; ++k) {",
            "  const T f0 = FD[4 * k], f1 = FD[4 * k + 1], f2 = FD[4 * k + 2], f3 = FD[4 * k + 3];",
            "  dh[k] += r0 * f0 + r1 * f1 + r2 * f2 + r3 * f3;",
            f"  dr0 = FMA({htop}[k], f0, dr0); dr1 = FMA({htop}[k], f1, dr1);"
            f" dr2 = FMA({htop}[k], f2, dr2); dr3 = FMA({htop}[k], f3, dr3);",
            "}",
        ]
    fold = (
        "T s_ = (T)0; for (int r = 0; r < M / NIN; ++r) s_ += ggr[(i * 4 + c) * M + r * NIN + k]; FD[4 * k + c] = s_;"
        if last["res"]
        else ""
    )
    nl_ = "\n"
    # minb: blocks per SM the backward is compiled for (caps its registers); 0: no bound.
    # FP32 default 3: 168 registers, 48 B of spills, 4 blocks of 96 threads per SM instead of 3;
    # 3 was the fastest (4: 128 registers, 440 B spills, twice as slow; docs/benchmarks.md history).
    # FP64: the compiler's choice (it spills at 255 already).
    if minb is None:
        minb = 3 if dtype == "float32" else 0
    bwd_minb = f", {int(minb)}" if minb else ""
    return f"""
typedef {T} T;
typedef {V} V;
#define TANH tanh{f}
#define EXP exp{f}
#define LOG log{f}
#define FMA fma{f}
#define M {M}
#define NIN {NIN}
#define NWS {spec.nw}
/* a compiler barrier per output column: without it the unrolled loops hoist the shared-memory
   weight loads of many columns at once and spill registers (ptxas -v: KBs of stack) */
#define KEEP_ORDER asm volatile("" ::: "memory")

extern "C" __global__ void __launch_bounds__(256) emb_fwd(
    const T* __restrict__ Rn, const long long n, const int nc, const int a, const int b,
    const T* __restrict__ Wg, T* __restrict__ gr)
{{
    extern __shared__ __align__(16) unsigned char smem_[];
    T* SW = (T*)smem_;
    T* GS = SW + NWS;
    T* GR = GS + 4 * M;
    for (int q = threadIdx.x; q < NWS; q += blockDim.x) SW[q] = Wg[q];
    const int lane = threadIdx.x & 31;
    for (long long i = blockIdx.x; i < n; i += gridDim.x) {{
        __syncthreads();
        for (int q = threadIdx.x; q < 4 * (M + NIN); q += blockDim.x) GS[q] = (T)0;
        __syncthreads();
        for (int base = a; base < b; base += blockDim.x) {{
            if (base + (int)(threadIdx.x & ~31u) >= b) continue;  /* whole warp past the block */
            const int s = base + threadIdx.x;
            T r0 = (T)0, r1 = (T)0, r2 = (T)0, r3 = (T)0;
            if (s < b) {{
                const T* p = Rn + (i * nc + s) * 4;
                r0 = p[0]; r1 = p[1]; r2 = p[2]; r3 = p[3];
            }}
            T h0[1]; h0[0] = r0;
            {nl_.join(hid_f)}
            for (int jj = 0; jj < M; jj += 8) {{
                {nl_.join(col)}
            }}
            {nl_.join(res_f)}
        }}
        __syncthreads();
        for (int q = threadIdx.x; q < 4 * M; q += blockDim.x) {{
            T add = GS[q];
            {"add += GR[(q / M) * NIN + (q % M) % NIN];" if last["res"] else ""}
            gr[i * 4 * M + q] += add;
        }}
    }}
}}

extern "C" __global__ void __launch_bounds__(128{bwd_minb}) emb_bwd(
    const T* __restrict__ Rn, const T* __restrict__ ggr, const long long n, const int nc,
    const int a, const int b, const T* __restrict__ Wg, T* __restrict__ gRn)
{{
    extern __shared__ __align__(16) unsigned char smem_[];
    T* SW = (T*)smem_;
    T* GG = SW + NWS;       /* dL/dgr of the centre, [j][c] */
    T* FD = GG + 4 * M;     /* its fold over the residual copies, [k][c] */
    for (int q = threadIdx.x; q < NWS; q += blockDim.x) SW[q] = Wg[q];
    for (long long i = blockIdx.x; i < n; i += gridDim.x) {{
        __syncthreads();
        for (int q = threadIdx.x; q < 4 * M; q += blockDim.x) GG[4 * (q % M) + q / M] = ggr[i * 4 * M + q];
        for (int q = threadIdx.x; q < 4 * NIN; q += blockDim.x) {{
            const int k = q / 4, c = q % 4;
            {fold}
        }}
        __syncthreads();
        for (int s = a + threadIdx.x; s < b; s += blockDim.x) {{
            const T* p = Rn + (i * nc + s) * 4;
            const T r0 = p[0], r1 = p[1], r2 = p[2], r3 = p[3];
            T dr0 = (T)0, dr1 = (T)0, dr2 = (T)0, dr3 = (T)0;
            T dh[NIN];
            {{
                T h0[1]; h0[0] = r0;
                {nl_.join(hid_f)}
                #pragma unroll
                for (int k = 0; k < NIN; ++k) dh[k] = (T)0;
                #pragma unroll 1
                for (int j = 0; j < M; ++j) {{
                    {nl_.join(bwd_col)}
                }}
                {nl_.join(res_b)}
            }}
            {{
                T h0[1]; h0[0] = r0;
                {nl_.join(hid_b)}
                dr0 += {x0grad};
                {closes}
            }}
            T* o = gRn + (i * nc + s) * 4;
            o[0] = dr0; o[1] = dr1; o[2] = dr2; o[3] = dr3;
        }}
    }}
}}
"""


def smem_bytes(spec: _Spec, itemsize: int) -> tuple:
    """Dynamic shared memory of (forward, backward) in bytes."""
    M, NIN = spec.sizes[-1], spec.layers[-1]["nin"]
    return (spec.nw + 4 * (M + NIN)) * itemsize, (spec.nw + 4 * (M + NIN)) * itemsize


def supported(net) -> str | None:
    """None if the fused kernels can run ``net``, else why not."""
    if net.layers[0].nin != 1:
        return "embedding input is not 1-wide"
    for l in net.layers:
        try:
            _act_code(l.activation)
        except ValueError as exc:
            return str(exc)
    spec = _Spec(net, 2)
    if max(smem_bytes(spec, 8)) > 200_000:
        return "weights do not fit in shared memory"
    return None


class FusedNet:
    """An embedding net as two fused CUDA kernels (forward contraction, backward to dL/dRn)."""

    def __init__(self, net, dtype: str, minb: int | None = None):
        import cupy

        why = supported(net)
        if why:
            raise ValueError(why)
        self.dtype = np.float32 if dtype == "float32" else np.float64
        self.spec = _Spec(net, 4 if dtype == "float32" else 2)
        self.M = self.spec.sizes[-1]
        src = _source(self.spec, dtype, minb)
        self.mod = cupy.RawModule(code=src, options=("-std=c++14",))
        self.fwd = self.mod.get_function("emb_fwd")
        self.bwd = self.mod.get_function("emb_bwd")
        self.smem = smem_bytes(self.spec, np.dtype(self.dtype).itemsize)
        for k, nbytes in zip((self.fwd, self.bwd), self.smem):
            if nbytes > 48 * 1024:
                k.max_dynamic_shared_size_bytes = nbytes
        self.w = cupy.asarray(self.spec.pack(net).astype(self.dtype))
        dev = cupy.cuda.Device()
        self.nsm = dev.attributes["MultiProcessorCount"]

    def _grid(self, n: int, per_sm: int) -> int:
        return int(min(n, self.nsm * per_sm))

    def forward(self, Rn, a: int, b: int, gr):
        """gr (n, 4, M) += contraction over slots a:b of Rn (n, nc, 4) (both C-contiguous)."""
        n, nc = Rn.shape[0], Rn.shape[1]
        if n and b > a:
            threads = int(min(256, -(-(b - a) // 32) * 32))
            self.fwd(
                (self._grid(n, 8),),
                (threads,),
                (Rn, np.int64(n), np.int32(nc), np.int32(a), np.int32(b), self.w, gr),
                shared_mem=self.smem[0],
            )

    def backward(self, Rn, ggr, a: int, b: int, gRn):
        """gRn[:, a:b, :] = dL/dRn given ggr = dL/dgr (n, 4, M) (C-contiguous)."""
        n, nc = Rn.shape[0], Rn.shape[1]
        if n and b > a:
            threads = int(min(128, -(-(b - a) // 32) * 32))
            self.bwd(
                (self._grid(n, 8),),
                (threads,),
                (Rn, ggr, np.int64(n), np.int32(nc), np.int32(a), np.int32(b), self.w, gRn),
                shared_mem=self.smem[1],
            )


def get_fused(net, dtype: str, minb: int | None = None) -> FusedNet:
    """Compiled FusedNet for ``net`` (cached on the net object, per dtype and ``minb``)."""
    cache = getattr(net, "_fused", None)
    if cache is None:
        cache = {}
        net._fused = cache
    if (dtype, minb) not in cache:
        cache[dtype, minb] = FusedNet(net, dtype, minb)
    return cache[dtype, minb]
