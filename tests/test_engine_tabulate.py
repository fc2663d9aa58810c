"""Tabulated embedding nets (DeePMD-kit's model compression): tabulate.py against ``dp compress``
(TensorFlow backend, CPU) and against the nets; the CUDA kernels of cuda/tab.py against the
array code (g++ with threaded warps, and NVRTC for sm_90)."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from engine_helpers import THREADED_CUDA_STUB, build_cpp

from dpsnake.engine.nets import Layer, Net
from dpsnake.engine.tabulate import Compression, Table, net_derivatives
from dpsnake.errors import UserError

CUNI_TOS32 = {
    "model": {
        "descriptor": {"type_one_side": True, "precision": "float32", "exclude_types": [[1, 1]]},
        "fitting_net": {"precision": "float32"},
    }
}


def _frames(nf=3, seed=0):
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    types = np.array([0, 1] * 16)
    c = np.stack([a.positions + 0.1 * rng.standard_normal(a.positions.shape) for _ in range(nf)])
    return c.reshape(nf, -1), np.tile(a.cell.array.reshape(1, 9), (nf, 1)), types


def _dp_compress(model, tmp_path, stride):
    """``dp --tf compress -s stride``; returns the compressed .pb and the min_nbor_dist it used."""
    out = tmp_path / f"compressed_{stride}.pb"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepmd",
            "--tf",
            "compress",
            "-i",
            str(model["pb"]),
            "-o",
            str(out),
            "-t",
            str(model["dir"] / "input.json"),
            "-s",
            str(stride),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    conf = json.loads((tmp_path / "compress.json").read_text())["model"]["compress"]
    assert conf["table_config"][1] == stride
    return out, conf["min_nbor_dist"]


@pytest.mark.parametrize("variant", ["cuni", "cuni_tos32"])
def test_matches_dp_compress(dp_model, tmp_path, variant):
    """A coarse stride (0.5) makes the table differ from the nets by ~1e-7, so agreement with
    DeePMD-kit's compressed model (and not with the uncompressed one) shows the same table."""
    from deepmd.infer import DeepPot as DPRef

    from dpsnake import DeepPot

    model = dp_model(None if variant == "cuni" else CUNI_TOS32, data="CuNi")
    fp32 = variant == "cuni_tos32"
    c, b, t = _frames()
    ref_pb, dmin = _dp_compress(model, tmp_path, 0.5)
    ref = DPRef(str(ref_pb)).eval(c, b, t)[:3]
    unc = DPRef(str(model["pb"])).eval(c, b, t)[:3]
    ours = DeepPot(str(model["dp"]), compress={"min_nbor_dist": dmin, "stride": 0.5}).eval(c, b, t)[:3]
    tol = 2e-6 if fp32 else 1e-12
    for name, x, r, u in zip(("energy", "force", "virial"), ours, ref, unc):
        scale = np.abs(r).max()
        err = np.abs(x - r).max() / scale
        table_effect = np.abs(r - u).max() / scale
        assert err < tol, (name, err)
        if not fp32:  # in FP32 the table's effect is within rounding
            assert table_effect > 100 * err, (name, err, table_effect)


def test_default_stride_is_close_to_nets(cu_model):
    """Default stride 0.01: energies/forces of the tabulated model within 1e-9 of the nets (FP64)."""
    from dpsnake import DeepPot

    c, b, _ = _frames()
    t = np.zeros(32, dtype=int)
    ref = DeepPot(str(cu_model["dp"])).eval(c, b, t)
    got = DeepPot(str(cu_model["dp"]), compress={"min_nbor_dist": 2.0}).eval(c, b, t)
    for x, r in zip(got[:3], ref[:3]):
        assert np.abs(x - r).max() <= 1e-9 * np.abs(r).max()


def _paper_net(seed=0):
    rng = np.random.default_rng(seed)
    layers, nin = [], 1
    for n in (25, 50, 100):
        layers.append(
            Layer(
                rng.normal(size=(nin, n)) / np.sqrt(nin + n),
                rng.normal(size=n),
                rng.normal(0.1, 0.001, size=n),
                "tanh",
                True,
            )
        )
        nin = n
    return Net(layers)


def test_table_interpolates_value_slope_and_curvature():
    net = _paper_net()
    tab = Table.build(net, -1.0, 3.0, Compression(2.0))
    x = np.random.default_rng(1).uniform(-1, 14.9, 2000)
    G, dG, _ = net_derivatives(net, x)
    tn = tab.to(np, np.float64)
    y, dy = tn.forward(np, x[:, None])
    assert np.abs(y - G).max() < 1e-9 * np.abs(G).max()
    assert np.abs(dy - dG).max() < 1e-7 * np.abs(dG).max()
    # forward mode against finite differences of the net itself
    h = 1e-4
    Gp, Gm = net.forward(np, (x + h)[:, None], keep=False)[0], net.forward(np, (x - h)[:, None], keep=False)[0]
    assert np.abs((Gp - Gm) / (2 * h) - dG).max() < 1e-6 * np.abs(dG).max()
    # outside the table: DeePMD-kit's rule (left node of the first / last interval)
    y_lo, _ = tn.forward(np, np.array([[-5.0]]))
    y_hi, _ = tn.forward(np, np.array([[100.0]]))
    np.testing.assert_allclose(y_lo[0], tab.coef[0, 0])
    np.testing.assert_allclose(y_hi[0], tab.coef[-1, 0])


