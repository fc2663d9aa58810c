"""Fused embedding-net kernels (CUDA, via CuPy RawModule) for the se_e2_a descriptor. EXPERIMENTAL:
off by default (DPSNAKE_FUSED=1 turns them on). Measured on an H100 (docs/benchmarks.md) they agree
with the array code to 1e-14 in FP64 but are slower than the cuBLAS path (5.7 vs 2.4 us/atom, batched
mixed), because each weight is an indexed constant-memory load; faster variants are future work.

One thread per neighbour slot, one block per centre atom, weights in ``__constant__`` memory, every
intermediate kept in registers (recomputed in the backward pass rather than stored), so the
embedding costs no memory traffic beyond reading Rn and writing the results:

- forward: gr[i, k, j] += sum over slots s of Rn[i, s, k] * G(Rn[i, s, 0])[j]   (warp-shuffle sums)
- backward: given dL/dgr, gRn[i, s, k] = dL/dRn[i, s, k] (the chain through G included).

Generated per network shape and dtype; layer math as nets.py (act, idt, resnet).
"""

from __future__ import annotations

import hashlib
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
        return (f"{{ T s = (T)1 / ((T)1 + EXP(-z)); if (z < (T){thr!r}) {{ y = z * s; d = s * ((T)1 + z * ((T)1 - s)); }}"
                f" else {{ T t = TANH((T){slope!r} * (z - (T){thr!r})); y = t + (T){const!r};"
                f" d = (T){slope!r} * ((T)1 - t * t); }} }}")
    raise ValueError(f"no fused kernel for activation {name!r}")


class _Spec:
    """Layer sizes, offsets in the packed weight array, activation/resnet/idt of each layer."""

    def __init__(self, net):
        self.sizes = [net.layers[0].nin] + [l.nout for l in net.layers]
        self.layers = []
        off = 0
        for l in net.layers:
            d = {"nin": l.nin, "nout": l.nout, "act": l.activation, "w": off}
            off += l.nin * l.nout
            d["b"] = off if l.b is not None else None
            off += l.nout if l.b is not None else 0
            d["idt"] = off if l.idt is not None else None
            off += l.nout if l.idt is not None else 0
            d["res"] = 1 if (l.resnet and l.nout == l.nin) else (2 if (l.resnet and l.nout == 2 * l.nin) else 0)
            self.layers.append(d)
        self.nw = off

    def pack(self, net) -> np.ndarray:
        parts = []
        for l in net.layers:
            parts.append(np.asarray(l.w, dtype=np.float64).reshape(-1))
            if l.b is not None:
                parts.append(np.asarray(l.b, dtype=np.float64).reshape(-1))
            if l.idt is not None:
                parts.append(np.asarray(l.idt, dtype=np.float64).reshape(-1))
        return np.concatenate(parts)


def _hidden(spec, ell, src, dst, with_deriv):
    """Code of hidden layer ``ell`` (0-based): src[nin] -> dst[nout] (and derivative dD{ell})."""
    L = spec.layers[ell]
    nin, nout = L["nin"], L["nout"]
    b = f"CW[{L['b']} + j]" if L["b"] is not None else "(T)0"
    c = [f"T {dst}[{nout}];"]
    if with_deriv:
        c.append(f"T dD{ell}[{nout}];")
    c.append("#pragma unroll")
    c.append(f"for (int j = 0; j < {nout}; ++j) {{")
    c.append("  T z = (T)0;")
    c.append("  #pragma unroll")
    c.append(f"  for (int k = 0; k < {nin}; ++k) z = FMA({src}[k], CW[{L['w']} + k * {nout} + j], z);")
    c.append(f"  z += {b};")
    c.append(f"  T y, d; {_act_code(L['act'])}")
    if L["idt"] is not None:
        c.append(f"  y *= CW[{L['idt']} + j]; d *= CW[{L['idt']} + j];")
    if L["res"]:
        c.append(f"  y += {src}[j % {nin}];")
    if with_deriv:
        c.append(f"  dD{ell}[j] = d;")
    c.append(f"  {dst}[j] = y;")
    c.append("}")
    return "\n".join(c)


def _hidden_back(spec, ell, dsrc, ddst):
    """Backward of hidden layer ``ell``: dsrc[nout] (dL/dy) -> ddst[nin] (dL/dx), using dD{ell}."""
    L = spec.layers[ell]
    nin, nout = L["nin"], L["nout"]
    c = [f"T {ddst}[{nin}];", "#pragma unroll", f"for (int k = 0; k < {nin}; ++k) {ddst}[k] = (T)0;",
         "#pragma unroll", f"for (int j = 0; j < {nout}; ++j) {{", f"  T dz = {dsrc}[j] * dD{ell}[j];",
         "  #pragma unroll",
         f"  for (int k = 0; k < {nin}; ++k) {ddst}[k] = FMA(dz, CW[{L['w']} + k * {nout} + j], {ddst}[k]);"]
    if L["res"]:
        c.append(f"  {ddst}[j % {nin}] += {dsrc}[j];")
    c.append("}")
    return "\n".join(c)


