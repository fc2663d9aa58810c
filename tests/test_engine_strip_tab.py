"""The tabulated strip-mode net + gate kernels of se_atten models with attention layers (cuda/strip_tab.cu) = the
array code from the same table (tabulate.TabulatedNet + the gate), no GPU needed: the source compiled with g++ and
run with threaded 32-lane warps (the kernels alone, and in attn/descriptor.py's place of StripNet inside a whole
batched evaluation of a trained attn_layer 2 model), and compiled for sm_90 with NVRTC. On a GPU:
tests/test_engine_attn_tab_gpu.py."""

from __future__ import annotations

import ctypes
import shutil

import numpy as np
import pytest
from engine_helpers import THREADED_CUDA_STUB, build_cpp, rel_err
from test_engine_attn_tabulate import _flat, _model, _net, _systems

from dpsnake.engine.attn.ensemble import AttnEnsemble
from dpsnake.engine.settings import EngineSettings
from dpsnake.engine.tabulate import Compression, Table

LAUNCH = r"""
#define TAB_ARGS const REAL* Rn, long long slots, const REAL* coef, REAL lo, REAL up, REAL vmax, REAL s0, REAL s1, \
    int nspline, const REAL* t, const int* row, const REAL* w, int hw
#define TAB_PASS Rn, slots, coef, lo, up, vmax, s0, s1, nspline, t, row, w, hw
extern "C" void fwd(unsigned g, unsigned b, TAB_ARGS, REAL* G) {
  launch(g, b, [=] { strip_tab_fwd(TAB_PASS, G); });
}
extern "C" void bwd(unsigned g, unsigned b, TAB_ARGS, const REAL* gG, REAL* gs, REAL* gw) {
  launch(g, b, [=] { strip_tab_bwd(TAB_PASS, gG, gs, gw); });
}
"""

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


class _EmuStripTab:
    """cuda/strip_tab.py's StripTab interface on NumPy arrays, its kernels built by g++ with threaded warps."""

    def __init__(self, tmp_path, tnet, dtype: str, grid: int = 5):
        from dpsnake.engine.cuda.strip_tab import WPB, source

        self.dtype = np.dtype(dtype)
        self.coef, self.M = np.ascontiguousarray(tnet.coef, dtype=self.dtype), tnet.nout
        self.lib = build_cpp(tmp_path, f"stab_{dtype}_{self.M}", THREADED_CUDA_STUB + source(dtype, self.M) + LAUNCH)
        t, c = tnet.table, ctypes.c_float if dtype == "float32" else ctypes.c_double
        self.bounds = (c(t.lower), c(t.upper), c(t.vmax), c(t.stride0), c(t.stride1), t.nspline)
        self.grid, self.block, self.calls = grid, 32 * WPB, 0

    def _args(self, Rn, table, row, w):
        Rn = np.ascontiguousarray(Rn, dtype=self.dtype)
        keep = [Rn, np.ascontiguousarray(table, dtype=self.dtype), np.ascontiguousarray(row, dtype=np.int32)]
        keep.append(Rn if w is None else np.ascontiguousarray(w, dtype=self.dtype))
        slots = Rn.size // 4
        ptrs = (_ptr(keep[0]), ctypes.c_longlong(slots), _ptr(self.coef), *self.bounds)
        return keep, ptrs + (_ptr(keep[1]), _ptr(keep[2]), _ptr(keep[3]), int(w is not None))

    def forward(self, Rn, table, row, w):
        keep, args = self._args(Rn, table, row, w)
        G = np.full((*Rn.shape[:-1], self.M), np.nan, dtype=self.dtype)
        self.lib.fwd(self.grid, self.block, *args, _ptr(G))
        self.calls += 1
        return G

    def backward(self, Rn, gG, table, row, w):
        keep, args = self._args(Rn, table, row, w)
        gG = np.ascontiguousarray(gG, dtype=self.dtype)
        gs = np.full(Rn.shape[:-1], np.nan, dtype=self.dtype)
        gw = np.full(Rn.shape[:-1], np.nan, dtype=self.dtype)
        self.lib.bwd(self.grid, self.block, *args, _ptr(gG), _ptr(gs), _ptr(gw))
        self.calls += 1
        return gs, (gw if w is not None else None)