def test_bad_compress_input(cu_model):
    from dpsnake.engine.ensemble import Ensemble

    with pytest.raises(UserError, match="min_nbor_dist"):
        Compression(-1.0)
    with pytest.raises(UserError, match="needs min_nbor_dist"):
        Ensemble([str(cu_model["dp"])], compress={"stride": 0.01})
    with pytest.raises(UserError, match="stride"):
        Ensemble([str(cu_model["dp"])], compress={"min_nbor_dist": 2.0, "stride": 0})


# --- CUDA kernels ------------------------------------------------------------------------------
LAUNCH = r"""
extern "C" void fwd(unsigned grid, unsigned block, const T* Rn, long long n, int nc, int a, int b,
                    const T* tab, T lo, T up, T vmax, T s0, T s1, int ns, T* gr) {
  launch(grid, block, [=] { tab_fwd(Rn, n, nc, a, b, tab, lo, up, vmax, s0, s1, ns, gr); });
}
extern "C" void bwd(unsigned grid, unsigned block, const T* Rn, const T* ggr, long long n, int nc,
                    int a, int b, const T* tab, T lo, T up, T vmax, T s0, T s1, int ns, T* g) {
  launch(grid, block, [=] { tab_bwd(Rn, ggr, n, nc, a, b, tab, lo, up, vmax, s0, s1, ns, g); });
}
"""


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")
@pytest.mark.parametrize("dtype,lps", [("float64", 8), ("float32", 8), ("float64", 32), ("float32", 1)])
def test_kernels_match_array_code(tmp_path, dtype, lps):
    from dpsnake.engine.cuda.tab import source

    npdt = np.float32 if dtype == "float32" else np.float64
    ct = ctypes.c_float if dtype == "float32" else ctypes.c_double
    tol = 3e-5 if dtype == "float32" else 1e-12
    net = Net(_paper_net().layers[:2])  # M = 50: not a multiple of 32
    tab = Table.build(net, -1.0, 3.0, Compression(2.0, stride=0.05))
    tn = tab.to(np, npdt)
    M = tn.nout
    lib = build_cpp(tmp_path, f"tab_{dtype}_{lps}", THREADED_CUDA_STUB + source(dtype, M, lps) + LAUNCH)
    rng = np.random.default_rng(2)
    n, nc, a, b = 3, 150, 5, 145  # more slots than a forward tile (128)
    Rn = rng.normal(size=(n, nc, 4))
    Rn[..., 0] = rng.uniform(-1.5, 16, size=(n, nc))  # below, inside both tables, above
    Rn = Rn.astype(npdt)
    bounds = (ct(tab.lower), ct(tab.upper), ct(tab.vmax), ct(tab.stride0), ct(tab.stride1), tab.nspline)
    coef = np.ascontiguousarray(tn.coef)
    G, dG = tn.forward(np, Rn[:, a:b, 0:1])
    ref = np.matmul(Rn[:, a:b, :].transpose(0, 2, 1), G)
    for grid, block in ((2, 64), (3, 64)):
        gr = np.full((n, 4, M), 0.5, npdt)
        lib.fwd(grid, block, _ptr(Rn), ctypes.c_longlong(n), nc, a, b, _ptr(coef), *bounds, _ptr(gr))
        assert np.abs(gr - 0.5 - ref).max() <= tol * np.abs(ref).max()
    ggr = rng.normal(size=(n, 4, M)).astype(npdt)
    gref = np.matmul(G, ggr.transpose(0, 2, 1))
    gref[:, :, 0:1] += tn.backward(np, np.matmul(Rn[:, a:b, :], ggr), dG)
    for grid in (2, 1):
        g = np.zeros((n, nc, 4), npdt)
        lib.bwd(grid, 64, _ptr(Rn), _ptr(ggr), ctypes.c_longlong(n), nc, a, b, _ptr(coef), *bounds, _ptr(g))
        assert np.abs(g[:, a:b] - gref).max() <= tol * np.abs(gref).max()
        assert not g[:, :a].any() and not g[:, b:].any()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_kernels_compile_for_h100(dtype):
    pytest.importorskip("nvidia.cuda_nvrtc")
    from test_engine_cuda_compile import compile_cuda

    from dpsnake.engine.cuda.tab import source

    ptx = compile_cuda(source(dtype, 100, 8))
    assert ".entry tab_fwd" in ptx and ".entry tab_bwd" in ptx