def _source(spec: _Spec, dtype: str) -> str:
    T = "float" if dtype == "float32" else "double"
    f = "f" if T == "float" else ""
    nl = len(spec.layers)
    last = spec.layers[-1]
    M, NIN = last["nout"], last["nin"]
    # the last layer is unrolled over groups of Q columns (Q = NIN with resnet, so that j % NIN == q
    # is static and the layer input stays in registers)
    Q = NIN if (last["res"] or M % NIN == 0) else next(q for q in range(min(M, 64), 0, -1) if M % q == 0)
    head = f"""
typedef {T} T;
#define TANH tanh{f}
#define EXP exp{f}
#define LOG log{f}
#define FMA fma{f}
#define M {M}
#define NIN {NIN}
#define Q {Q}
__constant__ T CW[{spec.nw}];
"""
    hid_f = []
    src = "h0"
    for ell in range(nl - 1):
        hid_f.append(_hidden(spec, ell, src, f"h{ell + 1}", False))
        src = f"h{ell + 1}"
    hid_b_recompute = []
    src = "h0"
    for ell in range(nl - 1):
        hid_b_recompute.append(_hidden(spec, ell, src, f"g{ell + 1}", True))
        src = f"g{ell + 1}"
    top = src.replace("g", "h") if nl > 1 else "h0"
    lb = f"CW[{last['b']} + j]" if last["b"] is not None else "(T)0"
    lidt = f"CW[{last['idt']} + j]" if last["idt"] is not None else "(T)1"
    res = f"{top}[q]" if last["res"] else "(T)0"
    # the last layer, unrolled over q inside a loop over column groups jj (so j % NIN == q is static)
    last_val = f"""
      const int j = jj + q;
      T z = (T)0;
      #pragma unroll
      for (int k = 0; k < NIN; ++k) z = FMA({top}[k], CW[{last['w']} + k * M + j], z);
      z += {lb};
      T y, d; {_act_code(last['act'])}
      const T idt = {lidt};
      const T g = y * idt + {res};"""
    hid_back = []
    dsrc = "dh"
    for ell in range(nl - 2, -1, -1):
        hid_back.append(_hidden_back(spec, ell, dsrc, f"dx{ell}"))
        dsrc = f"dx{ell}"
    x0grad = f"{dsrc}[0]" if nl > 1 else "dh[0]"
    return head + f"""
extern "C" __global__ void emb_fwd(const T* __restrict__ Rn, const int nnei, const int a, const int b,
                                   T* __restrict__ gr)
{{
    __shared__ T gs[4 * M];
    const long long i = blockIdx.x;
    for (int q = threadIdx.x; q < 4 * M; q += blockDim.x) gs[q] = (T)0;
    __syncthreads();
    const int lane = threadIdx.x & 31;
    for (int base = a; base < b; base += blockDim.x) {{
        const int s = base + threadIdx.x;
        T r0 = 0, r1 = 0, r2 = 0, r3 = 0;
        if (s < b) {{
            const T* p = Rn + (i * nnei + s) * 4;
            r0 = p[0]; r1 = p[1]; r2 = p[2]; r3 = p[3];
        }}
        T h0[1]; h0[0] = r0;
        {chr(10).join(hid_f)}
        for (int jj = 0; jj < M; jj += Q) {{
            #pragma unroll
            for (int q = 0; q < Q; ++q) {{
                {last_val}
                T c0 = r0 * g, c1 = r1 * g, c2 = r2 * g, c3 = r3 * g;
                #pragma unroll
                for (int o = 16; o > 0; o >>= 1) {{
                    c0 += __shfl_down_sync(0xffffffffu, c0, o);
                    c1 += __shfl_down_sync(0xffffffffu, c1, o);
                    c2 += __shfl_down_sync(0xffffffffu, c2, o);
                    c3 += __shfl_down_sync(0xffffffffu, c3, o);
                }}
                if (lane == 0) {{
                    atomicAdd(&gs[j], c0); atomicAdd(&gs[M + j], c1);
                    atomicAdd(&gs[2 * M + j], c2); atomicAdd(&gs[3 * M + j], c3);
                }}
            }}
        }}
    }}
    __syncthreads();
    for (int q = threadIdx.x; q < 4 * M; q += blockDim.x) gr[i * 4 * M + q] += gs[q];
}}

extern "C" __global__ void emb_bwd(const T* __restrict__ Rn, const T* __restrict__ dgr, const int nnei,
                                   const int a, const int b, T* __restrict__ gRn)
{{
    __shared__ T dg[4 * M];
    const long long i = blockIdx.x;
    for (int q = threadIdx.x; q < 4 * M; q += blockDim.x) dg[q] = dgr[i * 4 * M + q];
    __syncthreads();
    for (int base = a; base < b; base += blockDim.x) {{
        const int s = base + threadIdx.x;
        if (s >= b) continue;
        const T* p = Rn + (i * nnei + s) * 4;
        const T r0 = p[0], r1 = p[1], r2 = p[2], r3 = p[3];
        T dr0 = 0, dr1 = 0, dr2 = 0, dr3 = 0;
        T dh[NIN];
        {{
            T h0[1]; h0[0] = r0;
            {chr(10).join(hid_f)}
            #pragma unroll
            for (int k = 0; k < NIN; ++k) dh[k] = (T)0;
            for (int jj = 0; jj < M; jj += Q) {{
                #pragma unroll
                for (int q = 0; q < Q; ++q) {{
                    {last_val}
                    const T d0 = dg[j], d1 = dg[M + j], d2 = dg[2 * M + j], d3 = dg[3 * M + j];
                    const T dG = r0 * d0 + r1 * d1 + r2 * d2 + r3 * d3;
                    dr0 += g * d0; dr1 += g * d1; dr2 += g * d2; dr3 += g * d3;
                    const T dz = dG * d * idt;
                    #pragma unroll
                    for (int k = 0; k < NIN; ++k) dh[k] = FMA(dz, CW[{last['w']} + k * M + j], dh[k]);
                    {"dh[q] += dG;" if last["res"] else ""}
                }}
            }}
        }}
        {{
            T h0[1]; h0[0] = r0;
            {chr(10).join(hid_b_recompute)}
            {chr(10).join(hid_back)}
            dr0 += {x0grad};
        }}
        T* o = gRn + (i * nnei + s) * 4;
        o[0] = dr0; o[1] = dr1; o[2] = dr2; o[3] = dr3;
    }}
}}
"""