@needs_gxx
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("smooth", [True, False])
def test_kernels_match_array_code(tmp_path, dtype, smooth):
    """G = Gs(x) (1 + T[row] w), dL/dx and dL/dw of the kernels = the array code (TabulatedNet.forward / backward
    and the gate), x below, inside both strides of and above the table; M = 40 (a partly empty second column
    block per lane); grid-stride with fewer warps than slots."""
    tol = 3e-6 if dtype == "float32" else 1e-13
    tn = Table.build(_net(), -1.0, 3.0, Compression(2.0, stride=0.05)).to(np, np.float64)
    emu = _EmuStripTab(tmp_path, tn, dtype)
    rng = np.random.default_rng(1)
    n, ns, rows = 3, 50, 9
    Rn = rng.normal(size=(n, ns, 4))
    Rn[..., 0] = rng.uniform(-1.5, 16, size=(n, ns))
    table = rng.normal(size=(rows, tn.nout))
    row = rng.integers(0, rows, size=(n, ns))
    w = np.where(rng.uniform(size=(n, ns)) < 0.3, 0.0, rng.uniform(size=(n, ns))) if smooth else None
    Rn, table = Rn.astype(dtype).astype(np.float64), table.astype(dtype).astype(np.float64)  # the kernels' inputs
    w = None if w is None else w.astype(dtype).astype(np.float64)
    Gs, dGs = tn.forward(np, Rn[..., 0:1])
    gt1 = table[row] * (1.0 if w is None else w[..., None]) + 1.0
    G = emu.forward(Rn, table, row, w)
    assert rel_err(G, Gs * gt1) <= tol
    gG = rng.normal(size=G.shape)
    gs, gw = emu.backward(Rn, gG.astype(dtype), table, row, w)
    gG = gG.astype(dtype).astype(np.float64)
    assert rel_err(gs, tn.backward(np, gG * gt1, dGs)[..., 0]) <= 10 * tol
    if smooth:
        assert rel_err(gw, (gG * Gs * table[row]).sum(axis=2)) <= 10 * tol
    else:
        assert gw is None


@needs_gxx
def test_descriptor_path(model_cache, tmp_path):
    """attn/descriptor.py with the emulated kernels in strip_net's place (the wiring of w, rows, dL/ds, dL/dswm)
    = the array code from the table, FP64 to 1e-12, a trained se_atten_v2 model with two attention layers."""
    comp = Compression(2.0, stride=0.05)
    m = _model(model_cache, 2)
    # one chunk at a time: the emulated kernels' thread team is not reentrant
    ens = AttnEnsemble([str(m["dp"])], compress=comp, settings=EngineSettings(cpu_workers=1))
    rt = ens._rt(np, 0)
    assert rt.strip_net is None  # NumPy: the array code unless put there
    rt.strip_net = _EmuStripTab(tmp_path, rt.embedding, "float64")
    args = _flat(_systems(3)[1:])
    ref = AttnEnsemble([str(m["dp"])], compress=comp).evaluate(*args, atomic=True)
    out = ens.evaluate(*args, atomic=True)
    assert rt.strip_net.calls == 2 * 2  # forward and backward, per centre type
    for k in ("energy", "force", "virial", "atom_energy", "atom_virial"):
        assert rel_err(out[k], ref[k]) <= 1e-12, (k, rel_err(out[k], ref[k]))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_compiles_for_h100(dtype):
    pytest.importorskip("nvidia.cuda_nvrtc")
    from test_engine_cuda_compile import compile_cuda

    from dpsnake.engine.cuda.strip_tab import source

    ptx = compile_cuda(source(dtype, 100))
    assert ".entry strip_tab_fwd" in ptx and ".entry strip_tab_bwd" in ptx
