"""The strip-mode geometric net + type gate kernels of se_atten / se_atten_v2 (cuda/strip_net.py) = the array
code (nets.py and the gate), no GPU needed: the generated source compiled with g++ and run with threaded
32-lane warps (the kernels alone, and inside a whole batched evaluation of trained models), and compiled for
sm_90 with NVRTC (ptxas: registers and spills). On a GPU: tests/test_engine_attn_gpu.py."""

from __future__ import annotations

import ctypes
import shutil

import numpy as np
import pytest
from engine_helpers import THREADED_CUDA_STUB, build_cpp, rel_err
from test_engine_attn import attn_model, flat, systems

from dpsnake.engine.nets import Layer, Net

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")

# the kernels' dynamic shared memory (one buffer here) and __syncwarp (the warp's barrier)
PRELUDE = r"""
alignas(16) unsigned char smem_[1 << 20];
static void __syncwarp() { WBAR[threadIdx.x / 32]->arrive_and_wait(); }
"""
LAUNCH = r"""
extern "C" void fwd(unsigned g, const T* Rn, long long slots, const T* W, const T* t, const int* row, const T* w,
                    int hw, T* G) {
  launch(g, 32 * WPB, [=] { strip_net_fwd(Rn, slots, W, t, row, w, hw, G); });
}
extern "C" void bwd(unsigned g, const T* Rn, long long slots, const T* W, const T* t, const int* row, const T* w,
                    int hw, const T* gG, T* gs, T* gw) {
  launch(g, 32 * WPB, [=] { strip_net_bwd(Rn, slots, W, t, row, w, hw, gG, gs, gw); });
}
"""


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


