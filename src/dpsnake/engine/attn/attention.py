"""The neighbour-gated attention block of DPA-1 (se_atten / se_atten_v2): forward and backward.

Exactly what DeePMD-kit 3.2 computes (``deepmd.dpmodel.descriptor.dpa1.NeighborGatedAttention``),
one code path for NumPy and CuPy. Per layer, on the neighbour features ``x`` (B, n, E) of B centres:

    q, k, v = split(x W_in + b_in)                        (B, n, H) each (one head: see below)
    q, k, v = q/|q|, k/|k|, v/|v|                          if normalize
    L       = (s q) k^T                                    (B, n, n); s = temperature, else (H f)^-1/2
    L       = (L + 20) S - 20    with S_ij = sw_i sw_j     if smooth, else L_ij = -inf where j is empty
    T       = softmax_j(L) * m_i                           rows of empty slots i zeroed
    A       = T [* S if smooth] [* R if dotr]              R_ij = r_i . r_j (unit vectors)
    out     = LayerNorm(x + (A v) W_out + b_out)           LayerNorm: (h - mean) / sqrt(var + eps) g + b

A chunk may run fewer slots n than the model's nnei (sel): the trailing slots of every centre empty
(descriptor.py trims them). They change nothing but the smooth softmax: an empty key j has S_ij = 0,
so its logit is exactly -20 and each of the nnei - n left out adds exp(-20 - max_j L_ij) to every
row's denominator (and -20 to its maximum), added here analytically; its A_ij = T_ij S_ij is 0, so
it adds nothing to the backward either. Rows of empty slots do not depend on the other slots
(:func:`empty_rows_forward`).

NumPy and CuPy have no autodiff, so :func:`attention_backward` is written out: it returns the
gradients of a scalar with respect to ``x``, ``input_r`` and ``sw`` (weights are fixed at inference).

DeePMD-kit 3.2's layer builds its GatedAttentionLayer without passing ``num_heads``, so every
serialized model has one head; a model with more is refused at load.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from dpsnake.engine import xp as xpmod
from dpsnake.engine.settings import EngineContext
from dpsnake.errors import UserError

SHIFT = 20.0  # DeePMD-kit's attnw_shift: logits of the smooth variant are (L + 20) S - 20

# the keys DeePMD-kit 3.2 serializes (plus "smooth", which only its gated layer writes); others are refused
_FLAGS = {"nnei", "embed_dim", "hidden_dim", "dotr", "do_mask", "scaling_factor", "normalize", "temperature"}
_FLAGS |= {"precision", "smooth"}
_TOP_KEYS = _FLAGS | {"@class", "@version", "layer_num", "trainable_ln", "ln_eps", "attention_layers"}
_LAYER_KEYS = _FLAGS | {"trainable_ln", "ln_eps", "attention_layer", "attn_layer_norm"}
_GATED_KEYS = _FLAGS | {"num_heads", "bias", "in_proj", "out_proj"}
_DENSE_KEYS = {"@class", "@version", "bias", "use_timestep", "activation_function", "resnet", "precision"}
_DENSE_KEYS |= {"trainable", "@variables"}
_LN_KEYS = {"@class", "@version", "eps", "trainable", "precision", "@variables"}


@dataclass
class AttnLayer:
    """One attention layer: in_proj ``w_in`` (E, 3H), ``b_in`` (3H,) or None; out_proj ``w_out`` (H, E),
    ``b_out`` (E,) or None; layer norm ``gamma``, ``beta`` (E,), ``eps``; the flags of its gated layer.
    ``w_qkv`` (3, E, H) and ``b_qkv`` (3, 1, 1, H) or None are in_proj split into q, k, v (contiguous):
    three GEMMs give contiguous q, k, v, which batched matmuls need to run at BLAS speed."""

    w_in: object
    b_in: object
    w_out: object
    b_out: object
    gamma: object
    beta: object
    eps: float
    dotr: bool
    normalize: bool
    smooth: bool
    scaling: float
    w_qkv: object = None
    b_qkv: object = None
    kern: dict = field(default_factory=dict, repr=False, compare=False)
    """The whole-layer kernels' packed weights (cuda/attn_layer.py), per device."""

    def __post_init__(self):
        E, H3 = self.w_in.shape
        if self.w_qkv is None:
            self.w_qkv = self.w_in.reshape(E, 3, H3 // 3).transpose(1, 0, 2).copy()
        if self.b_qkv is None and self.b_in is not None:
            self.b_qkv = self.b_in.reshape(3, 1, 1, H3 // 3).copy()


@dataclass
class AttentionLayers:
    """All attention layers of a descriptor (``layers`` empty: the block is the identity).

    The flags are those of the layers' own gated-attention dicts, which DeePMD-kit's deserialization
    reads (the top-level dict has no ``smooth``); all layers must agree. ``do_mask`` is unused by
    DeePMD-kit's forward, so here too. ``scaling`` is the factor on the queries.
    """

    layers: list[AttnLayer]
    nnei: int
    embed_dim: int
    hidden_dim: int
    num_heads: int = 1
    dotr: bool = False
    do_mask: bool = False
    normalize: bool = True
    scaling: float = 1.0
    smooth: bool = True
    ln_eps: float = 1e-5
    dtype: object = None  # dtype of the weights of this copy (None: as serialized)
    _copies: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_serialized(cls, data: dict) -> AttentionLayers:
        """Read DeePMD-kit's ``NeighborGatedAttention.serialize()`` dict (a .dp descriptor's
        ``attention_layers``). Anything this module does not compute raises one UserError line."""
        _check(data, _TOP_KEYS, "attention_layers")
        if data.get("@class", "NeighborGatedAttention") != "NeighborGatedAttention" or data.get("@version", 1) != 1:
            raise UserError(
                f"attention_layers: unsupported @class/@version {data.get('@class')}/{data.get('@version')}"
            )
        raw = data.get("attention_layers") or []
        if len(raw) != int(data["layer_num"]):
            raise UserError(f"attention_layers: layer_num {data['layer_num']} but {len(raw)} layers stored")
        E, H = int(data["embed_dim"]), int(data["hidden_dim"])
        layers = [_read_layer(d, E, H, f"attention_layers[{i}]") for i, d in enumerate(raw)]
        for name in ("dotr", "normalize", "smooth", "scaling"):  # DeePMD-kit builds all layers alike
            if len({getattr(l, name) for l in layers}) > 1:
                raise UserError(f"attention_layers: layers differ in {name!r} (unsupported)")
        first = raw[0]["attention_layer"] if raw else data
        return cls(
            layers=layers,
            nnei=int(data["nnei"]),
            embed_dim=E,
            hidden_dim=H,
            num_heads=int(first.get("num_heads", 1)),
            dotr=layers[0].dotr if layers else bool(data.get("dotr", False)),
            do_mask=bool(data.get("do_mask", False)),
            normalize=layers[0].normalize if layers else bool(data.get("normalize", True)),
            scaling=layers[0].scaling if layers else _scaling(data, H),
            smooth=layers[0].smooth if layers else bool(data.get("smooth", True)),
            ln_eps=float(data.get("ln_eps", 1e-5)),
        )

    def to(self, xp, dtype) -> AttentionLayers:
        """Copy with the weights as ``xp`` arrays of ``dtype`` (cached per device and dtype)."""
        key = (*xpmod.device_key(xp), np.dtype(dtype).name)
        if key not in self._copies:

            def cv(a):
                return None if a is None else xp.asarray(np.asarray(xpmod.to_numpy(a)), dtype=dtype)

            layers = [
                AttnLayer(
                    *(cv(getattr(l, k)) for k in ("w_in", "b_in", "w_out", "b_out", "gamma", "beta")),
                    l.eps,
                    l.dotr,
                    l.normalize,
                    l.smooth,
                    l.scaling,
                )  # fmt: skip
                for l in self.layers
            ]
            fields = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("layers", "dtype", "_copies")}
            self._copies[key] = AttentionLayers(layers=layers, dtype=np.dtype(dtype), **fields)
        return self._copies[key]


def _check(d: dict, known: set, where: str) -> None:
    extra = sorted(set(d) - known)
    if extra:
        raise UserError(f"{where}: unsupported attention flag {extra[0]!r} (not in DeePMD-kit 3.2's se_atten)")


def _scaling(d: dict, head_dim: int) -> float:
    """DeePMD-kit's query scale: ``temperature`` itself when set, else (head_dim * scaling_factor)^-1/2."""
    t = d.get("temperature")
    return float(t) if t is not None else float((head_dim * float(d.get("scaling_factor", 1.0))) ** -0.5)


def _dense(d: dict, shape: tuple, where: str):
    """(w, b) of a serialized linear NativeLayer; refuses activations, timesteps and resnet."""
    _check(d, _DENSE_KEYS, where)
    if d.get("@class", "Layer") != "Layer":
        raise UserError(f"{where}: unsupported @class {d.get('@class')!r}")
    if str(d.get("activation_function", "none")).lower() not in ("none", "linear"):
        raise UserError(f"{where}: unsupported activation_function {d['activation_function']!r} (linear only)")
    v = d["@variables"]
    if d.get("resnet") or d.get("use_timestep") or v.get("idt") is not None:
        raise UserError(f"{where}: unsupported resnet/use_timestep in an attention projection")
    w = np.asarray(v["w"])
    if w.shape != shape:
        raise UserError(f"{where}: weight shape {w.shape}, expected {shape}")
    b = v.get("b")
    return w, None if b is None else np.asarray(b).reshape(-1)


def _read_layer(d: dict, E: int, H: int, where: str) -> AttnLayer:
    _check(d, _LAYER_KEYS, where)
    g = d["attention_layer"]
    _check(g, _GATED_KEYS, where + ".attention_layer")
    if int(g.get("num_heads", 1)) != 1:
        raise UserError(f"{where}: unsupported num_heads {g['num_heads']} (DeePMD-kit 3.2 builds 1 head)")
    w_in, b_in = _dense(g["in_proj"], (E, 3 * H), where + ".in_proj")
    w_out, b_out = _dense(g["out_proj"], (H, E), where + ".out_proj")
    ln = d["attn_layer_norm"]
    _check(ln, _LN_KEYS, where + ".attn_layer_norm")
    lv = ln["@variables"]
    gamma, beta = np.asarray(lv["w"]).reshape(-1), np.asarray(lv["b"]).reshape(-1)
    if gamma.shape != (E,) or beta.shape != (E,):
        raise UserError(f"{where}.attn_layer_norm: shape {gamma.shape}, expected ({E},)")
    return AttnLayer(
        w_in, b_in, w_out, b_out, gamma, beta, eps=float(ln.get("eps", 1e-5)), dotr=bool(g.get("dotr", False)),
        normalize=bool(g.get("normalize", True)), smooth=bool(g.get("smooth", True)), scaling=_scaling(g, H),
    )  # fmt: skip


def _pair_terms(xp, p, mask, input_r, sw, dtype):
    """Per-pair factors shared by all layers (recomputed in backward: cheap). Returns S = sw_i sw_j
    (B, n, n) if smooth, R = r_i . r_j (B, n, n) if dotr (else None), F = their product (the factor on
    the attention weights, None if neither), the row mask m_i (B, n, 1) and the key mask (B, 1, n)."""
    B, n = mask.shape
    S = R = None
    if p.smooth:
        s = sw.reshape(B, n, 1).astype(dtype, copy=False)
        S = s * s.reshape(B, 1, n)
    if p.dotr:
        r = input_r.astype(dtype, copy=False)
        R = xp.matmul(r, r.swapaxes(1, 2))
    F = S * R if S is not None and R is not None else (S if S is not None else R)
    return S, R, F, mask.reshape(B, n, 1).astype(dtype), mask.reshape(B, 1, n)


def _softmax(xp, L, key_mask, npad: int = 0):
    """Row softmax of logits L (B, n, n), in place; with ``key_mask`` the empty keys get weight 0
    (DeePMD-kit sets their logits to -inf). A row with no valid key (a centre without neighbours; all its
    rows are zeroed later) gives 0, not DeePMD-kit's NaN, so that backward stays finite. ``npad``
    (without ``key_mask``): keys of logit -SHIFT left out of L, counted in each row's denominator."""
    if key_mask is not None:
        L = xp.where(key_mask, L, L.dtype.type(-np.inf))  # a scalar of L's dtype keeps FP32 FP32
        # an all -inf row: max -inf -> the dtype's lowest finite value, so exp gives 0 and no NaN
        mx = xp.maximum(L.max(axis=-1, keepdims=True), xp.finfo(L.dtype).min)
    else:
        mx = L.max(axis=-1, keepdims=True)
        if npad:  # the keys left out are in the row's maximum, as in the full row
            mx = xp.maximum(mx, -SHIFT)
    L -= mx
    e = xp.exp(L, out=L)
    den = e.sum(axis=-1, keepdims=True)
    if npad and key_mask is None:
        den += npad * xp.exp(-SHIFT - mx)
    # the row's largest term is exp(0) = 1, so den >= 1 unless the row is empty (den = 0 -> 1)
    e /= xp.maximum(den, 1.0)
    return e


def _rows_forward(xp, p, L, S, F, row_m, key_m, npad: int = 0):
    """Array code of the chain between the logits L (B, n, n; overwritten) and the attention weights:
    returns T = the masked softmax (rows of empty slots zeroed) and A = T F (T itself without F).
    ``npad``: empty keys left out of the n (smooth: in the softmax, see the module doc)."""
    if p.smooth:
        L += SHIFT
        L *= S
        L -= SHIFT
        T = _softmax(xp, L, None, npad)
    else:
        T = _softmax(xp, L, key_m)
    T *= row_m
    return T, (T if F is None else T * F)


def _rows_backward(xp, p, dA, T, Lq, S, R, F, dS, dR):
    """Array code of the backward of :func:`_rows_forward`: dA = df/dA in (overwritten), returns
    dL = df/dL; adds to dS (if smooth; ``Lq()`` gives the logits again) and dR (if dotr)."""
    if F is not None:  # A = T S R: dS = dA T R, dR = dA T S, dT = dA S R
        dAT = dA * T
        if dS is not None:
            dS += dAT if R is None else dAT * R
        if dR is not None:
            dR += dAT if S is None else dAT * S
        dA *= F
    # softmax: dL = T (dT - sum_j dT T); rows of empty slots have T = 0, so they need no mask
    dL = dA
    dL -= (dA * T).sum(axis=-1, keepdims=True)
    dL *= T
    if S is not None:  # L' = (L + 20) S - 20: recompute L (one matmul) rather than keep it
        Lp = Lq()
        Lp += SHIFT
        Lp *= dL
        dS += Lp
        dL *= S
    return dL


def _layer_forward(xp, p, l: AttnLayer, x, S, F, row_m, key_m, keep: bool, rows=None):
    """One layer: x (B, n, E) -> (out (B, n, E), cache or None). The cache holds what backward cannot
    get cheaply: q, k, v (3, B, n, H) (normalized if normalize, unscaled), their inverse norms
    (3, B, n, 1) or None, T = the masked softmax and A = T F (B, n, n; the same array without F; both
    None with the fused core, which recomputes them),
    LayerNorm's xhat (B, n, E) and rstd (B, n, 1). The logits L are not kept: backward needs them only
    when smooth and recomputes them (one matmul). ``rows``: the CUDA row kernels (:class:`_Rows`) or
    None for the array code."""
    B, n, E = x.shape
    H = l.w_qkv.shape[2]
    if rows is not None and rows.layer is not None:  # mixed + TF32 CUDA: the whole layer in one kernel
        lw = rows.weights(xp, l)
        args = (rows.sw, rows.r, rows.mask, p.scaling, p.smooth, p.dotr, p.normalize, p.nnei)
        if not keep:
            return rows.layer.forward(lw, xp.ascontiguousarray(x), *args, extra=rows.extra), None
        out, cache = rows.layer.forward(lw, xp.ascontiguousarray(x), *args, keep=True, extra=rows.extra)
        return out, ("layer", lw, cache)
    z = xp.empty((3, B, n, H), dtype=x.dtype)
    x2 = x.reshape(B * n, E)
    for c in range(3):
        xp.matmul(x2, l.w_qkv[c], out=z[c].reshape(B * n, H))
    inv = None
    if rows is not None and p.normalize:  # bias and normalisation, a warp per row (cuda/attn_norm.py)
        inv = rows.norm.qkv_forward(z, l.b_qkv)
    else:
        if l.b_qkv is not None:
            z += l.b_qkv
        if p.normalize:
            inv = 1.0 / xp.sqrt((z * z).sum(axis=-1, keepdims=True))
            z *= inv
    q, k, v = z
    if rows is not None and rows.core is not None:  # FP64 CUDA: a block per centre (cuda/attn_core.py)
        o = rows.core.forward(z, rows.sw, rows.r, rows.mask, p.scaling, p.smooth, p.dotr, rows.npad)
        T = A = None  # never stored: the core's backward recomputes them
    else:
        if rows is not None:  # CUDA: q k^T s with k^T as a cuBLAS flag; then one warp per row (cuda/attn_rows.py)
            L = rows.bmm(q, k, tb=True, alpha=p.scaling)
            T, A = rows.forward(L, rows.sw, rows.r, rows.mask, p.smooth, p.dotr, rows.npad)
        else:
            L = xp.matmul(q * p.scaling, k.swapaxes(1, 2))
            T, A = _rows_forward(xp, p, L, S, F, row_m, key_m, p.nnei - n)
        o = xp.matmul(A, v)
    h = (o.reshape(-1, H) @ l.w_out).reshape(B, n, E)
    if rows is not None:
        out, xhat, rstd = rows.norm.ln_forward(h, l.b_out, x, l.gamma, l.beta, l.eps)
        return out, ((z, inv, T, A, xhat, rstd) if keep else None)
    if l.b_out is not None:
        h += l.b_out
    h += x
    mu = h.mean(axis=-1, keepdims=True)
    h -= mu
    rstd = 1.0 / xp.sqrt((h * h).mean(axis=-1, keepdims=True) + l.eps)
    xhat = h
    xhat *= rstd
    out = xhat * l.gamma + l.beta
    return out, ((z, inv, T, A, xhat, rstd) if keep else None)


class _Rows:
    """The CUDA row kernels bound to one call's per-slot inputs: those of the attention matrices
    (cuda/attn_rows.py: ``forward``, ``backward``) with ``sw`` (B, n), ``r`` (B, n, 3), ``mask`` (B, n),
    contiguous, in the attention's dtype (S and R are recomputed from them inside the kernels, never
    stored as (B, n, n) matrices), ``norm``, the module of the q/k/v and LayerNorm row kernels
    (cuda/attn_norm.py), ``bmm``, batched products with transposes as cuBLAS flags (cuda/bmm.py),
    ``npad``, the empty slots left out of the n (the module doc), and ``core``, the fused FP64 layer core
    (cuda/attn_core.py: products and rows in one kernel per direction) or None. ``tf32``: the batched
    FP32 products on TF32 tensor cores (settings.tf32; the flat GEMMs follow ``EngineContext.tf32``).
    ``layer``: the whole-layer TF32 kernels (cuda/attn_layer.py, mixed + TF32) or None; with them a layer
    is one kernel per direction and the rest goes unused; ``extra``: more of its constants (settings attn_ex2,
    attn_xhat16, attn_prefetch)."""

    layer = None
    extra = ()

    def __init__(self, xp, nei_mask, input_r, sw, dtype, npad: int = 0, core=None, tf32: bool = False):
        from dpsnake.engine.cuda import attn_norm, attn_rows
        from dpsnake.engine.cuda.bmm import bmm

        B, n = nei_mask.shape
        self.forward, self.backward = attn_rows.forward, attn_rows.backward
        self.bmm = functools.partial(bmm, tf32=True) if tf32 else bmm
        self.norm, self.npad, self.core = attn_norm, int(npad), core
        self.sw = xp.ascontiguousarray(sw.reshape(B, n).astype(dtype, copy=False))
        self.r = xp.ascontiguousarray(input_r.astype(dtype, copy=False))
        self.mask = xp.ascontiguousarray(nei_mask)

    def or_any(self, a):
        """``a``, or an array of the right dtype for an argument the kernel does not read."""
        return self.sw if a is None else a

    def weights(self, xp, l: AttnLayer):
        """Layer ``l``'s weights packed for the whole-layer kernels (made once per device)."""
        key = xpmod.device_key(xp)
        if key not in l.kern:
            l.kern[key] = self.layer.LayerWeights.of(l, xp)
        return l.kern[key]

    @staticmethod
    def make(xp, p, nei_mask, input_r, sw, dtype, ctx):
        """The row kernels for this call (compiled on first use), or None: NumPy, the family
        "attn" off, or a compile failure (then off for ``ctx`` from now on, with a warning). The fused
        core (family "attn_core") where :func:`attn_core.supported` allows it; the whole-layer kernels
        (family "attn_layer", mixed + TF32) where :func:`attn_layer.supported` allows them, and then
        nothing else is compiled (they run every layer)."""
        ctx = EngineContext.of(ctx)
        if not ctx.fast(xp, "attn"):
            return None
        from dpsnake.engine.cuda import attn_core, attn_layer, attn_norm, attn_rows

        n, dt = nei_mask.shape[1], np.dtype(dtype).name
        npad = (p.nnei - n) if p.smooth else 0  # the module's NPAD: 0 without the smooth softmax
        tf32 = ctx.settings.tf32 and np.dtype(dtype) == np.float32
        if (
            ctx.fast(xp, "attn_layer")
            and ctx.tf32_on(xp, dtype)
            and attn_layer.supported(dtype, n, p.hidden_dim, p.nnei, p.smooth, p.embed_dim) is None
        ):
            st = ctx.settings
            flags = (("EX2", st.attn_ex2), ("XH", st.attn_xhat16), ("PREF", st.attn_prefetch))
            extra = tuple((k, 1) for k, on in flags if on)
            layer_args = (n, p.embed_dim, p.hidden_dim, p.smooth, p.dotr, p.normalize, p.nnei, extra)
            if ctx.guarded("attn_layer", attn_layer.build, *layer_args) is not None:
                rows = _Rows(xp, nei_mask, input_r, sw, dtype, npad, None, tf32)
                rows.layer, rows.extra = attn_layer, extra
                return rows
        rows_args = (dt, n, p.smooth, p.dotr, npad)
        for build, args in ((attn_rows.build, rows_args), (attn_norm.build, (dt, p.hidden_dim))):
            if ctx.guarded("attn", build, *args) is None:
                return None
        if p.embed_dim != p.hidden_dim and ctx.guarded("attn", attn_norm.build, dt, p.embed_dim) is None:
            return None
        core = None
        if ctx.fast(xp, "attn_core") and attn_core.supported(dtype, n, p.hidden_dim) is None:
            core_args = (n, p.hidden_dim, p.smooth, p.dotr, npad)
            core = attn_core if ctx.guarded("attn_core", attn_core.build, *core_args) is not None else None
        return _Rows(xp, nei_mask, input_r, sw, dtype, npad, core, tf32)


def attention_forward(p: AttentionLayers, G, nei_mask, input_r, sw, keep: bool = True, ctx=None):
    """Forward of all layers.

    G (B, n, ng) features of n <= p.nnei slots (the slots past n: empty, left out, see the module
    doc); nei_mask (B, n) bool (True: a neighbour); input_r (B, n, 3) unit vectors (zeros on empty
    slots; read only if dotr); sw (B, n, 1) switch (0 on empty slots; read only if smooth). Computes in
    the dtype of ``p``'s weights. Returns (G_out (B, nnei, ng), cache for :func:`attention_backward`,
    None without ``keep``). The cache holds, per layer and neighbour slot,
    3 H + 2 nnei + ng + 4 numbers (7x the size of G_out per layer for ng 100, attn 128, nnei 120):
    the caller's chunk of centres sets the memory. ``ctx`` (an EngineContext or EngineSettings):
    on CuPy the family "attn" runs the (B, n, n) chains as CUDA row kernels.
    """
    xp = xpmod.array_namespace(G)
    if not p.layers:
        return (G if p.dtype is None else G.astype(p.dtype, copy=False)), None
    dtype = p.layers[0].w_in.dtype
    if G.shape[1] > p.nnei:
        raise ValueError(f"attention_forward: {G.shape[1]} slots, more than the model's nnei {p.nnei}")
    x = G.astype(dtype, copy=False)
    rows = _Rows.make(xp, p, nei_mask, input_r, sw, dtype, ctx)
    S = F = row_m = key_m = None
    if rows is None:
        S, _, F, row_m, key_m = _pair_terms(xp, p, nei_mask, input_r, sw, dtype)
    caches = []
    for l in p.layers:
        x, c = _layer_forward(xp, p, l, x, S, F, row_m, key_m, keep, rows)
        caches.append(c)
    # the inputs are kept by reference (no copy): the pair terms are recomputed from them in backward
    return x, ((caches, nei_mask, input_r, sw, rows) if keep else None)


def empty_rows_forward(p: AttentionLayers, x):
    """The attention's output at empty slots from their input features ``x`` (..., E), forward only.

    An empty slot's row of T is zeroed (row mask 0), so each layer gives LayerNorm(x + b_out): it does
    not depend on the other slots (nor they on it: its key has S = 0 or the -inf mask, its value A = 0).
    For the slots a chunk leaves out (descriptor.py adds their share of gr from this)."""
    xp = xpmod.array_namespace(x)
    if not p.layers:
        return x if p.dtype is None else x.astype(p.dtype, copy=False)
    x = x.astype(p.layers[0].w_in.dtype, copy=False)
    for l in p.layers:
        h = x if l.b_out is None else x + l.b_out
        h = h - h.mean(axis=-1, keepdims=True)
        x = h * (1.0 / xp.sqrt((h * h).mean(axis=-1, keepdims=True) + l.eps)) * l.gamma + l.beta
    return x


def attention_backward(p: AttentionLayers, cache, dG_out):
    """Gradients of a scalar f from dG_out = df/dG_out (B, nnei, ng): returns (df/dG (B, nnei, ng),
    df/d input_r (B, nnei, 3), df/d sw (B, nnei, 1)); the last two are zeros where dotr / smooth are off
    (also with zero layers, where the block is the identity)."""
    xp = xpmod.array_namespace(dG_out)
    B, n = dG_out.shape[:2]
    if not p.layers:
        dG = dG_out if p.dtype is None else dG_out.astype(p.dtype, copy=False)
        return dG, xp.zeros((B, n, 3), dtype=dG.dtype), xp.zeros((B, n, 1), dtype=dG.dtype)
    caches, mask, input_r, sw, rows = cache
    dtype = p.layers[0].w_in.dtype
    if caches and isinstance(caches[0][0], str):  # ("layer", ...): the whole-layer kernels (cuda/attn_layer.py)
        d_sw, d_r = xp.zeros((B, n), dtype=dtype), xp.zeros((B, n, 3), dtype=dtype)
        dx = xp.ascontiguousarray(dG_out.astype(dtype, copy=False))
        args = (rows.sw, rows.r, rows.mask, p.scaling, p.smooth, p.dotr, p.normalize, p.nnei, d_sw, d_r)
        for _, lw, c in reversed(caches):
            dx = rows.layer.backward(lw, c, dx, *args, extra=rows.extra)
        return dx, d_r, d_sw.reshape(B, n, 1)
    S = R = F = None
    if rows is None:
        S, R, F, _, _ = _pair_terms(xp, p, mask, input_r, sw, dtype)
    core = rows.core if rows is not None else None
    if core is not None:  # the fused core adds each layer's (dS + dS^T) sw, (dR + dR^T) r here
        d_sw, d_r = xp.zeros((B, n), dtype=dtype), xp.zeros((B, n, 3), dtype=dtype)
    dS = xp.zeros((B, n, n), dtype=dtype) if p.smooth and core is None else None
    dR = xp.zeros((B, n, n), dtype=dtype) if p.dotr and core is None else None
    dx = dG_out.astype(dtype, copy=False)
    for l, (z, inv, T, A, xhat, rstd) in zip(reversed(p.layers), reversed(caches)):
        E, H = l.w_out.shape[1], l.w_out.shape[0]
        # LayerNorm: dh = rstd (g - mean(g) - xhat mean(g xhat)), g = dout * gamma
        if rows is not None:
            dh = rows.norm.ln_backward(dx, xhat, rstd, l.gamma)
        else:
            g = dx * l.gamma
            dh = g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True)
            dh *= rstd
        q, k, v = z
        do = (dh.reshape(-1, E) @ l.w_out.T).reshape(B, n, H)
        dz = xp.empty_like(z)
        if core is not None:
            core.backward(z, do, rows.sw, rows.r, rows.mask, p.scaling, dz, d_sw, d_r, p.smooth, p.dotr, rows.npad)
        elif rows is not None:  # transposes as cuBLAS op flags (cuda/bmm.py), no copies
            rows.bmm(A, do, ta=True, out=dz[2])  # dv = A^T do
            dA = rows.bmm(do, v, tb=True)
            Lq = rows.bmm(q, k, tb=True, alpha=p.scaling) if p.smooth else dA
            dS_, dR_ = rows.or_any(dS), rows.or_any(dR)
            dL = rows.backward(dA, T, Lq, rows.sw, rows.r, dS_, dR_, p.smooth, p.dotr, rows.npad)
            rows.bmm(dL, k, out=dz[0])
            rows.bmm(dL, q, ta=True, out=dz[1])
        else:
            dz[2] = xp.matmul(A.swapaxes(1, 2), do)  # dv = A^T do
            dA = xp.matmul(do, v.swapaxes(1, 2))
            dL = _rows_backward(xp, p, dA, T, lambda: xp.matmul(q * p.scaling, k.swapaxes(1, 2)), S, R, F, dS, dR)
            xp.matmul(dL, k, out=dz[0])
            xp.matmul(dL.swapaxes(1, 2), q, out=dz[1])
        if rows is not None and p.normalize:
            rows.norm.qkv_backward(dz, z, inv, p.scaling)
        else:
            dz[:2] *= p.scaling
            if p.normalize:  # y = z/|z|: dz = (dy - y (dy . y)) / |z|
                dz -= z * (dz * z).sum(axis=-1, keepdims=True)
                dz *= inv
        dx = dh  # the residual; plus the in_proj path, one GEMM per q, k, v
        for c in range(3):
            if rows is not None:  # accumulated inside the GEMM (beta 1): no temporary, no add
                rows.bmm(dz[c].reshape(1, B * n, H), l.w_qkv[c][None], tb=True, out=dx.reshape(1, B * n, E), beta=1.0)
            else:
                dx += (dz[c].reshape(B * n, H) @ l.w_qkv[c].T).reshape(B, n, E)
    if core is not None:
        return dx, d_r, d_sw.reshape(B, n, 1)
    d_sw = xp.zeros((B, n, 1), dtype=dtype)
    if dS is not None:  # S_ij = sw_i sw_j
        d_sw = _sym_product(xp, rows, dS, sw.reshape(B, n, 1).astype(dtype, copy=False))
    d_r = xp.zeros((B, n, 3), dtype=dtype)
    if dR is not None:  # R_ij = r_i . r_j
        d_r = _sym_product(xp, rows, dR, input_r.astype(dtype, copy=False))
    return dx, d_r, d_sw


def _sym_product(xp, rows, M, y):
    """(M + M^T) y per batch item: M (B, n, n), y (B, n, k). On CUDA (``rows``) two GEMMs into one array,
    the transpose a cuBLAS flag: no (B, n, n) copy of M^T (cupy.matmul would make one)."""
    if rows is None:
        return xp.matmul(M + M.swapaxes(1, 2), y)
    y = xp.ascontiguousarray(y)
    out = rows.bmm(M, y)
    return rows.bmm(M, y, ta=True, out=out, beta=1.0)


__all__ = ["AttentionLayers", "AttnLayer", "attention_forward", "attention_backward", "empty_rows_forward"]
