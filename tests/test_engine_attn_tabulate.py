"""Tabulated geometric net of se_atten strip mode (tabulate.build_strip_table, AttnEnsemble(compress)):
against DeePMD-kit's own compressed model (``dp --pt compress``: DPTabulate + tabulate_fusion_se_atten),
against the nets, against finite differences; the CUDA kernels of cuda/tab.py compiled with STRIP
against the array code (g++ with threaded warps, and NVRTC for sm_90).

Models: se_atten_v2 with attn_layer 0 (what DeePMD-kit compresses) and 2 (tabulated here only),
trained for a few steps (tests/dpmodels.py; the same models as test_engine_attn.py's v2_l0 / v2_l2).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import shutil

import numpy as np
import pytest
from dpmodels import emt_dataset, train_pt_model
from engine_helpers import THREADED_CUDA_STUB, build_cpp, cluster, fcc, frame, ref_eval, rel_err, triclinic

from dpsnake.engine.attn.ensemble import AttnEnsemble
from dpsnake.engine.attn.model import load_attn_model
from dpsnake.engine.nets import Layer, Net
from dpsnake.engine.settings import EngineSettings
from dpsnake.engine.tabulate import Compression, Table
from dpsnake.errors import UserError

TYPE_MAP = ["Cu", "Ni"]


def _model(cache, attn_layer: int):
    return train_pt_model(cache, "se_atten_v2", 1, 10, {"model": {"descriptor": {"attn_layer": attn_layer}}})


@pytest.fixture(scope="module")
def l0(model_cache):
    return _model(model_cache, 0)


@pytest.fixture(scope="module")
def l2(model_cache):
    return _model(model_cache, 2)


@pytest.fixture(scope="module")
def dp_compressed(l0, model_cache, tmp_path_factory):
    """DeePMD-kit's ``dp --pt compress -s 0.5`` of the attn_layer 0 model (min_nbor_dist from the
    training data, as the command does); returns (compressed .pth, min_nbor_dist)."""
    import torch
    from deepmd.pt.entrypoints.compress import enable_compression

    tmp = tmp_path_factory.mktemp("dp_compress")
    inp = json.loads((l0["dir"] / "input.json").read_text())
    inp["training"]["training_data"]["systems"] = [str(emt_dataset(model_cache, "CuNi"))]
    (tmp / "input.json").write_text(json.dumps(inp))
    out = tmp / "compressed.pth"
    enable_compression(str(l0["pth"]), str(out), stride=0.5, training_script=str(tmp / "input.json"))
    return out, float(torch.jit.load(str(out)).get_min_nbor_dist())


def _systems(seed=0):
    """32-atom cell, 4-atom cell (many images), triclinic cell, cluster without PBC; random types."""
    rng = np.random.default_rng(seed)
    ats = [fcc(rep=(2, 2, 2), seed=1), fcc(rep=(1, 1, 1), rattle=0.05, seed=3), triclinic(), cluster()]
    for at in ats:
        at.set_chemical_symbols(list(np.array(TYPE_MAP)[rng.integers(0, 2, len(at))]))
    return ats


def _flat(ats):
    coords, atype, system, cells, pbc = [], [], [], [], []
    for s, at in enumerate(ats):
        c, _, t = frame(at, TYPE_MAP)
        coords.append(c[0])
        atype.append(t)
        system.append(np.full(len(at), s))
        cells.append(at.cell.array if at.pbc.all() else np.zeros((3, 3)))
        pbc.append(bool(at.pbc.all()))
    return np.concatenate(coords), np.concatenate(atype), np.concatenate(system), np.stack(cells), np.array(pbc)


def _split(out, ats):
    """Per system: (energy, forces (n, 3), virial (9,), atom energies (n,)) of model 0."""
    ends = np.cumsum([0] + [len(a) for a in ats])
    return [
        (
            out["energy"][0, s],
            out["force"][0, ends[s] : ends[s + 1]],
            out["virial"][0, s],
            out["atom_energy"][0, ends[s] : ends[s + 1]],
        )
        for s in range(len(ats))
    ]


def test_matches_dp_compress(l0, dp_compressed):
    """Our tabulated model = DeePMD-kit's compressed one to ~1e-13 (same grid, same polynomials) on
    a mixed batch; the coarse stride 0.5 makes the table differ from the nets by ~1e-6, so this is
    agreement with the table, not with the nets."""
    pth, dmin = dp_compressed
    ats = _systems()
    ens = AttnEnsemble([str(l0["dp"])], compress=Compression(dmin, stride=0.5))
    ours = _split(ens.evaluate(*_flat(ats), atomic=True), ats)
    for at, (e, f, v, ae) in zip(ats, ours):
        c, cell, t = frame(at, TYPE_MAP)
        ref = ref_eval(pth, c, cell, t)
        unc = ref_eval(l0["pth"], c, cell, t)
        for name, x, r, u in zip(("energy", "force", "virial", "atom_energy"), (e, f, v, ae), ref, unc):
            err, effect = rel_err(x, r), rel_err(u, r)
            print(len(at), name, f"ours-dp_compress {err:.1e}  nets-dp_compress {effect:.1e}")
            assert err <= 1e-10, (name, err)
            assert effect > 100 * err, (name, err, effect)


@pytest.mark.parametrize("layers", [0, 2])
def test_close_to_nets(model_cache, layers):
    """Default stride 0.01 against the nets (FP64). Measured max abs errors (these tiny nets are
    smooth, so the table is nearly exact): attn_layer 0 E 9e-16 eV, F 2e-14 eV/A, V 9e-14 eV;
    attn_layer 2 E 4e-16, F 2e-15, V 8e-15."""
    m = _model(model_cache, layers)
    ats = _systems(1)
    args = _flat(ats)
    ref = AttnEnsemble([str(m["dp"])]).evaluate(*args)
    got = AttnEnsemble([str(m["dp"])], compress={"min_nbor_dist": 2.0}).evaluate(*args)
    for k in ("energy", "force", "virial"):
        err = float(np.abs(got[k] - ref[k]).max())
        print(f"attn_layer {layers} {k}: max abs error {err:.2e} (scale {np.abs(ref[k]).max():.2e})")
        assert err <= 1e-8 * max(1.0, np.abs(ref[k]).max()), (k, err)


@pytest.mark.parametrize("layers", [0, 2])
def test_forces_are_gradients(model_cache, layers):
    """Forces = -dE/dx of the tabulated energy (central differences, a few atoms and directions)."""
    m = _model(model_cache, layers)
    at = triclinic(seed=4)
    at.set_chemical_symbols(["Cu", "Ni"] * (len(at) // 2))
    ens = AttnEnsemble([str(m["dp"])], compress={"min_nbor_dist": 2.0, "stride": 0.1})
    c, t, s, cells, pbc = _flat([at])
    f = ens.evaluate(c, t, s, cells, pbc)["force"][0]
    h = 1e-5
    for i, a in ((0, 0), (3, 1), (5, 2)):
        e = []
        for sgn in (1, -1):
            x = c.copy()
            x[i, a] += sgn * h
            e.append(ens.evaluate(x, t, s, cells, pbc)["energy"][0, 0])
        assert abs(-(e[0] - e[1]) / (2 * h) - f[i, a]) <= 1e-7 * max(1.0, abs(f[i, a])), (i, a)


def test_make_ensemble_and_errors(l0):
    from dpsnake.engine.dispatch import make_ensemble

    ens = make_ensemble([str(l0["dp"])], compress={"min_nbor_dist": 2.0})
    assert isinstance(ens, AttnEnsemble) and ens.compress == Compression(2.0)
    m = load_attn_model(l0["dp"])
    with pytest.raises(UserError, match="tebd_input_mode 'concat'"):
        AttnEnsemble([dataclasses.replace(m, tebd_mode="concat")], compress={"min_nbor_dist": 2.0})
    dt_net = Net([Layer(l.w, l.b, np.ones(l.nout), l.activation, l.resnet) for l in m.embedding.layers])
    with pytest.raises(UserError, match="resnet_dt"):
        AttnEnsemble([dataclasses.replace(m, embedding=dt_net)], compress={"min_nbor_dist": 2.0})
    with pytest.raises(UserError, match="needs min_nbor_dist"):
        AttnEnsemble([m], compress={"stride": 0.1})


# --- CUDA kernels (STRIP) ------------------------------------------------------------------------
LAUNCH = r"""
extern "C" void fwd(unsigned grid, unsigned block, const T* Rn, long long n, int nc, int a, int b,
                    const T* tab, T lo, T up, T vmax, T s0, T s1, int ns, const T* w, const int* k,
                    const T* tt, T* gr) {
  launch(grid, block, [=] { tab_fwd(Rn, n, nc, a, b, tab, lo, up, vmax, s0, s1, ns, w, k, tt, gr); });
}
extern "C" void bwd(unsigned grid, unsigned block, const T* Rn, const T* ggr, long long n, int nc,
                    int a, int b, const T* tab, T lo, T up, T vmax, T s0, T s1, int ns, const T* w,
                    const int* k, const T* tt, T* g, T* gw) {
  launch(grid, block, [=] { tab_bwd(Rn, ggr, n, nc, a, b, tab, lo, up, vmax, s0, s1, ns, w, k, tt, g, gw); });
}
"""


def _net(M=40, seed=0):
    rng = np.random.default_rng(seed)
    layers, nin = [], 1
    for n in (20, M):
        layers.append(Layer(rng.normal(size=(nin, n)) / np.sqrt(nin + n), rng.normal(size=n), None, "tanh", True))
        nin = n
    return Net(layers)


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")
@pytest.mark.parametrize("dtype,lps", [("float64", 8), ("float32", 4)])
def test_strip_kernels_match_array_code(tmp_path, dtype, lps):
    """G = Gs (1 + w TT[k]) in registers: gr, gRn and gw = dL/dw against the array code of
    attn/descriptor.py (TabulatedNet + strip table)."""
    from dpsnake.engine.cuda.tab import source

    npdt = np.float32 if dtype == "float32" else np.float64
    ct = ctypes.c_float if dtype == "float32" else ctypes.c_double
    tol = 3e-5 if dtype == "float32" else 1e-12
    tab = Table.build(_net(), -1.0, 3.0, Compression(2.0, stride=0.05))
    tn = tab.to(np, npdt)
    M = tn.nout  # 40: not a multiple of 32
    lib = build_cpp(tmp_path, f"tabs_{dtype}_{lps}", THREADED_CUDA_STUB + source(dtype, M, lps, strip=True) + LAUNCH)
    rng = np.random.default_rng(3)
    n, nc, a, b = 3, 150, 0, 150  # more slots than a forward tile (128)
    Rn = rng.normal(size=(n, nc, 4))
    Rn[..., 0] = rng.uniform(-1.5, 16, size=(n, nc))  # below, inside both tables, above
    Rn = Rn.astype(npdt)
    TT = rng.normal(size=(9, M)).astype(npdt)  # (ntypes + 1)^2 rows
    k = rng.integers(0, 9, size=(n, nc)).astype(np.int32)
    w = rng.uniform(0, 1, size=(n, nc)).astype(npdt)
    w[:, -20:] = 0  # empty slots of smooth mode
    bounds = (ct(tab.lower), ct(tab.upper), ct(tab.vmax), ct(tab.stride0), ct(tab.stride1), tab.nspline)
    coef = np.ascontiguousarray(tn.coef)
    # the array code: Gs, G = Gs * gt + Gs, gr = Rn^T G
    Gs, dGs = tn.forward(np, Rn[..., 0:1])
    gt = TT[k] * w[..., None]
    G = Gs * gt + Gs
    ref = np.matmul(Rn.transpose(0, 2, 1), G)
    gr = np.full((n, 4, M), 0.5, npdt)
    lib.fwd(2, 64, _ptr(Rn), ctypes.c_longlong(n), nc, a, b, _ptr(coef), *bounds, _ptr(w), _ptr(k), _ptr(TT), _ptr(gr))
    assert np.abs(gr - 0.5 - ref).max() <= tol * np.abs(ref).max()
    ggr = rng.normal(size=(n, 4, M)).astype(npdt)
    gG = np.matmul(Rn, ggr)
    gref = np.matmul(G, ggr.transpose(0, 2, 1))
    gref[..., 0:1] += tn.backward(np, gG * (gt + 1), dGs)
    gwref = (gG * Gs * TT[k]).sum(axis=2)
    g, gw = np.zeros((n, nc, 4), npdt), np.zeros((n, nc), npdt)
    lib.bwd(
        2,
        64,
        _ptr(Rn),
        _ptr(ggr),
        ctypes.c_longlong(n),
        nc,
        a,
        b,
        _ptr(coef),
        *bounds,
        _ptr(w),
        _ptr(k),
        _ptr(TT),
        _ptr(g),
        _ptr(gw),
    )
    assert np.abs(g - gref).max() <= tol * np.abs(gref).max()
    assert np.abs(gw - gwref).max() <= tol * np.abs(gwref).max()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_strip_kernels_compile_for_h100(dtype):
    pytest.importorskip("nvidia.cuda_nvrtc")
    from test_engine_cuda_compile import compile_cuda

    from dpsnake.engine.cuda.tab import source

    ptx = compile_cuda(source(dtype, 100, 8, strip=True))
    assert ".entry tab_fwd" in ptx and ".entry tab_bwd" in ptx


class _HostKernels:
    """cuda/tab.py's TabKernels (STRIP) interface on NumPy arrays, run by the g++-built kernels."""

    def __init__(self, lib, rt):
        t = rt.embedding.table
        self.lib, self.coef, self.tt = (
            lib,
            np.ascontiguousarray(rt.embedding.coef),
            np.ascontiguousarray(rt.strip_table),
        )
        c = ctypes.c_double
        self.bounds = (c(t.lower), c(t.upper), c(t.vmax), c(t.stride0), c(t.stride1), t.nspline)
        self.calls = 0

    def _head(self, Rn, a, b):
        return ctypes.c_longlong(Rn.shape[0]), Rn.shape[1], a, b, _ptr(self.coef), *self.bounds

    def forward(self, Rn, a, b, gr, w, krow):
        self.calls += 1
        self.lib.fwd(3, 32, _ptr(Rn), *self._head(Rn, a, b), _ptr(w), _ptr(krow), _ptr(self.tt), _ptr(gr))

    def backward(self, Rn, ggr, a, b, gRn, w, krow, gw):
        self.calls += 1
        strip = (_ptr(w), _ptr(krow), _ptr(self.tt), _ptr(gRn), _ptr(gw))
        self.lib.bwd(3, 128, _ptr(Rn), _ptr(ggr), *self._head(Rn, a, b), *strip)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")
