"""se_atten / se_atten_v2 (DPA-1) descriptor + ener fitting: atomic energies and dE/dd for a chunk of
same-type centres, as DeePMD-kit's ``DescrptBlockSeAtten.call`` (dpmodel / PyTorch) computes them.

Forward (per centre i of type ti, nnei slots in distance order, any neighbour types):
  sw(r) quintic switch; R = sw [1/(r+p), d/(r+p)^2] (0 in empty slots); Rn = (R - davg) / dstd
  (empty slots: -davg/dstd); descriptor exclude_types zero the Rn rows of excluded real neighbours
  and take them out of the mask; swm = sw * mask;
  concat: G = net([Rn0, tebd_j(, tebd_i)]); strip: Gs = net(Rn0), T = table(ti, tj) (* swm if
  smooth), G = Gs * T + Gs. The type tj of an empty (or excluded) slot is the type of its system's
  first atom, as DeePMD-kit gathers atom 0 for nlist entries of -1.
  G <- attention layers (G, mask, Rn[1:4] / max(|Rn[1:4]|, 1e-12), swm);
  gr = Rn^T G / nnei (4, M1); D = gr^T gr[:, :axis]; [D, tebd_i] if concat_output_tebd;
  E = fit(D) + bias.
Backward by hand to g = dE/dd (n, nnei, 3), geometry in FP64 (env.py), the nets in the runtime dtype. On
CUDA: the env matrix and its chain rule one kernel each way (family "env", env.py); strip mode's net and gate
two kernels where the nets are fused (cuda/strip_net.py: G the only array stored), else the gate alone as
kernels (family "attn", cuda/strip_gate.py), the table never gathered; D and its backward on the desc kernels
(family "desc"); the products with G through cuda/bmm.py (transposes as cuBLAS flags).

A chunk may run only its first ns < nnei slots when every later slot is empty (ensemble.py trims
them: the attention's (n, n) work falls as ns^2). Nothing else changes: the normalisations keep
nnei, the attention adds the left-out keys analytically (attention.py), and their share of gr,
sum over slots p >= ns of Rn_p G_p / nnei, is a constant per (centre type, type of the system's
first atom) (:func:`_left_out_gr`): an empty slot's Rn is -davg/dstd and its G does not depend on
the other slots. It is 0 when davg is (set_davg_zero, DeePMD-kit's default for se_atten), and it
has no gradient (the slot has no atom).

Compressed (``AttnRuntime.build(compress=...)``, strip mode only): Gs is the table of
:func:`dpsnake.engine.tabulate.build_strip_table`, in array code; on CUDA without attention layers
the kernels of cuda/tab.py (STRIP) give gr and gRn (and dL/dswm) with G never stored, with attention
layers those of cuda/strip_tab.py write G (and give dL/ds, dL/dswm) in strip_net's place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpsnake.engine.attn import env as attn_env
from dpsnake.engine.attn.model import AttnModel
from dpsnake.engine.cuda import elementwise as ew
from dpsnake.engine.settings import EngineContext
from dpsnake.engine.tabulate import build_strip_table
from dpsnake.errors import UserError


@dataclass
class AttnRuntime:
    """An :class:`AttnModel` with its weights in namespace ``xp`` and net dtype ``dtype``."""

    model: AttnModel
    xp: object
    dtype: object
    davg: object  # (ntypes, nnei, 4) float64
    rstd: object  # 1 / dstd
    tebd: object  # (ntypes + 1, tebd_dim) dtype
    embedding: object
    strip_table: object
    attention: object  # AttentionLayers or None
    fittings: list
    bias: np.ndarray
    ctx: EngineContext | None = None
    tab: object = None  # cuda.tab.TabKernels (STRIP) of the tabulated Gs, or None
    strip_net: object = None  # strip mode's net and gate: cuda.strip_net.StripNet (compressed: StripTab), or None
    left_out: dict = None  # (ti, ns) -> _left_out_gr's array or None, filled on use

    @classmethod
    def build(cls, model: AttnModel, xp, dtype, ctx=None, compress=None):
        """``compress``: a :class:`~dpsnake.engine.tabulate.Compression` to tabulate Gs (strip
        mode: :func:`check_compressible`), or None for the net itself."""

        def cv(a):
            return None if a is None else xp.asarray(np.asarray(a), dtype=dtype)

        ctx = EngineContext.of(ctx)
        attention = None if model.attention is None else model.attention.to(xp, dtype)
        embedding, tab, strip_net = model.embedding.to(xp, dtype), None, None
        if compress is None and model.tebd_mode == "strip":
            strip_net = _strip_net(model, xp, np.dtype(dtype).name, ctx)
        if compress is not None:
            check_compressible(model)
            embedding = build_strip_table(model, compress).to(xp, dtype)
            if attention is None and ctx.tab_kernels(xp):
                from dpsnake.engine.cuda.tab import TabKernels

                tab = TabKernels(embedding, np.dtype(dtype).name, ctx.settings.tab_lps, cv(model.strip_table))
            elif ctx.tab_kernels(xp):  # the attention needs G: table and gate kernels write it (strip_net's place)
                from dpsnake.engine.cuda.strip_tab import StripTab

                strip_net = ctx.guarded("nets", StripTab, embedding, np.dtype(dtype).name)
        return cls(
            model=model,
            xp=xp,
            dtype=dtype,
            davg=xp.asarray(model.davg, dtype=xp.float64),
            rstd=xp.asarray(1.0 / model.dstd, dtype=xp.float64),
            tebd=cv(model.tebd),
            embedding=embedding,
            strip_table=cv(model.strip_table),
            attention=attention,
            fittings=[f.to(xp, dtype) for f in model.fittings],
            bias=np.asarray(model.bias, dtype=np.float64),
            ctx=ctx,
            tab=tab,
            strip_net=strip_net,
            left_out={},
        )

    def fitting(self, t: int):
        return self.fittings[0 if self.model.fit_mixed else t]


def check_compressible(model: AttnModel) -> None:
    """One UserError line unless ``model``'s geometric net can be tabulated: strip mode (concat
    feeds the type embedding into the net) and no resnet_dt (as DeePMD-kit's compression)."""
    if model.tebd_mode != "strip":
        raise UserError(
            f"compress: {model.path}: tebd_input_mode {model.tebd_mode!r}: only strip-mode se_atten "
            "models can be tabulated (use the uncompressed nets)"
        )
    if any(l.idt is not None for l in model.embedding.layers):
        raise UserError(f"compress: {model.path}: descriptor resnet_dt=true cannot be tabulated (as in DeePMD-kit)")


def _prod(rt: AttnRuntime, a, b, ta: bool = False, tb: bool = False, alpha: float = 1.0):
    """alpha op(a) op(b) per centre (a, b C-contiguous (n, ., .)), op the transpose where ``ta`` / ``tb``: on
    CuPy with the kernels on, cuda/bmm.py (the transposes as cuBLAS flags: cupy.matmul would copy the operand;
    TF32 as settings.tf32 asks), else the array code."""
    xp = rt.xp
    if rt.ctx.kernels(xp):
        from dpsnake.engine.cuda.bmm import bmm

        a, b = xp.ascontiguousarray(a), xp.ascontiguousarray(b)
        return bmm(a, b, ta=ta, tb=tb, alpha=alpha, tf32=rt.ctx.tf32_on(xp, rt.dtype))
    a = a.transpose(0, 2, 1) if ta else a
    out = xp.matmul(a, b.transpose(0, 2, 1) if tb else b)
    return out if alpha == 1.0 else out * alpha


def _strip_net(model: AttnModel, xp, dtype: str, ctx: EngineContext):
    """The geometric net and type gate of ``model`` as CUDA kernels (compiled now) where the nets are fused
    (``EngineSettings.fused``, CuPy): cuda/strip_net.py's (FP32 / FP64 FMAs), or with settings.tf32 and
    ``strip_tc`` cuda/strip_net_tc.py's on TF32 tensor cores. None: not fused, a net they cannot run (input
    width, activation, size), or a compile failure (then the family "nets" is off for ``ctx``, with a warning)."""
    if not ctx.fused(xp, dtype):
        return None
    from dpsnake.engine.cuda import strip_net, strip_net_tc

    tc = ctx.settings.strip_tc and ctx.tf32_on(xp, dtype)
    if tc and strip_net_tc.supported(model.embedding) is None:
        return ctx.guarded("nets", strip_net_tc.get, model.embedding)
    if strip_net.supported(model.embedding, dtype) is not None:
        return None
    return ctx.guarded("nets", strip_net.get_strip_net, model.embedding, dtype)


def _gate_kernels(rt: AttnRuntime):
    """cuda/strip_gate.py for the strip-mode type gate of ``rt`` (compiled on first use), or None: NumPy,
    the family "attn" off, or a compile failure (then the family is off for ``rt.ctx``, with a warning)."""
    if rt.ctx is None or not rt.ctx.fast(rt.xp, "attn"):
        return None
    from dpsnake.engine.cuda import strip_gate

    if rt.ctx.guarded("attn", strip_gate.build, np.dtype(rt.dtype).name, rt.model.neuron[-1]) is None:
        return None
    return strip_gate


def _left_out_gr(rt: AttnRuntime, ti: int, ns: int):
    """(ntypes, 4, M1) in the net dtype, row f: sum over the slots p = ns..nnei-1 of Rn_p^T G_p / nnei
    for a centre of type ``ti`` whose slots past ns are empty and take type f (its system's first
    atom); None where every such Rn_p is 0 (davg 0 there). Cached per (ti, ns)."""
    key = (ti, ns)
    if key in rt.left_out:
        return rt.left_out[key]
    xp, m, dt = rt.xp, rt.model, rt.dtype
    rn = (0.0 - m.davg[ti, ns:]) * (1.0 / m.dstd[ti, ns:])  # (npad, 4): R = 0, as the full slots round it
    out = None
    if rn.any():
        nt, nt1, npad = m.ntypes, m.ntypes + 1, rn.shape[0]
        Rn = xp.asarray(np.broadcast_to(rn, (nt, npad, 4)), dtype=dt)
        ss, f = Rn[..., 0:1], xp.repeat(xp.arange(nt)[:, None], npad, axis=1)  # f (nt, npad): the type
        if m.tebd_mode == "concat":
            tj = rt.tebd[f]
            parts = [ss, tj] if m.type_one_side else [ss, tj, xp.broadcast_to(rt.tebd[ti], tj.shape)]
            G = rt.embedding.forward(xp, xp.concatenate(parts, axis=2), keep=False, ctx=rt.ctx)[0]
        else:  # strip: Gs (1 + table), the table times swm = 0 if smooth
            Gs = rt.embedding.forward(xp, ss, keep=False, ctx=rt.ctx)[0]
            G = Gs if m.smooth else Gs * rt.strip_table[f if m.type_one_side else ti * nt1 + f] + Gs
        if rt.attention is not None:
            from dpsnake.engine.attn.attention import empty_rows_forward

            G = empty_rows_forward(rt.attention, G)
        out = xp.matmul(Rn.transpose(0, 2, 1), G) * (1.0 / m.nnei)
    rt.left_out[key] = out
    return out


def energy_and_grad(rt: AttnRuntime, ti: int, d, valid, ntype, first, need_grad: bool = True):
    """Atomic energies (n,) float64 and g = dE/dd (n, ns, 3) float64 of centres of type ``ti``
    (:func:`_energy_and_grad`); with settings.tf32 on CuPy in mixed precision, every FP32 cuBLAS GEMM
    of it (attention, descriptor, nets not run by fused kernels) on TF32 tensor cores."""
    with rt.ctx.tf32(rt.xp, rt.dtype):
        return _energy_and_grad(rt, ti, d, valid, ntype, first, need_grad)


def _energy_and_grad(rt: AttnRuntime, ti: int, d, valid, ntype, first, need_grad: bool = True):
    """Atomic energies (n,) float64 and g = dE/dd (n, ns, 3) float64 of centres of type ``ti``.

    d (n, ns, 3) float64 displacements r_neighbour - r_centre; valid (n, ns) bool (after model
    pair exclusions); ntype (n, ns) int: each valid slot's neighbour type (any value elsewhere);
    first (n,) int: the type of each centre's system's first atom, the type DeePMD-kit gives empty
    and excluded slots (see the module doc). ns <= nnei: the first slots of the neighbour list, the
    others empty (module doc). g is exactly 0 in empty slots.
    """
    xp, m = rt.xp, rt.model
    n, ns = valid.shape
    nnei = m.nnei  # the normalisations use sel, whatever the slots run
    if m.atom_exclude[ti]:
        return xp.zeros(n), (xp.zeros((n, nnei, 3)) if need_grad else None)
    dt = rt.dtype
    mask = valid
    if m.desc_exclude[ti].any():  # excluded real neighbours: zero rows (env.py), out of the mask
        ex = xp.asarray(m.desc_exclude[ti])[xp.where(valid, ntype, 0)] & valid
        mask = valid & ~ex
    ntype = xp.where(mask, ntype, first[:, None])  # empty / excluded slots: the first atom's type
    env = attn_env.forward(rt, ti, d, valid, mask, rt.attention is not None)
    Rn_c, swm = env.Rn, env.swm  # net dtype
    ss = Rn_c[..., 0:1]
    nt1 = m.ntypes + 1
    kern, acache = rt.tab, None
    if kern is not None:  # CUDA, tabulated Gs, no attention: gr with G in registers, never stored
        w = swm if m.smooth else xp.ones((n, ns), dtype=dt)
        krow = xp.ascontiguousarray((ntype if m.type_one_side else ti * nt1 + ntype).astype(xp.int32))
        gr = xp.zeros((n, 4, m.neuron[-1]), dtype=dt)
        kern.forward(Rn_c, 0, ns, gr, w, krow)
        gr *= 1.0 / nnei
    else:
        if m.tebd_mode == "concat":
            tj = rt.tebd[ntype]
            parts = [ss, tj] if m.type_one_side else [ss, tj, xp.broadcast_to(rt.tebd[ti], tj.shape)]
            G0, ecache = rt.embedding.forward(xp, xp.concatenate(parts, axis=2), keep=need_grad, ctx=rt.ctx)
            Gs = tt = None
        else:
            trow = ntype if m.type_one_side else ti * nt1 + ntype
            sn = rt.strip_net
            gate = None if sn is not None else _gate_kernels(rt)
            if sn is not None or gate is not None:  # CUDA: the table never gathered
                trow = xp.ascontiguousarray(trow, dtype=xp.int32)  # once, for forward and backward
                wsm = swm if m.smooth else None
            if sn is not None:  # net and gate in one kernel: G the only array stored, the net recomputed backward
                G0 = sn.forward(Rn_c, rt.strip_table, trow, wsm)
            else:
                Gs, ecache = rt.embedding.forward(xp, ss, keep=need_grad, ctx=rt.ctx)
                if gate is not None:  # G = Gs (1 + T swm) per slot
                    G0 = gate.forward(Gs, rt.strip_table, trow, wsm)
                else:  # gt1 = 1 + T (swm): G = Gs gt1 (DeePMD-kit: Gs T + Gs), kept for backward
                    tt = rt.strip_table[trow]
                    gt1 = tt * swm[..., None] if m.smooth else tt.copy()
                    gt1 += 1
                    G0 = Gs * gt1
        if rt.attention is not None:
            from dpsnake.engine.attn.attention import attention_forward

            G, acache = attention_forward(rt.attention, G0, mask, env.u, swm[..., None], ctx=rt.ctx)
        else:
            G = G0
        gr = _prod(rt, Rn_c, G, ta=True, alpha=1.0 / nnei)  # (n, 4, M1)
    if ns < nnei:  # the slots left out: a constant share (module doc)
        pad = _left_out_gr(rt, ti, ns)
        if pad is not None:
            gr += pad[first]
    A = m.axis_neuron
    M1 = m.neuron[-1]
    gr1 = gr[:, :, :A]
    block = rt.ctx.settings.desc == "block"
    fast_desc = rt.ctx.fast(xp, "desc")  # D and its backward as cuda/desc.py's kernels (se_e2_a's)
    D = rt.ctx.guarded("desc", ew.descriptor, xp, gr, A, block) if fast_desc else None
    if D is None:
        fast_desc = False
        D = xp.matmul(gr.transpose(0, 2, 1), gr1).reshape(n, M1 * A)
    if m.concat_output_tebd:
        D = xp.concatenate([D, xp.broadcast_to(rt.tebd[ti], (n, m.tebd_dim))], axis=1)
    fit = rt.fitting(ti)
    y, fcache = fit.forward(xp, D, keep=need_grad, ctx=rt.ctx)
    e = y[:, 0].astype(xp.float64) + float(rt.bias[ti])
    if not need_grad:
        return e, None
    gD = fit.backward(xp, xp.ones((n, 1), dtype=dt), fcache, ctx=rt.ctx)[:, : M1 * A].reshape(n, M1, A)
    ggr = None
    if fast_desc:
        ggr = rt.ctx.guarded("desc", ew.descriptor_grad, xp, gr, xp.ascontiguousarray(gD), 1.0 / nnei, block)
    if ggr is None:
        ggr = xp.matmul(gr1, gD.transpose(0, 2, 1))  # (n, 4, M1)
        ggr[:, :, :A] += xp.matmul(gr, gD)
        ggr *= 1.0 / nnei
    gsw = gs0 = gu = None
    if kern is not None:  # every slot written: gRn and gw = dL/dw
        gRn, gw = xp.empty((n, ns, 4), dtype=dt), xp.empty((n, ns), dtype=dt)
        kern.backward(Rn_c, xp.ascontiguousarray(ggr), 0, ns, gRn, w, krow, gw)
        if m.smooth:
            gsw = gw.astype(xp.float64)
    else:
        ggr = xp.ascontiguousarray(ggr)
        gG = _prod(rt, Rn_c, ggr)  # (n, nnei, M1)
        gRn = _prod(rt, G, ggr, tb=True)  # (n, nnei, 4)
        if acache is not None:
            from dpsnake.engine.attn.attention import attention_backward

            gG, gu, gsa = attention_backward(rt.attention, acache, gG)
            gsw = gsa[..., 0].astype(xp.float64)
        if m.tebd_mode == "concat":
            gs0 = rt.embedding.backward(xp, gG, ecache, ctx=rt.ctx)[..., 0]
        else:
            if sn is not None:
                gs0, gt_sw = sn.backward(Rn_c, gG, rt.strip_table, trow, wsm)
            else:
                if gate is not None:
                    gin, gt_sw = gate.backward(gG, Gs, rt.strip_table, trow, wsm)
                else:
                    gin = gG * gt1
                    gt_sw = xp.einsum("nsm,nsm->ns", gG * Gs, tt) if m.smooth else None
                gs0 = rt.embedding.backward(xp, gin, ecache, ctx=rt.ctx)[..., 0]
            if m.smooth:  # swm = sw * mask enters the smooth type gate (and the attention)
                gt_sw = gt_sw.astype(xp.float64)
                gsw = gt_sw if gsw is None else gsw + gt_sw
    return e, attn_env.backward(rt, ti, env, d, valid, mask, gRn, gs0, gu, gsw)
