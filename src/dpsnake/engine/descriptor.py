"""se_e2_a descriptor + ener fitting: atomic energies and dE/dd for a chunk of same-type centres.

Forward (per centre, nnei = sum(sel) slots, DeePMD-kit's definitions):
  sw(r) quintic switch; R = sw [1/(r+p), d/(r+p)^2] (0 in empty slots); Rn = (R - davg) / dstd;
  descriptor exclude_types zero Rn rows of real neighbours; G = embed(Rn[:, 0]) (nnei, M1);
  gr = Rn^T G / nnei (4, M1); D = gr^T gr[:, :axis] (M1*axis); E = fit(D) + bias.
Backward by hand (reverse mode) to g = dE/dd (n, nnei, 3), in FP64 for the geometry. The nets run in
the runtime dtype (float64, or float32 in mixed precision).

Compact slots: the arrays may hold only the first ``kept[t]`` slots of each type block (``Slots``).
The slots dropped are empty for every centre of the chunk; an empty slot still adds the constant
Rn_pad^T G(Rn_pad) to gr (Rn_pad = -davg / dstd), so that constant is added back once per block
(``RuntimeModel.pad_tail``) and nothing of the geometry depends on it. For Cu at sel 152 about half
of the slots are empty, and the nets, env matrix and scatter then run on half the slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpsnake.engine import envmat
from dpsnake.engine.cuda import elementwise as ew
from dpsnake.engine.model import DPModel
from dpsnake.engine.settings import EngineContext
from dpsnake.engine.tabulate import build_tables


@dataclass
class RuntimeModel:
    """A :class:`DPModel` with weights moved to namespace ``xp`` and cast to the net dtype, run
    with the kernels and state of ``ctx`` (the ensemble's EngineContext)."""

    model: DPModel
    xp: object
    dtype: object
    davg: object  # (ntypes, nnei, 4) float64
    rstd: object  # 1 / dstd, float64
    embeddings: list
    fittings: list
    bias: np.ndarray
    fused: list | None = None  # FusedNet per embedding net (CUDA) or None
    # the same with FusedNets also for nets fused only in chunks of at most small_max centres (FP64)
    fused_small: list | None = None
    small_max: int = 0
    ctx: EngineContext | None = None
    _tails: dict | None = None
    _cols: dict | None = None

    @classmethod
    def build(cls, model: DPModel, xp, dtype, compress=None, ctx=None):
        """``compress``: a :class:`~dpsnake.engine.tabulate.Compression` to run tabulated
        embedding nets (DeePMD-kit's model compression), or None for the nets themselves.
        ``ctx``: the EngineContext (settings) to run with; a default one if None."""
        ctx = EngineContext.of(ctx)
        st = ctx.settings
        fused = None
        name = np.dtype(dtype).name
        embeddings = [None if n is None else n.to(xp, dtype) for n in model.embeddings]
        tables = [None] * len(embeddings)
        if compress is not None:
            tables = build_tables(model, compress)
            embeddings = [e if t is None else t.to(xp, dtype) for e, t in zip(embeddings, tables)]
            if ctx.tab_kernels(xp):
                from dpsnake.engine.cuda.tab import TabKernels

                fused = [TabKernels(e, name, st.tab_lps) if t is not None else None for e, t in zip(embeddings, tables)]
        small_max = 0 if ctx.fused(xp, name) else ctx.fused_small(xp, name)
        fused_small = None
        if ctx.fused(xp, name) or small_max:
            from dpsnake.engine.cuda.fused import get_fused, supported

            # nets not tabulated (a tabulated net keeps its table, kernels or not); a net the kernels
            # cannot run (activation, shape) keeps the array code
            base = fused or [None] * len(model.embeddings)
            with_nets = [
                f
                if f is not None or t is not None or n is None or supported(n)
                else get_fused(n, name, st.fused_bwd_minb)
                for f, n, t in zip(base, model.embeddings, tables)
            ]
            if small_max:
                fused_small = with_nets
            else:
                fused = with_nets
        return cls(
            model=model,
            xp=xp,
            dtype=dtype,
            davg=xp.asarray(model.davg, dtype=xp.float64),
            rstd=xp.asarray(1.0 / model.dstd, dtype=xp.float64),
            embeddings=embeddings,
            fittings=[None if n is None else n.to(xp, dtype) for n in model.fittings],
            bias=np.asarray(model.bias, dtype=np.float64),
            fused=fused,
            fused_small=fused_small,
            small_max=small_max,
            ctx=ctx,
        )

    def kernels_for(self, n: int) -> list | None:
        """The CUDA kernels (fused or tabulated) per embedding net for a chunk of ``n`` centres, None
        where the net runs as array code; None: no kernels at all."""
        return self.fused_small if self.fused_small is not None and n <= self.small_max else self.fused

    def net_index(self, ti: int, tt: int) -> int:
        """Embedding net used by centre type ti for neighbours of type tt."""
        return tt if self.model.type_one_side else ti + self.model.ntypes * tt

    def columns(self, ti: int, slots: Slots):
        """davg, 1/dstd of centre type ti at the columns of ``slots`` (cached per kept counts)."""
        if self._cols is None or len(self._cols) > 64:
            self._cols = {}
        key = (ti, tuple(int(k) for k in slots.kept))
        if key not in self._cols:
            xp = self.xp
            xcols = slots.xcols if slots.xcols is not None else xp.asarray(slots.cols)
            self._cols[key] = (xp.ascontiguousarray(self.davg[ti][xcols]), xp.ascontiguousarray(self.rstd[ti][xcols]))
        return self._cols[key]

    def pad_tail(self, ti: int, tt: int, kept: int):
        """(4, M1) sum of Rn_pad^T G(Rn_pad) over the empty slots kept..sel[tt] of block tt (net dtype)."""
        if self._tails is None:
            self._tails = {}
        key = (ti, tt, kept)
        if key not in self._tails:
            xp, m = self.xp, self.model
            a, b = int(m.sec[tt]) + kept, int(m.sec[tt + 1])
            M1 = m.neuron[-1]
            if m.desc_exclude[ti, tt] and m.exclude_padding:  # those rows are zeroed
                tail = xp.zeros((4, M1), dtype=self.dtype)
            else:
                rn = xp.asarray((-self.model.davg[ti, a:b] / self.model.dstd[ti, a:b]).astype(self.dtype))
                G, _ = self.embeddings[self.net_index(ti, tt)].forward(xp, rn[:, 0:1], keep=False, ctx=self.ctx)
                tail = xp.matmul(rn.T, G)
            self._tails[key] = tail
        return self._tails[key]


@dataclass
class Slots:
    """Which slots the chunk arrays hold: ``cols`` (nc,) original slot of each column (NumPy, and
    ``xcols`` the same in the arrays' namespace), ``sec`` (ntypes + 1,) block bounds in columns,
    ``kept`` (ntypes,) slots kept per type block."""

    cols: np.ndarray
    sec: np.ndarray
    kept: np.ndarray
    xcols: object = None

    @classmethod
    def full(cls, sel):
        sec = np.concatenate([[0], np.cumsum(sel)]).astype(int)
        return cls(cols=np.arange(sec[-1]), sec=sec, kept=np.asarray(sel, dtype=int))

    @classmethod
    def from_counts(cls, sel, kept, xp=np):
        """Keep the first ``kept[t]`` slots of each block (kept <= sel)."""
        sec = np.concatenate([[0], np.cumsum(sel)]).astype(int)
        kept = np.minimum(np.asarray(kept, dtype=int), sel)
        cols = np.concatenate([np.arange(sec[t], sec[t] + kept[t]) for t in range(len(sel))]).astype(np.int64)
        return cls(cols=cols, sec=np.concatenate([[0], np.cumsum(kept)]).astype(int), kept=kept, xcols=xp.asarray(cols))

    @classmethod
    def cached(cls, sel, kept, xp, cache: dict):
        """:meth:`from_counts`, kept in ``cache`` (EngineContext.slots) per (sel, kept, device):
        its device columns are copied once (a copy from pageable host memory waits for the device)."""
        from dpsnake.engine.xp import device_key

        key = (tuple(int(x) for x in sel), tuple(int(x) for x in kept), *device_key(xp))
        if key not in cache:
            if len(cache) > 256:
                cache.clear()
            cache[key] = cls.from_counts(sel, kept, xp)
        return cache[key]

    def is_full(self, sel) -> bool:
        return bool(np.array_equal(self.kept, sel))


def energy_and_grad(rm: RuntimeModel, ti: int, d, valid, need_grad: bool = True, slots: Slots | None = None):
    """Atomic energies (n,) float64 and g = dE/dd (n, nc, 3) float64 for centres of type ``ti``.

    d (n, nc, 3) float64 displacements (zero in empty slots), valid (n, nc) bool; the nc columns are
    the slots ``slots`` (all nnei = sum(sel) slots if None). g is exactly 0 in empty slots (also
    for a NaN centre, so nothing leaks through them).
    """
    xp, m = rm.xp, rm.model
    n, nnei = valid.shape
    slots = Slots.full(m.sel) if slots is None else slots
    if m.atom_exclude[ti]:
        return xp.zeros(n), (xp.zeros((n, nnei, 3)) if need_grad else None)
    ctx = rm.ctx = EngineContext.of(rm.ctx)
    keep = None
    if m.desc_exclude[ti].any():
        # descriptor exclusion: zero rows of real neighbours of an excluded (ti, t) pair
        exrow = ctx.device_const(xp, m.desc_exclude[ti][np.repeat(np.arange(m.ntypes), m.sel)[slots.cols]])[None, :]
        exrow = exrow & (True if m.exclude_padding else valid)
        keep = (~exrow).astype(xp.float64)
    p = m.env_protection
    if slots.is_full(m.sel):
        davg, rstd = rm.davg[ti], rm.rstd[ti]
    else:
        davg, rstd = rm.columns(ti, slots)
    fast_env = keep is None and ctx.fast(xp, "env")
    Rn_c = env = None
    if fast_env:  # CuPy: r, switch, R, Rn in one kernel (sw, q recomputed in the backward one)
        Rn_c = ctx.guarded("env", ew.env_forward, xp, d, valid, davg, rstd, m.rcut_smth, m.rcut, p, rm.dtype)
        fast_env = Rn_c is not None
    if not fast_env:
        Rn_c, env = _env_mat(xp, rm, d, valid, keep, davg, rstd)
    return _nets(rm, ti, Rn_c, d, valid, keep, need_grad, env, slots, rstd)


def _env_mat(xp, rm, d, valid, keep, davg, rstd):
    """Array-code env matrix: Rn (n, nc, 4) in the net dtype and what the backward needs (envmat.geometry's)."""
    m = rm.model
    geo = envmat.geometry(xp, d, valid, m.rcut_smth, m.rcut, m.env_protection)
    Rn = envmat.env_rows(xp, d, geo, davg, rstd, keep)
    return xp.ascontiguousarray(Rn.astype(rm.dtype)), geo


def _nets(rm, ti, Rn_c, d, valid, keep, need_grad, env, slots, rstd):
    """Embedding, descriptor, fitting and (if need_grad) the backward pass from Rn_c."""
    xp, m, ctx = rm.xp, rm.model, rm.ctx
    n, nc = valid.shape
    nnei = m.nnei  # the normalisation counts every slot, kept or not
    sec = slots.sec
    M1 = m.neuron[-1]
    A = m.axis_neuron
    gr = xp.zeros((n, 4, M1), dtype=rm.dtype)
    kern = rm.kernels_for(n)
    Gs = []
    for tt in range(m.ntypes):
        a, b = sec[tt], sec[tt + 1]
        k = rm.net_index(ti, tt)
        if slots.kept[tt] < m.sel[tt]:
            gr += rm.pad_tail(ti, tt, int(slots.kept[tt]))
        if a == b:
            Gs.append(None)
        elif kern is not None and kern[k] is not None:  # CUDA: G never stored
            kern[k].forward(Rn_c, a, b, gr)
            Gs.append(None)
        else:
            G, cache = rm.embeddings[k].forward(xp, Rn_c[:, a:b, 0:1], keep=need_grad, ctx=ctx)
            gr += xp.matmul(Rn_c[:, a:b, :].transpose(0, 2, 1), G)
            Gs.append((G, cache))
    gr *= 1.0 / nnei
    gr1 = gr[:, :, :A]
    fast_desc = ctx.fast(xp, "desc")
    block = ctx.settings.desc == "block"
    D = ctx.guarded("desc", ew.descriptor, xp, gr, A, block) if fast_desc else None
    if D is None:
        fast_desc = False
        D = xp.matmul(gr.transpose(0, 2, 1), gr1).reshape(n, M1 * A)
    fit = rm.fittings[ti]
    with ctx.tf32(xp, rm.dtype):
        y, fcache = fit.forward(xp, D, keep=need_grad, ctx=ctx)
    e = y[:, 0].astype(xp.float64) + float(rm.bias[ti])
    if not need_grad:
        return e, None
    with ctx.tf32(xp, rm.dtype):
        gD = fit.backward(xp, xp.ones((n, 1), dtype=rm.dtype), fcache, ctx=ctx).reshape(n, M1, A)
    ggr = ctx.guarded("desc", ew.descriptor_grad, xp, gr, gD, 1.0 / nnei, block) if fast_desc else None
    if ggr is None:
        ggr = xp.matmul(gr1, gD.transpose(0, 2, 1))  # (n, 4, M1)
        ggr[:, :, :A] += xp.matmul(gr, gD)
        ggr *= 1.0 / nnei
    gRn = xp.zeros((n, nc, 4), dtype=rm.dtype)
    if kern is not None:
        ggr = xp.ascontiguousarray(ggr)
        Rn_c = xp.ascontiguousarray(Rn_c)
    for tt in range(m.ntypes):
        a, b = sec[tt], sec[tt + 1]
        if a == b:
            continue
        k = rm.net_index(ti, tt)
        if kern is not None and kern[k] is not None:
            kern[k].backward(Rn_c, ggr, a, b, gRn)
            continue
        G, cache = Gs[tt]
        net = rm.embeddings[k]
        gG = xp.matmul(Rn_c[:, a:b, :], ggr)  # (n, s, M1)
        gRn[:, a:b, :] = xp.matmul(G, ggr.transpose(0, 2, 1))
        gRn[:, a:b, 0:1] += net.backward(xp, gG, cache, ctx=ctx)
    if env is None:  # fused chain rule (CuPy); empty slots give exactly 0
        g = ctx.guarded("env", ew.env_backward, xp, gRn, d, valid, rstd, m.rcut_smth, m.rcut, m.env_protection)
        if g is not None:
            return e, g
        env = envmat.geometry(xp, d, valid, m.rcut_smth, m.rcut, m.env_protection)
    return e, envmat.env_chain(xp, gRn.astype(xp.float64), d, valid, env, rstd, keep)
