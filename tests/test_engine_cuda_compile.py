"""The CUDA sources the engine generates compile for an H100 (sm_90) with NVRTC, no GPU needed.

The kernels' numbers are checked on a GPU against the array code (bench/profiling/profile_engine.py --check,
docs/benchmarks.md); this catches code-generation errors for net shapes and options the GPU runs
did not cover (depth, widths, idt, resnet kinds, activations, FP32/FP64).
"""

from __future__ import annotations

import numpy as np
import pytest

from dpsnake.engine.cuda import fused, ptx
from dpsnake.engine.cuda import selection as kernels
from dpsnake.engine.nets import Layer, Net

compile_cuda = ptx.nvrtc_ptx  # the other tests' name for it


def _net(sizes, act="tanh", idt=True, resnet=True, bias=True, seed=0):
    rng = np.random.default_rng(seed)
    layers, nin = [], 1
    for n in sizes:
        layers.append(
            Layer(
                rng.normal(size=(nin, n)),
                rng.normal(size=n) if bias else None,
                rng.normal(size=n) if idt else None,
                act,
                resnet,
            )
        )
        nin = n
    return Net(layers)


NETS = {
    "paper [25,50,100] idt resnet": _net([25, 50, 100]),
    "[8,16] plain": _net([8, 16], idt=False, resnet=False),
    "one layer [4]": _net([4]),
    "[10,20,40] gelu": _net([10, 20, 40], act="gelu"),
    "[16,32,32] same-size residual, no bias": _net([16, 32, 32], bias=False),
    "[12,24,30] width not a multiple of 8": _net([12, 24, 30], resnet=False),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(NETS))
def test_fused_embedding_kernels_compile(name, dtype):
    net = NETS[name]
    assert fused.supported(net) is None
    spec = fused._Spec(net, 4 if dtype == "float32" else 2)
    ptx = compile_cuda(fused._source(spec, dtype))
    assert ".entry emb_fwd" in ptx and ".entry emb_bwd" in ptx
    # weights packed as W^T rows padded to the vector width, aligned: the vector loads need it
    w = spec.pack(net)
    assert w.shape == (spec.nw,) and all(L["w"] % spec.vw == 0 and L["ninp"] % spec.vw == 0 for L in spec.layers)
    L0 = spec.layers[-1]
    np.testing.assert_array_equal(
        w[L0["w"] : L0["w"] + L0["nout"] * L0["ninp"]].reshape(L0["nout"], -1)[:, : L0["nin"]],
        np.asarray(net.layers[-1].w).T,
    )


def test_unsupported_nets_are_named():
    bad = _net([4, 8], act="softsign")
    assert "softsign" in fused.supported(bad)


@pytest.mark.parametrize("nnei,ntypes", [(152, 1), (48, 2), (7, 3)])
def test_selection_kernels_compile(nnei, ntypes):
    ptx = compile_cuda(kernels.select_source(nnei, ntypes))
    assert ".entry select_nb" in ptx
    ptx = compile_cuda(kernels.warp_source(nnei, ntypes))
    assert ".entry select_nb_warp" in ptx


def test_parse_ptxas_reads_registers_spills_and_smem():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k_bwd' for 'sm_90'
ptxas info    : Function properties for k_bwd
    120 bytes stack frame, 184 bytes spill stores, 216 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 120 bytes cumulative stack size, 3456 bytes smem
ptxas info    : Compiling entry function 'k_fwd' for 'sm_90'
ptxas info    : Function properties for k_fwd
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers
"""
    got = ptx.parse_ptxas(log)
    assert got["k_bwd"] == {"registers": 168, "stack": 120, "spill_stores": 184, "spill_loads": 216, "smem": 3456}
    assert got["k_fwd"] == {"registers": 40, "stack": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0}


def test_ptxas_stats_of_a_kernel():
    """With NVRTC and ptxas at hand (skipped otherwise): a kernel's registers come back, within sm_90's 255."""
    pytest.importorskip("nvidia.cuda_nvrtc")
    if ptx.find_ptxas() is None:
        pytest.skip("no ptxas (pip install nvidia-cuda-nvcc-cu12)")
    src = 'extern "C" __global__ void axpy(float a, const float* x, float* y) { y[threadIdx.x] += a * x[threadIdx.x]; }'
    got = ptx.ptxas_stats(src)
    assert 0 < got["axpy"]["registers"] <= 255 and got["axpy"]["spill_stores"] == 0
