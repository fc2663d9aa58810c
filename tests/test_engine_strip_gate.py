"""The strip-mode type gate kernels of se_atten / se_atten_v2 (cuda/strip_gate.cu) = the array code, no GPU
needed: the source compiled with g++ and run with threaded 32-lane warps (the kernels alone, and inside a
whole batched evaluation of trained models), and compiled for sm_90 with NVRTC.
(On a GPU: tests/test_engine_attn_gpu.py runs the whole se_atten engine with these kernels on.)"""

from __future__ import annotations

import ctypes
import shutil

import numpy as np
import pytest
from engine_helpers import THREADED_CUDA_STUB, build_cpp, rel_err
from test_engine_attn import attn_model, flat, systems

LAUNCH = r"""
extern "C" void fwd(unsigned g, unsigned b, const REAL* gs, const REAL* t, const int* row, const REAL* w, int hw,
                    long long slots, REAL* out) {
  launch(g, b, [=] { strip_fwd(gs, t, row, w, hw, slots, out); });
}
extern "C" void bwd(unsigned g, unsigned b, const REAL* gg, const REAL* gs, const REAL* t, const int* row, const REAL* w,
                    int hw, long long slots, REAL* gin, REAL* gw) {
  launch(g, b, [=] { strip_bwd(gg, gs, t, row, w, hw, slots, gin, gw); });
}
"""

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


class _EmuGate:
    """cuda/strip_gate.py's forward / backward with strip_gate.cu run by g++ with threaded warps."""

    def __init__(self, tmp_path, dtype: str, D: int, grid: int = 5):
        from dpsnake.engine.cuda.strip_gate import WPB, source

        self.lib = build_cpp(tmp_path, f"gate_{dtype}_{D}", THREADED_CUDA_STUB + source(dtype, D) + LAUNCH)
        self.grid, self.block, self.calls = grid, 32 * WPB, 0

    @staticmethod
    def _args(Gs, table, row, w):
        row = np.ascontiguousarray(row, dtype=np.int32)
        wa = Gs if w is None else np.ascontiguousarray(w, dtype=Gs.dtype)
        return np.ascontiguousarray(table), row, wa, int(w is not None), ctypes.c_longlong(row.size)

    def forward(self, Gs, table, row, w):
        Gs = np.ascontiguousarray(Gs)
        out = np.full_like(Gs, np.nan)
        t, r, wa, hw, n = self._args(Gs, table, row, w)
        self.lib.fwd(self.grid, self.block, _ptr(Gs), _ptr(t), _ptr(r), _ptr(wa), hw, n, _ptr(out))
        self.calls += 1
        return out

    def backward(self, gG, Gs, table, row, w):
        Gs, gG = np.ascontiguousarray(Gs), np.ascontiguousarray(gG)
        gin = np.full_like(Gs, np.nan)
        gw = np.full(Gs.shape[:-1], np.nan, dtype=Gs.dtype)
        t, r, wa, hw, n = self._args(Gs, table, row, w)
        self.lib.bwd(self.grid, self.block, _ptr(gG), _ptr(Gs), _ptr(t), _ptr(r), _ptr(wa), hw, n, _ptr(gin), _ptr(gw))
        self.calls += 1
        return gin, (gw if w is not None else None)


@needs_gxx
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("smooth", [True, False])
@pytest.mark.parametrize("grid", [2, 9])
def test_gate_kernels_match_array_code(tmp_path, dtype, smooth, grid):
    """G = Gs (1 + T[row] w), df/dGs and df/dw (smooth) of the kernels = descriptor.py's array code; D = 45:
    two column blocks per lane, the second partly empty; grid-stride with fewer and more warps than slots."""
    D, (n, ns), nrows = 45, (3, 7), 6
    rng = np.random.default_rng(0)
    Gs, gG = (rng.normal(size=(n, ns, D)).astype(dtype) for _ in range(2))
    table = rng.normal(size=(nrows, D)).astype(dtype)
    row = rng.integers(0, nrows, size=(n, ns))
    w = np.where(rng.uniform(size=(n, ns)) < 0.3, 0.0, rng.uniform(size=(n, ns))).astype(dtype) if smooth else None
    tt = table[row]
    gt = tt * w[..., None] if smooth else tt
    want_G, want_gin = Gs * gt + Gs, gG * (gt + 1)
    emu = _EmuGate(tmp_path, dtype, D, grid)
    tol = 1e-6 if dtype == "float32" else 1e-14
    assert rel_err(emu.forward(Gs, table, row, w), want_G) < tol
    gin, gw = emu.backward(gG, Gs, table, row, w)
    assert rel_err(gin, want_gin) < tol
    if smooth:
        assert rel_err(gw, (gG * Gs * tt).sum(axis=2)) < tol * 10
    else:
        assert gw is None


@needs_gxx
@pytest.mark.parametrize("name", ["v2_l2", "strip_l2"])
def test_engine_on_the_gate_kernels_equals_array_code(tmp_path, monkeypatch, model_cache, name):
    """A whole batched evaluation (energies, forces, virials, atomic ones) of a trained strip model with the
    gate on the emulated kernels = the array code to 1e-12: smooth (v2_l2) and not, one-sided (strip_l2)."""
    from dpsnake.engine.attn import descriptor
    from dpsnake.engine.attn.ensemble import AttnEnsemble
    from dpsnake.engine.settings import EngineSettings

    m = attn_model(model_cache, name)
    ens = AttnEnsemble([str(m["dp"])])
    batch = flat(systems(ens.type_map)[:4], ens.type_map)  # the over-full cell only warns
    want = ens.evaluate(*batch, atomic=True)
    emu = _EmuGate(tmp_path, "float64", ens.models[0].neuron[-1])
    monkeypatch.setattr(descriptor, "_gate_kernels", lambda rt: emu)
    # one chunk at a time: the emulated kernels are not reentrant (a GPU runs no chunk threads)
    got = AttnEnsemble([str(m["dp"])], settings=EngineSettings(cpu_workers=1)).evaluate(*batch, atomic=True)
    assert emu.calls >= 4  # forward and backward of each centre type's chunk
    for k in ("energy", "force", "virial", "atom_energy", "atom_virial"):
        assert rel_err(got[k], want[k]) < 1e-12, k


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("D", [100, 8, 128])
def test_gate_kernels_compile_for_sm90(dtype, D):
    pytest.importorskip("nvidia.cuda_nvrtc")
    from test_engine_cuda_compile import compile_cuda

    from dpsnake.engine.cuda.strip_gate import source

    ptx = compile_cuda(source(dtype, D))
    assert ".entry strip_fwd" in ptx and ".entry strip_bwd" in ptx
