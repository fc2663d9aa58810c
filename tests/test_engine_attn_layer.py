"""The whole-layer attention kernels (cuda/attn_layer.cu) = attention.py's array code, no GPU needed: the kernels run
by tests/attn_layer_emu.py (g++, threaded warps, emulated ``mma``) with exact FP32 products (TF32's layout, the
weights unrounded: the tests see the kernels' logic, not the rounding; that is test_engine_attn_layer_precision.py);
the packing, checks and constants of cuda/attn_layer.py; NVRTC for sm_90. On a GPU: this file's GPU test and
tests/test_engine_attn_gpu.py."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest
from attn_layer_emu import Emu, chain, two_layer_case
from engine_helpers import rel_err

from dpsnake.engine.attn import attention as att
from dpsnake.engine.cuda import attn_layer


def _run(tmp_path, p, lw, x, mask, r, sw, grid):
    """The emulated kernel's output for one layer's input x (B, n, E) FP32."""
    return Emu(tmp_path, p, x.shape[1], x.shape[2], lw.H, keep=False).forward(lw, x, mask, r, sw, grid)


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
    p, inputs, dG_out, (want, want_dG, want_dr, want_dsw) = two_layer_case(
        monkeypatch, dotr, normalize, smooth, ns, H=H, E=E, extra=extra
    )
    G, mask = inputs[:2]
    emu = Emu(tmp_path, p, G.shape[1], G.shape[2], p.hidden_dim, wring=wring, wdeep=wdeep)
    lws = [attn_layer.LayerWeights.of(layer, np, round_tf32=False) for layer in p.layers]
    _, x, caches, dx, dsw, dr = chain(emu, lws, inputs, dG_out)
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
    p, inputs, dG_out, (want, want_dG, want_dr, want_dsw) = two_layer_case(
        monkeypatch, dotr, normalize, smooth, ns, H=H, E=E
    )
    G, mask, r, sw = inputs
    n = G.shape[1]
    emu = Emu(tmp_path, p, n, E, H, wring=wring)
    alone = Emu(tmp_path, p, n, E, H, keep=False, wring=wring)
    lws = [attn_layer.LayerWeights.of(layer, np, round_tf32=False) for layer in p.layers]
    xs, x, _, dx, dsw, dr = chain(emu, lws, inputs, dG_out, bwd_grid=5)
    for lw, xin, xout in zip(lws, xs, xs[1:] + [x]):
        assert rel_err(alone.forward(lw, xin, mask, r, sw, grid=5), xout) < 1e-6
    assert rel_err(x, want) < 2e-6
    assert rel_err(dx, want_dG) < 2e-6, rel_err(dx, want_dG)
    assert (rel_err(dsw, want_dsw[..., 0]) < 2e-6) if smooth else not dsw.any()
    assert (rel_err(dr, want_dr) < 2e-6) if dotr else not dr.any()


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")
@pytest.mark.parametrize("dotr,normalize,smooth,ns,pref", [(True, True, True, 27, 0), (False, True, False, 19, 1)])
def test_layer_kernels_with_ex2_equal_array_code(tmp_path, monkeypatch, dotr, normalize, smooth, ns, pref):
    """EX2 (settings attn_ex2): the softmax as 2^(L log2 e - max log2 e), in the forward and the backward's
    recomputed softmax; smooth with left-out slots (NPAD) and masked keys without it: the output and df/dG, df/dr,
    df/dsw = the FP64 array code to 4e-6 (the FFMA's rounding of max log2 e adds ~1e-6 to T); with PREF (its
    prefetches no-ops here) too."""
    p, inputs, dG_out, (want, want_dG, want_dr, want_dsw) = two_layer_case(monkeypatch, dotr, normalize, smooth, ns)
    G, mask = inputs[:2]
    emu = Emu(tmp_path, p, G.shape[1], G.shape[2], p.hidden_dim, ex2=1, pref=pref)
    assert emu.defs["EX2"] == 1 and (emu.defs["NPAD"] > 0) == smooth
    lws = [attn_layer.LayerWeights.of(layer, np, round_tf32=False) for layer in p.layers]
    _, x, _, dx, dsw, dr = chain(emu, lws, inputs, dG_out)
    assert rel_err(x, want) < 4e-6
    assert rel_err(dx, want_dG) < 4e-6, rel_err(dx, want_dG)
    assert (rel_err(dsw, want_dsw[..., 0]) < 4e-6) if smooth else not dsw.any()
    assert (rel_err(dr, want_dr) < 4e-6) if dotr else not dr.any()


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
    attn_layer._check(lw, x, sw, r, mask, xh=(x.astype(np.float16), np.float16))  # XH's cache
    with pytest.raises(ValueError, match="float32.*expected float16"):
        attn_layer._check(lw, x, sw, r, mask, xh=(x, np.float16))


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
    assert (d["WRING"], d["WDEEP"], d["BRING"], d["YH"]) == (1, 1, 0, 1)
    assert alone["KEEP"] == 0 and (alone["WRING"], alone["WDEEP"], alone["YH"]) == (1, 1, 0)
    assert attn_layer.defines(88, 100, 128, 1, 1, 0, 120)["YH"] == 0  # FP32 where q, k, v are not unit rows
    assert attn_layer.defines(88, 100, 128, 1, 1, 1, 120, smem_per_sm=164 * 1024)["MINB"] == 1  # sm_80: one block
    assert d["F16"] == alone["F16"] == d["B16"] == 1 and d["FMINB"] == d["MINB"]  # FP16 products where H % 16 == 0
    assert d["EX2"] == alone["EX2"] == 0  # expf unless settings attn_ex2 (_Rows.extra)
    assert d["XH"] == d["PREF"] == 0  # settings attn_xhat16, attn_prefetch
    if importlib.util.find_spec("cupy") is None:  # nothing compiled in a process without CuPy
        assert attn_layer.compiled_modules() == 0
    assert (
        attn_layer.defines(88, 100, 120, 1, 1, 1, 120)["F16"]
        == attn_layer.defines(88, 100, 120, 1, 1, 1, 120)["B16"]
        == 0
    )
    assert attn_layer.smem_bytes(96, 128, f16=True) == 2 * 2 * 96 * 136 + 4 * 5 * 96  # k, v (F16); sw, r, mask
    assert attn_layer.smem_bytes(96, 128, True, f16=True) == 2 * 2 * 96 * (136 + 104)  # k, v; A, dL (B16)
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
    # EX2 (settings attn_ex2): the softmax's exp one ex2.approx each, without expf's range steps
    if n == 27 and H == 32:
        defs = attn_layer.defines(n, E, H, *flags[0], 120)
        ptx, ex2 = (compile_cuda(attn_layer.source(**(defs | {"EX2": e}))) for e in (0, 1))
        assert ".entry attn_layer_bwd" in ex2 and ex2.count("ex2.approx.ftz.f32") == ptx.count("ex2.approx.ftz.f32")
        assert len(ex2.splitlines()) < len(ptx.splitlines()) - 100, (len(ex2.splitlines()), len(ptx.splitlines()))
        # XH: xhat kept in FP16: its pairs stored and loaded as 4 bytes (E 20: 3 column tiles x 2 rows) not 8
        xh = compile_cuda(attn_layer.source(**(defs | {"EX2": 1, "XH": 1})))
        assert ".entry attn_layer_bwd" in xh
        assert xh.count("st.global.v2.f32") == ex2.count("st.global.v2.f32") - 6
        assert xh.count("ld.global.nc.v2.f32") == ex2.count("ld.global.nc.v2.f32") - 6
        # PREF: the next centre's x toward L2, in the forward only (the backward's prefetch measured slower)
        pref = compile_cuda(attn_layer.source(**(defs | {"EX2": 1, "PREF": 1})))
        entry = {e.split("(")[0].strip(): e for e in pref.split(".entry ")[1:]}  # kernel name -> its PTX
        assert "prefetch.global.L2" not in ex2 and "prefetch.global.L2" in entry["attn_layer_fwd"]
        assert "prefetch.global.L2" not in entry["attn_layer_bwd"]


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

    def __init__(self, tmp_path, p, n, E, H, ex2=0):
        self.emu = Emu(tmp_path, p, n, E, H, ex2=ex2)  # a force call's kernels
        self.calls = 0

    def forward(self, lw, x, sw, r, mask, scale, smooth, dotr, normalize, nnei, keep=False, extra=()):
        assert keep, "the forward alone is its own module (KEEP 0)"
        assert dict(extra).get("EX2", 0) == self.emu.defs["EX2"], extra  # _Rows.extra reaches the kernels
        self.calls += 1
        return self.emu.forward(lw, x, mask, r, sw, grid=3, keep=keep)

    def backward(self, lw, cache, dout, sw, r, mask, scale, smooth, dotr, normalize, nnei, dsw, dr, extra=()):
        assert dict(extra).get("EX2", 0) == self.emu.defs["EX2"], extra
        self.calls += 1
        return self.emu.backward(lw, cache, dout, mask, r, sw, 3, dsw, dr)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")
@pytest.mark.parametrize("dotr,normalize,smooth,ns,ex2", [(True, True, True, 40, 0), (False, True, False, 48, 0),
                                                         (True, True, True, 40, 1)])  # fmt: skip
def test_attention_block_on_the_layer_kernels_equals_array_code(tmp_path, monkeypatch, dotr, normalize, smooth, ns,
                                                                ex2):  # fmt: skip
    """attention_forward / attention_backward of two FP32 layers with ``_Rows.layer`` set (the path mixed + TF32
    takes on a GPU): both layers run in the layer kernels, forward and backward, = the FP64 array code; with EX2
    (``_Rows.extra`` as settings attn_ex2 makes it) too, to 4e-6."""
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
    emu.layer = _EmuLayerModule(tmp_path, p32, ns, 20, 32, ex2=ex2)
    emu.extra = (("EX2", 1),) if ex2 else ()  # what _Rows.make sets with settings attn_ex2
    monkeypatch.setattr(att._Rows, "make", staticmethod(lambda *a, **k: emu))
    emu.weights = att._Rows.weights.__get__(emu)
    got, cache = att.attention_forward(p32, G.astype(np.float32), mask, r, sw)
    got_b = att.attention_backward(p32, cache, dG_out.astype(np.float32))
    assert emu.layer.calls == 4  # both layers, forward and backward
    tol = 4e-6 if ex2 else 2e-6
    assert got.dtype == np.float32 and rel_err(got, want) < tol
    for g, w in zip(got_b, want_b):
        assert g.shape == w.shape and rel_err(g, w) < tol