class FusedNet:
    """An embedding net as fused CUDA kernels with its weights in constant memory."""

    def __init__(self, net, dtype: str):
        import cupy

        self.spec = _Spec(net)
        if self.spec.sizes[0] != 1:
            raise ValueError("fused embedding needs a 1-wide input")
        self.M = self.spec.sizes[-1]
        self.dtype = np.float32 if dtype == "float32" else np.float64
        w = self.spec.pack(net)
        # a tag unique to these weights: CuPy reuses a loaded module for identical source, and each
        # net needs its own __constant__ weights
        tag = hashlib.sha1(w.tobytes() + dtype.encode()).hexdigest()
        self.mod = cupy.RawModule(code=f"// weights {tag}\n" + _source(self.spec, dtype),
                                  options=("-std=c++14",))
        self.fwd = self.mod.get_function("emb_fwd")
        self.bwd = self.mod.get_function("emb_bwd")
        ptr = self.mod.get_global("CW")
        cw = cupy.ndarray((self.spec.nw,), self.dtype, memptr=ptr)
        cw[...] = cupy.asarray(w.astype(self.dtype))

    @staticmethod
    def _threads(nslots):
        return int(min(256, max(32, -(-nslots // 32) * 32)))

    def forward(self, Rn, a: int, b: int, gr):
        """gr (n, 4, M) += contraction over slots a:b of Rn (n, nnei, 4) (both C-contiguous)."""
        n, nnei = Rn.shape[0], Rn.shape[1]
        if n and b > a:
            self.fwd((n,), (self._threads(b - a),), (Rn, np.int32(nnei), np.int32(a), np.int32(b), gr))

    def backward(self, Rn, dgr, a: int, b: int, gRn):
        """gRn[:, a:b, :] = dL/dRn given dgr = dL/dgr (n, 4, M)."""
        n, nnei = Rn.shape[0], Rn.shape[1]
        if n and b > a:
            self.bwd((n,), (self._threads(b - a),), (Rn, dgr, np.int32(nnei), np.int32(a), np.int32(b), gRn))


def get_fused(net, dtype: str) -> FusedNet:
    """Compiled FusedNet for ``net`` (cached on the net object)."""
    cache = getattr(net, "_fused", None)
    if cache is None:
        cache = {}
        net._fused = cache
    if dtype not in cache:
        cache[dtype] = FusedNet(net, dtype)
    return cache[dtype]
