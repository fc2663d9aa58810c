"""The CUDA sources the engine generates compile for an H100 (sm_90) with NVRTC, no GPU needed.

The kernels' numbers are checked on a GPU against the array code (bench/profiling/profile_engine.py --check,
docs/benchmarks.md); this catches code-generation errors for net shapes and options the GPU runs
did not cover (depth, widths, idt, resnet kinds, activations, FP32/FP64).
"""

from __future__ import annotations

import ctypes
import pathlib

import numpy as np
import pytest

from dpsnake.engine.cuda import fused
from dpsnake.engine.cuda import selection as kernels
from dpsnake.engine.nets import Layer, Net


def _nvrtc():
    import nvidia.cuda_nvrtc as pkg

    lib = pathlib.Path(list(pkg.__path__)[0]) / "lib" / "libnvrtc.so.12"
    return ctypes.CDLL(str(lib))


def compile_cuda(src: str, arch: str = "compute_90") -> str:
    """PTX of ``src``; raises with NVRTC's log on a compile error."""
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"k.cu", 0, None, None) == 0
    opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++14"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        raise RuntimeError(log.value.decode(errors="replace")[:3000])
    lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetPTX(prog, ptx)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx.value.decode()


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