class _EmuStripNet:
    """strip_net.StripNet's forward / backward with the kernels run by g++ with threaded warps (NumPy arrays)."""

    def __init__(self, tmp_path, net, dtype: str, grid: int = 3, pair: bool = False):
        from dpsnake.engine.cuda import strip_net

        spec = strip_net._Spec(net, 4 if dtype == "float32" else 2)
        src = strip_net.source(spec, dtype, pair).replace("extern __shared__ __align__(16) unsigned char smem_[];", "")
        tag = f"snet_{dtype}_{'_'.join(map(str, spec.sizes))}_{id(net) % 10**6}_{int(pair)}"
        self.lib = build_cpp(tmp_path, tag, THREADED_CUDA_STUB + PRELUDE + src + LAUNCH)
        self.dtype, self.M, self.grid, self.calls = np.dtype(dtype), spec.sizes[-1], grid, 0
        self.w = spec.pack(net).astype(self.dtype)

    def _args(self, Rn, table, row, w):
        Rn = np.ascontiguousarray(Rn, dtype=self.dtype)
        row = np.ascontiguousarray(row, dtype=np.int32)
        wa = Rn if w is None else np.ascontiguousarray(w, dtype=self.dtype)
        t = np.ascontiguousarray(table, dtype=self.dtype)
        args = (ctypes.c_longlong(Rn.size // 4), _ptr(self.w), _ptr(t), _ptr(row), _ptr(wa), int(w is not None))
        return Rn, args, (t, row, wa)  # the third: the arrays the pointers point into, alive until the call

    def forward(self, Rn, table, row, w):
        Rn, args, keep = self._args(Rn, table, row, w)
        G = np.full((*Rn.shape[:-1], self.M), np.nan, dtype=self.dtype)
        self.lib.fwd(self.grid, _ptr(Rn), *args, _ptr(G))
        self.calls += 1
        return G

    def backward(self, Rn, gG, table, row, w):
        Rn, args, keep = self._args(Rn, table, row, w)
        gG = np.ascontiguousarray(gG, dtype=self.dtype)
        gs = np.full(Rn.shape[:-1], np.nan, dtype=self.dtype)
        gw = np.full(Rn.shape[:-1], np.nan, dtype=self.dtype)
        self.lib.bwd(self.grid, _ptr(Rn), *args, _ptr(gG), _ptr(gs), _ptr(gw))
        self.calls += 1
        return gs, (gw if w is not None else None)


def _trained_net(model_cache):
    from dpsnake.engine.attn.ensemble import AttnEnsemble

    return AttnEnsemble([str(attn_model(model_cache, "v2_l2")["dp"])]).models[0].embedding


def _nets(model_cache):
    rng = np.random.default_rng(3)

    def lay(i, o, act, idt=True, res=True):
        return Layer(
            rng.normal(size=(i, o)) * 0.5, rng.normal(size=o) * 0.1, rng.normal(size=o) if idt else None, act, res
        )

    return {
        "trained v2": _trained_net(model_cache),
        "tanh [25, 50, 100], idt on every layer (DeePMD-kit's default size: 32-column chunks, the last of 4)": Net(
            [lay(1, 25, "tanh"), lay(25, 50, "tanh"), lay(50, 100, "tanh")]
        ),
        "gelu [6, 12, 24], idt on the last layer": Net([lay(1, 6, "gelu"), lay(6, 12, "gelu"), lay(12, 24, "gelu")]),
        "silut [8, 8, 40], no idt on the last layer": Net(
            [lay(1, 8, "silut:1.5"), lay(8, 8, "silut:1.5"), lay(8, 40, "silut:1.5", idt=False, res=False)]
        ),
        "one layer, 36 wide": Net([lay(1, 36, "tanh")]),
    }


def _reference(net, Rn, table, row, w, gG):
    """G, dL/ds, dL/dw from nets.py and the gate's array code (attn/descriptor.py), in the arrays' dtype."""
    dt = Rn.dtype
    netc = net.to(np, dt)
    Gs, cache = netc.forward(np, Rn[..., 0:1])
    tt = table[row]
    gt = tt * w[..., None] if w is not None else tt
    G = Gs * gt + Gs
    gs = netc.backward(np, gG * (gt + 1), cache)[..., 0]
    return G, gs, (gG * Gs * tt).sum(axis=-1)


@needs_gxx
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_strip_net_kernels_match_array_code(tmp_path, model_cache, dtype):
    """G = net(s) (1 + T[row] w), dL/ds and dL/dw (with w) of the kernels = nets.py + the gate: 3 x 45 slots (the
    last warp partly empty), grids of 1 and 3 blocks (grid-stride), with and without w, several net shapes; the
    forward also with two slots per thread (``pair``: a block's round is 256 slots, so warp 2's a half is partly
    and its b half wholly empty, warp 3 idle; grid 3: blocks without slots)."""
    rng = np.random.default_rng(4)
    tol = 3e-5 if dtype == "float32" else 1e-12
    for name, net in _nets(model_cache).items():
        M = net.nout
        Rn = rng.normal(size=(3, 45, 4)).astype(dtype)
        table = rng.normal(size=(6, M)).astype(dtype)
        row = rng.integers(0, 6, size=(3, 45))
        gG = rng.normal(size=(3, 45, M)).astype(dtype)
        wv = np.where(rng.uniform(size=(3, 45)) < 0.3, 0.0, rng.uniform(size=(3, 45))).astype(dtype)
        for grid in (1, 3):
            emu = _EmuStripNet(tmp_path, net, dtype, grid)
            pair = _EmuStripNet(tmp_path, net, dtype, grid, pair=True)
            for w in (wv, None):
                G, gs, gw = _reference(net, Rn, table, row, w, gG)
                assert rel_err(emu.forward(Rn, table, row, w), G) < tol, (name, grid, w is None)
                assert rel_err(pair.forward(Rn, table, row, w), G) < tol, (name, grid, w is None, "pair")
                got_gs, got_gw = emu.backward(Rn, gG, table, row, w)
                assert rel_err(got_gs, gs) < tol, (name, grid, w is None, "ds")
                if w is None:
                    assert got_gw is None
                else:
                    assert rel_err(got_gw, gw) < tol, (name, grid, "dw")


@needs_gxx
@pytest.mark.parametrize("name", ["v2_l2", "strip_l2"])
def test_engine_on_the_strip_net_kernels_equals_array_code(tmp_path, monkeypatch, model_cache, name):
    """A whole batched evaluation (energies, forces, virials, atomic ones) of a trained strip model with its
    geometric net and gate on the emulated kernels = the array code to 1e-12: smooth (v2_l2) and not,
    one-sided (strip_l2)."""
    from dpsnake.engine.attn import descriptor
    from dpsnake.engine.attn.ensemble import AttnEnsemble
    from dpsnake.engine.settings import EngineSettings

    m = attn_model(model_cache, name)
    ens = AttnEnsemble([str(m["dp"])])
    batch = flat(systems(ens.type_map)[:4], ens.type_map)
    want = ens.evaluate(*batch, atomic=True)
    emus = []

    def emulated(model, xp, dtype, ctx):
        emus.append(_EmuStripNet(tmp_path, model.embedding, dtype))
        return emus[-1]

    monkeypatch.setattr(descriptor, "_strip_net", emulated)
    got = AttnEnsemble([str(m["dp"])], settings=EngineSettings(cpu_workers=1)).evaluate(*batch, atomic=True)
    assert len(emus) == 1 and emus[0].calls >= 4  # forward and backward of each centre type's chunk
    for k in ("energy", "force", "virial", "atom_energy", "atom_virial"):
        assert rel_err(got[k], want[k]) < 1e-12, k


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_strip_net_kernels_compile_for_sm90(model_cache, dtype):
    """The generated source of DeePMD-kit's example-size net compiles for sm_90; where ptxas is at hand, the
    FP32 kernels do not spill more than fused.py's backward (its 168-register bound)."""
    pytest.importorskip("nvidia.cuda_nvrtc")
    from test_engine_cuda_compile import compile_cuda

    from dpsnake.engine.cuda import ptx, strip_net

    net = _trained_net(model_cache)
    assert strip_net.supported(net, dtype) is None
    src = strip_net.source(strip_net._Spec(net, 4 if dtype == "float32" else 2), dtype)
    text = compile_cuda(src)
    assert ".entry strip_net_fwd" in text and ".entry strip_net_bwd" in text
    if dtype == "float32" and ptx.find_ptxas() is not None:
        st = ptx.ptxas_stats(src)
        assert st["strip_net_fwd"]["spill_stores"] == 0, st
        assert st["strip_net_bwd"]["registers"] <= 168 and st["strip_net_bwd"]["spill_stores"] <= 64, st


# the tensor-core kernels (cuda/strip_net_tc.py): attn_layer_emu.py's emulated mma.m16n8k8 (exact
# products of the TF32 operands as given: the weights come TF32-rounded, so the reference net takes them so)
TC_PRELUDE = r"""
static int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
"""
TC_LAUNCH = r"""
extern "C" void fwd(unsigned g, const T* Rn, long long slots, const float* prm, const T* t, const int* row,
                    const T* w, int hw, T* G) {
  launch(g, 32 * WPB, [=] { snet_tc_fwd(Rn, slots, prm, t, row, w, hw, G); });
}
extern "C" void bwd(unsigned g, const T* Rn, long long slots, const float* prm, const T* t, const int* row,
                    const T* w, int hw, const T* gG, T* gs, T* gw) {
  launch(g, 32 * WPB, [=] { snet_tc_bwd(Rn, slots, prm, t, row, w, hw, gG, gs, gw); });
}
"""


class _EmuStripNetTC(_EmuStripNet):
    """strip_net_tc.StripNetTC's forward / backward with the kernels run by g++ (threaded warps, emulated mma)."""

    def __init__(self, tmp_path, net, grid: int = 3, direct: bool = False, fwd_ch: int = 2):
        from attn_layer_emu import EMU

        from dpsnake.engine.cuda import strip_net_tc

        plan = strip_net_tc.Plan(net)
        src = strip_net_tc.source(plan, direct=direct, fwd_ch=fwd_ch).replace(
            "extern __shared__ __align__(16) float P[];", "static float P[1 << 16];"
        )
        tag = f"snet_tc_{'_'.join(map(str, plan.width))}_{id(net) % 10**6}_{int(direct)}_{fwd_ch}"
        self.lib = build_cpp(tmp_path, tag, THREADED_CUDA_STUB + EMU + TC_PRELUDE + src + TC_LAUNCH)
        self.dtype, self.M, self.grid, self.calls = np.dtype(np.float32), plan.M, grid, 0
        self.w = plan.params


def _tf32_net(net):
    """``net`` with the weights of every layer after the first rounded to TF32 (as strip_net_tc packs them)."""
    from dpsnake.engine.cuda.attn_layer import tf32_round

    layers = [
        Layer(l.w if k == 0 else tf32_round(np.asarray(l.w)).astype(np.float64), l.b, l.idt, l.activation, l.resnet)
        for k, l in enumerate(net.layers)
    ]
    return Net(layers)


@needs_gxx
def test_strip_net_tc_kernels_match_array_code(tmp_path, model_cache):
    """The tensor-core kernels = nets.py + the gate on the same (TF32-rounded) weights, FP32: 3 x 45 slots (the last
    warp's 16 partly empty), grids of 1 and 3 blocks, with and without w, G and gG through the tiles or ``direct``
    (its forward also on 4 n tiles per chunk), the nets of the FP32-FMA test but the one-layer one (resnet doubling
    and identity, idt or not, widths not multiples of 8)."""
    rng = np.random.default_rng(5)
    nets = {k: v for k, v in _nets(model_cache).items() if len(v.layers) > 1}
    nets["identity residual [8, 8, 16]"] = Net(
        [Layer(rng.normal(size=(1, k)), rng.normal(size=k), None, "tanh", True) for k in (8,)]
        + [Layer(rng.normal(size=(8, 8)) * 0.5, rng.normal(size=8), None, "tanh", True)]
        + [Layer(rng.normal(size=(8, 16)) * 0.5, None, rng.normal(size=16), "tanh", True)]
    )
    for name, net in nets.items():
        M = net.nout
        Rn = rng.normal(size=(3, 45, 4)).astype(np.float32)
        table = rng.normal(size=(6, M)).astype(np.float32)
        row = rng.integers(0, 6, size=(3, 45))
        gG = rng.normal(size=(3, 45, M)).astype(np.float32)
        wv = np.where(rng.uniform(size=(3, 45)) < 0.3, 0.0, rng.uniform(size=(3, 45))).astype(np.float32)
        ref_net = _tf32_net(net)
        for grid, direct, ch in ((1, False, 2), (3, False, 2), (1, True, 2), (3, True, 4)):
            emu = _EmuStripNetTC(tmp_path, net, grid, direct, ch)
            for w in (wv, None):
                G, gs, gw = _reference(ref_net, Rn, table, row, w, gG)
                assert rel_err(emu.forward(Rn, table, row, w), G) < 3e-5, (name, grid, w is None)
                got_gs, got_gw = emu.backward(Rn, gG, table, row, w)
                assert rel_err(got_gs, gs) < 3e-5, (name, grid, w is None, "ds", rel_err(got_gs, gs))
                if w is None:
                    assert got_gw is None
                else:
                    assert rel_err(got_gw, gw) < 3e-5, (name, grid, "dw")
