"""The fused embedding kernels (engine/cuda/fused.py) run on the CPU: the generated CUDA source compiled
with g++ against a stub that runs every thread of a block as a std::thread, with real 32-lane warps
(shuffles through a per-warp barrier), shared memory, __syncthreads and atomics; a grid of 2 blocks
exercises the grid-stride loop. Compared with the NumPy array code (nets.py) they replace."""

from __future__ import annotations

import ctypes
import shutil

import numpy as np
import pytest
from engine_helpers import THREADED_CUDA_STUB, build_cpp

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")

# the kernels' dynamic shared memory (declared at block scope there): one global buffer here
SMEM = "alignas(16) unsigned char smem_[1 << 20];\n"
LAUNCH = r"""
extern "C" void fwd(unsigned grid, unsigned block, const T* Rn, long long n, int nc, int a, int b,
                    const T* W, T* gr) {
  launch(grid, block, [=] { emb_fwd(Rn, n, nc, a, b, W, gr); });
}
extern "C" void bwd(unsigned grid, unsigned block, const T* Rn, const T* ggr, long long n, int nc,
                    int a, int b, const T* W, T* g) {
  launch(grid, block, [=] { emb_bwd(Rn, ggr, n, nc, a, b, W, g); });
}
"""


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def _build(tmp_path, name, src):
    body = src.replace("extern __shared__ __align__(16) unsigned char smem_[];", "")
    return build_cpp(tmp_path, name, THREADED_CUDA_STUB + SMEM + body + LAUNCH)


def _nets(cu_model):
    from dpsnake.engine.model import load_model
    from dpsnake.engine.nets import Layer, Net

    rng = np.random.default_rng(3)

    def lay(i, o, act, idt=True, res=True):
        return Layer(
            rng.normal(size=(i, o)) * 0.5, rng.normal(size=o) * 0.1, rng.normal(size=o) if idt else None, act, res
        )

    nets = {"trained [25,50,100]": load_model(cu_model["dp"]).embeddings[0]}
    for act in ("tanh", "gelu", "silut:1.5"):
        nets[f"{act} [6,6,12]"] = Net([lay(1, 6, act), lay(6, 6, act), lay(6, 12, act, False)])
    nets["no resnet, width 10 (not a multiple of 8)"] = Net(
        [lay(1, 5, "tanh", res=False), lay(5, 10, "tanh", res=False)]
    )
    nets["one layer"] = Net([lay(1, 9, "tanh")])
    return nets


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fused_kernels_match_array_code(cu_model, tmp_path, dtype):
    from dpsnake.engine.cuda.fused import _source, _Spec

    rng = np.random.default_rng(4)
    npdt = np.float32 if dtype == "float32" else np.float64
    tol = 2e-5 if dtype == "float32" else 1e-12
    for k, (name, net) in enumerate(_nets(cu_model).items()):
        spec = _Spec(net, 4 if dtype == "float32" else 2)
        lib = _build(tmp_path, f"emb{k}", _source(spec, dtype))
        W = spec.pack(net).astype(npdt)
        # 40 slots in 2 warps of the block (the second partly past b), a section a:b inside them
        n, nc, a, b = 3, 45, 3, 43
        Rn = rng.normal(size=(n, nc, 4)).astype(npdt)
        M = spec.sizes[-1]
        netc = net.to(np, npdt)
        G, cache = netc.forward(np, Rn[:, a:b, 0:1])
        ref = np.matmul(Rn[:, a:b, :].transpose(0, 2, 1), G)
        for grid, block in ((2, 64), (3, 32)):
            gr = np.full((n, 4, M), 0.5, npdt)  # the kernel adds to what is there
            lib.fwd(grid, block, _ptr(Rn), ctypes.c_longlong(n), nc, a, b, _ptr(W), _ptr(gr))
            err = np.abs(gr - 0.5 - ref).max() / np.abs(ref).max()
            assert err <= tol, (name, grid, block, err)
        ggr = rng.normal(size=(n, 4, M)).astype(npdt)
        gref = np.matmul(G, ggr.transpose(0, 2, 1))
        gref[:, :, 0:1] += netc.backward(np, np.matmul(Rn[:, a:b, :], ggr), cache)
        for grid, block in ((2, 32), (1, 64)):
            g = np.zeros((n, nc, 4), npdt)
            lib.bwd(grid, block, _ptr(Rn), _ptr(ggr), ctypes.c_longlong(n), nc, a, b, _ptr(W), _ptr(g))
            err = np.abs(g[:, a:b] - gref).max() / np.abs(gref).max()
            assert err <= tol, (name, "backward", grid, block, err)
            assert not g[:, :a].any() and not g[:, b:].any()