def test_descriptor_kernel_path(l0, tmp_path):
    """attn/descriptor.py's CUDA path (AttnRuntime.tab: w, krow, gw wiring) with the emulated
    kernels in place of CuPy's = the array code from the table, FP64 to 1e-12: the se_atten_v2
    model, and the same weights as a one-sided strip model without the smooth type embedding
    (w = 1, rows by neighbour type)."""
    from dpsnake.engine.cuda.tab import source

    comp = Compression(2.0, stride=0.05)
    m = load_attn_model(l0["dp"])
    rough = dataclasses.replace(m, smooth=False, type_one_side=True, strip_table=m.strip_table[2 : m.ntypes + 3])
    lib = None
    for model in (m, rough):
        # one chunk at a time: the emulated kernels' thread team is not reentrant (a GPU has no pool)
        ens = AttnEnsemble([model], compress=comp, settings=EngineSettings(cpu_workers=1))
        rt = ens._rt(np, 0)
        if lib is None:
            src = THREADED_CUDA_STUB + source("float64", rt.embedding.nout, 8, True) + LAUNCH
            lib = build_cpp(tmp_path, "tabs_desc", src)
        rt.tab = _HostKernels(lib, rt)
        args = _flat(_systems(3)[1:])
        ref = AttnEnsemble([model], compress=comp).evaluate(*args, atomic=True)
        out = ens.evaluate(*args, atomic=True)
        assert rt.tab.calls == 2 * 2  # forward and backward, per centre type
        for k in ("energy", "force", "virial", "atom_energy", "atom_virial"):
            assert rel_err(out[k], ref[k]) <= 1e-12, (model.smooth, k, rel_err(out[k], ref[k]))
