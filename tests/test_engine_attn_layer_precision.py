"""The whole-layer attention kernels' reduced-precision operands, no GPU needed (tests/attn_layer_emu.py: g++,
threaded warps, emulated ``mma``): q, k, v kept in FP16 (YH), operands rounded as cvt.rna rounds to TF32, the
products on FP16 operands (F16, B16) with the backward's gradient scale, xhat kept in FP16 (XH); pack_b16's and
tf32_round's bits. The
kernels' logic with exact products: test_engine_attn_layer.py."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from attn_layer_emu import Emu, chain, two_layer_case
from engine_helpers import rel_err

from dpsnake.engine.cuda import attn_layer


def _rounded_entry_chain(e16, e32, lws, inputs, dG_out, k):
    """Two layers forward and backward with ``e16``, whose cache entry ``k`` is FP16 where ``e32``'s is FP32: that
    entry is e32's rounded to FP16 (bit for bit), every other entry and the output equal; the last layer's backward
    from it equals e32's from its entry rounded (to the last bits of the kernel's shared-memory atomics: d sw, d r
    and the p's of dx sum in any order). Returns e16's (out, df/dG, df/dsw, df/dr)."""
    _, mask, r, sw = inputs
    xs, x, caches, dx, dsw, dr = chain(e16, lws, inputs, dG_out)
    for lw, xin, xout, c16 in zip(lws, xs, xs[1:] + [x], caches):
        out32, c32 = e32.forward(lw, xin, mask, r, sw, grid=3, keep=True)
        assert c16[k].dtype == np.float16 and c32[k].dtype == np.float32
        assert np.array_equal(c16[k].view(np.uint16), c32[k].astype(np.float16).view(np.uint16))
        assert np.array_equal(xout, out32) and all(np.array_equal(c16[j], c32[j]) for j in range(4) if j != k)
    lw, c16 = lws[-1], caches[-1]
    _, c32 = e32.forward(lw, xs[-1], mask, r, sw, grid=3, keep=True)
    c32[k] = c32[k].astype(np.float16).astype(np.float32)
    z = [np.zeros(a.shape, np.float32) for a in (mask, r, mask, r)]
    b16 = e16.backward(lw, c16, dG_out.astype(np.float32), mask, r, sw, 5, z[0], z[1])
    b32 = e32.backward(lw, c32, dG_out.astype(np.float32), mask, r, sw, 5, z[2], z[3])
    assert rel_err(b16, b32) < 1e-6 and rel_err(z[0], z[2]) < 1e-6 and rel_err(z[1], z[3]) < 1e-6
    return x, dx, dsw, dr


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
    p, inputs, dG_out, (want, want_dG, want_dr, want_dsw) = two_layer_case(
        monkeypatch, dotr, True, smooth, ns, H=H, E=E
    )
    n = inputs[0].shape[1]
    e16, e32 = (Emu(tmp_path, p, n, E, H, wring=wring, yh=yh) for yh in (1, 0))
    assert attn_layer.defines(n, E, H, smooth, dotr, True, p.nnei)["YH"] == 1  # the engine's build
    lws = [attn_layer.LayerWeights.of(layer, np, round_tf32=False) for layer in p.layers]
    x, dx, dsw, dr = _rounded_entry_chain(e16, e32, lws, inputs, dG_out, 0)  # y: entry 0
    assert rel_err(x, want) < 2e-6 and rel_err(dx, want_dG) < 1e-5, (rel_err(x, want), rel_err(dx, want_dG))
    assert (rel_err(dsw, want_dsw[..., 0]) < 1e-3) if smooth else not dsw.any()
    assert (rel_err(dr, want_dr) < 1e-3) if dotr else not dr.any()


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")
@pytest.mark.parametrize("dotr,smooth,ns,E", [(True, True, 27, 20), (False, False, 19, 19)])
def test_fp16_xhat_is_the_fp32_xhat_rounded(tmp_path, monkeypatch, dotr, smooth, ns, E):
    """XH (settings attn_xhat16): the keeping forward's xhat is the FP32 build's rounded to FP16 (bit for bit),
    everything else it writes equal; the backward from it equals the FP32 build's from that rounded xhat (to the
    atomics' last bits), and stays near the FP64 array code: df/dG moves ~1.3e-4 (~3e-6 with an FP32 xhat, exact
    products; TF32's products give ~1e-5), which is what XH costs. E 19: odd rows (xhat stored value by value)."""
    p, inputs, dG_out, (want, want_dG, want_dr, want_dsw) = two_layer_case(
        monkeypatch, dotr, True, smooth, ns, H=32, E=E
    )
    n = inputs[0].shape[1]
    e16, e32 = (Emu(tmp_path, p, n, E, 32, yh=None, xh=xh) for xh in (1, 0))
    lws = [attn_layer.LayerWeights.of(layer, np, round_tf32=False) for layer in p.layers]
    x, dx, dsw, dr = _rounded_entry_chain(e16, e32, lws, inputs, dG_out, 2)  # xhat: entry 2
    errs = [rel_err(x, want), rel_err(dx, want_dG)]
    errs += [rel_err(dr, want_dr) if dotr else 0.0, rel_err(dsw, want_dsw[..., 0]) if smooth else 0.0]
    print("XH errors vs FP64 (out, dG, dr, dsw)", [f"{e:.1e}" for e in errs])
    assert errs[0] < 2e-6 and errs[1] < 3e-4 and errs[2] < 1e-3 and errs[3] < 2e-3, errs  # dG 1.2e-4, 1.4e-4


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")
def test_layer_kernels_within_tf32_rounding(tmp_path, monkeypatch):
    """The kernels' precision without a GPU: operands rounded as cvt.rna does and the weights as
    LayerWeights.of rounds them, two layers forward (keeping, q, k, v in FP16 as the engine's build) and backward
    vs the FP64 array code. The bounds are ~4x what this emulation gives (out 2.9e-5, df/dG 1.1e-5, df/dr 2.3e-4,
    df/dsw 5.5e-4, the same to 1% with an FP32 y and with session 31's kernels; on an H100 the cuBLAS TF32 path at
    the bench's shape: 1.5e-5, 2.3e-5, 5.3e-4, 4.6e-4), and exact operands give < 2e-6 (tests above): the rounding
    is what is measured."""
    p, inputs, dG_out, (want, want_dG, want_dr, want_dsw) = two_layer_case(monkeypatch, True, True, True, 40, nb=6)
    G = inputs[0]
    emu = Emu(tmp_path, p, G.shape[1], G.shape[2], p.hidden_dim, tf32=True, yh=None)
    assert emu.defs["YH"] == 1
    lws = [attn_layer.LayerWeights.of(layer, np) for layer in p.layers]
    _, x, _, dx, dsw, dr = chain(emu, lws, inputs, dG_out)
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
    p, inputs, dG_out, (want, want_dG, want_dr, want_dsw) = two_layer_case(
        monkeypatch, dotr, normalize, smooth, ns, H=H, E=E, nb=6
    )
    G = inputs[0]
    d = attn_layer.defines(G.shape[1], E, H, smooth, dotr, normalize, p.nnei)
    assert d["F16"] == d["B16"] == 1
    lws = [attn_layer.LayerWeights.of(layer, np) for layer in p.layers]
    errs = {}
    for h in (1, 0):
        emu = Emu(tmp_path, p, G.shape[1], E, H, tf32=True, yh=None, f16=h, b16=h, wring=wring, wdeep=wring)
        xs, x, caches, dx, dsw, dr = chain(emu, lws, inputs, dG_out)
        assert np.isfinite(caches[0][0][:, inputs[1]]).all()
        errs[h] = [rel_err(x, want), rel_err(dx, want_dG)]
        errs[h] += [rel_err(dr, want_dr) if dotr else 0.0, rel_err(dsw, want_dsw[..., 0]) if smooth else 0.0]
        if h:
            alone = Emu(tmp_path, p, G.shape[1], E, H, keep=False, tf32=True, f16=1)
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
    p, inputs, dG_out, _ = two_layer_case(monkeypatch, True, True, True, 40)
    G, mask, r, sw = inputs
    emu = Emu(tmp_path, p, G.shape[1], G.shape[2], p.hidden_dim, tf32=True, yh=None, f16=1, b16=1)
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


def test_tf32_round_is_cvt_rna():
    """10 mantissa bits, to nearest, ties away from zero; exactly representable values unchanged."""
    a = np.array([1.0, 1.0 + 2.0**-11, -(1.0 + 2.0**-11), 1.0 + 2.0**-12, 3.0 * 2.0**-10], dtype=np.float32)
    got = attn_layer.tf32_round(a)
    assert got.tolist() == [1.0, 1.0 + 2.0**-10, -(1.0 + 2.0**-10), 1.0, 3.0 * 2.0**-10]
