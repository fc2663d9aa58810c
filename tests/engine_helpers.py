"""Shared helpers of the engine tests: geometries, DeePMD-kit references, edited .dp copies."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

_REF = {}


def cupy_or_skip():
    """CuPy, or skip the calling test module when it or a CUDA device is missing (CI has no GPU)."""
    import pytest

    cp = pytest.importorskip("cupy")
    try:
        cp.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 (no driver / no device)
        pytest.skip("no CUDA device", allow_module_level=True)
    return cp


def cupy_and_model_or_skip(name: str = "t_cu.dp", env: str = "DPSNAKE_GPU_MODEL"):
    """(cupy, model path) for a GPU test, or skip the test without CuPy, a device or the model the
    device runs carry (gpu_model)."""
    import pytest

    cp = cupy_or_skip()
    path, _ = gpu_model(env, name)
    if not path.exists():
        pytest.skip(f"no model at {path}")
    return cp, path


def gpu_model(env: str, name: str):
    """Path of a model the device runs carry (``env`` overrides .whl/models/``name``) and a pytest
    mark that skips the module when it is not there."""
    import pathlib

    import pytest

    path = pathlib.Path(os.environ.get(env, pathlib.Path(__file__).resolve().parents[1] / ".whl/models" / name))
    return path, pytest.mark.skipif(not path.exists(), reason=f"no model at {path}")


def ref_pot(path):
    """deepmd.infer.DeepPot of a .pb (TensorFlow) or .dp (DeePMD-kit's NumPy backend), cached."""
    path = str(path)
    if path not in _REF:
        from deepmd.infer import DeepPot

        _REF[path] = DeepPot(path)
    return _REF[path]


def ref_eval(path, coords, cells, types):
    """DeePMD-kit's eval with atomic outputs: e (nf,1), f (nf,nat,3), v (nf,9), ae, av."""
    nf = coords.shape[0]
    e, f, v, ae, av = ref_pot(path).eval(coords.reshape(nf, -1), cells, types, atomic=True)
    nat = len(types)
    return [
        np.asarray(x).reshape(s)
        for x, s in zip((e, f, v, ae, av), ((nf, 1), (nf, nat, 3), (nf, 9), (nf, nat, 1), (nf, nat, 9)))
    ]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float).reshape(np.shape(a))
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def fcc(a=3.6, rep=(2, 2, 2), rattle=0.1, seed=0, ni_frac=0.0, cubic=True):
    """Rattled fcc Cu (optionally with a random fraction of Ni) as ase.Atoms."""
    from ase.build import bulk

    at = bulk("Cu", "fcc", a=a, cubic=cubic).repeat(rep)
    rng = np.random.default_rng(seed)
    if ni_frac:
        at.symbols[rng.permutation(len(at))[: int(round(ni_frac * len(at)))]] = "Ni"
    at.rattle(rattle, seed=seed)
    return at


def triclinic(seed=1, ni_frac=0.0):
    """A skewed, strained fcc primitive-cell supercell (8 atoms, cell far shorter than 2 rcut)."""
    at = fcc(a=3.6, rep=(2, 2, 2), rattle=0.05, seed=seed, ni_frac=ni_frac, cubic=False)
    h = at.cell.array.copy()
    rng = np.random.default_rng(seed)
    strain = np.eye(3) + 0.06 * rng.uniform(-1, 1, (3, 3))
    at.set_cell(h @ strain, scale_atoms=True)
    return at


def cluster(nat=19, seed=2, ni_frac=0.0):
    """A non-periodic cluster cut from fcc (nearest ``nat`` atoms to the centre)."""
    at = fcc(a=3.6, rep=(3, 3, 3), rattle=0.05, seed=seed, ni_frac=ni_frac)
    c = at.positions.mean(axis=0)
    idx = np.argsort(np.linalg.norm(at.positions - c, axis=1))[:nat]
    at = at[idx]
    at.pbc = False
    at.cell = np.zeros((3, 3))
    return at


def frame(at, type_map):
    """(coords (1, n, 3), cells (1, 9) or None, types (n,)) for one ase.Atoms."""
    types = np.array([type_map.index(s) for s in at.get_chemical_symbols()])
    cells = at.cell.array.reshape(1, 9) if at.pbc.all() else None
    return at.positions[None].copy(), cells, types


def edit_dp(src, dst, fn):
    """Copy a .dp file and apply fn(model_dict) to its JSON (weights unchanged)."""
    import h5py

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        d = json.loads(f.attrs["json"])
        fn(d["model"])
        f.attrs["json"] = json.dumps(d)
    return str(dst)


def set_activation(model: dict, act: str):
    """Set every hidden layer's activation (embedding and fitting) to ``act``."""

    def walk(x):
        if isinstance(x, dict):
            if x.get("@class") == "Layer" and x.get("activation_function") not in ("none", "linear"):
                x["activation_function"] = act
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(model)
    model["descriptor"]["activation_function"] = act
    model["fitting"]["activation_function"] = act


def overfull_cuni_batch(m, ctx=None):
    """Three CuNi systems (compressed fcc with overfull lists, triclinic, non-periodic along c) in one
    NeighborBuilder for model ``m`` (EngineContext ``ctx``); returns (builder, all centre indices)."""
    from dpsnake.engine.neighbor import NeighborBuilder

    ats = [
        fcc(a=3.0, rep=(2, 2, 2), ni_frac=0.5, seed=40),
        triclinic(seed=41, ni_frac=0.5),
        fcc(rep=(3, 2, 2), ni_frac=0.3, seed=42),
    ]
    coords = np.concatenate([a.positions for a in ats])
    atype = np.concatenate([frame(a, ["Cu", "Ni"])[2] for a in ats])
    system = np.repeat(np.arange(3), [len(a) for a in ats])
    cells = np.array([a.cell.array for a in ats])
    nb = NeighborBuilder(np, coords, atype, system, cells, np.array([True, True, False]), m.rcut, m.sel, ctx=ctx)
    return nb, np.arange(len(coords))


def check_kernel_selection(m, ctx=None):
    """Selection on :func:`overfull_cuni_batch` with the array code, then with the (emulated)
    selection kernels (``use_kernel``): owners, overflow flags and displacements must agree."""
    from dpsnake.engine.neighbor import chunk_stats

    nb, centers = overfull_cuni_batch(m, ctx)
    ref = nb.chunk(centers)
    nb.use_kernel = True
    got = nb.chunk(centers)
    assert ref.overflow.any() and ref.valid.sum() > 10 * len(centers)
    np.testing.assert_array_equal(got.owner, ref.owner)
    np.testing.assert_array_equal(got.overflow, ref.overflow)
    np.testing.assert_allclose(got.d, ref.d, rtol=0, atol=1e-14)
    # the kernels' stats (per-type block fill, overflow count) equal the array code's count
    assert ref.stats is None and got.stats is not None
    want = chunk_stats(np, ref, m.sel)
    assert want[-1] == ref.overflow.sum() > 0 and (want[:-1] > 0).all()
    np.testing.assert_array_equal(got.stats, want)
    return len(centers)


# CUDA emulation on the CPU: every thread of a block is a std::thread; blocks run one after another.
# __syncthreads is a block barrier, warp shuffles go through a per-warp barrier, atomics are real;
# __shared__ locals are static (one copy, shared by the block's threads).
THREADED_CUDA_STUB = r"""#include <algorithm>
#include <cmath>
#include <barrier>
#include <mutex>
#include <thread>
#include <vector>
#define __global__
#define __restrict__
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(x)
#define __device__
#define __forceinline__ inline
using std::fabs;
using std::min;
struct float4 { float x, y, z, w; };
struct double2 { double x, y; };
struct D3 { unsigned x, y, z; };
static D3 blockDim, blockIdx, gridDim;
static thread_local D3 threadIdx;
static std::barrier<>* BAR;
static std::barrier<>* WBAR[32];
static double SHFL[1024];
static std::mutex ATOM;
static void __syncthreads() { BAR->arrive_and_wait(); }
template <class X> X __shfl_xor_sync(unsigned, X v, int off) {
  const unsigned t = threadIdx.x, w = t / 32;
  SHFL[t] = (double)v;
  WBAR[w]->arrive_and_wait();
  const X r = (X)SHFL[(t & ~31u) | ((t & 31u) ^ (unsigned)off)];
  WBAR[w]->arrive_and_wait();
  return r;
}
template <class X> X __shfl_sync(unsigned, X v, int src) {
  const unsigned t = threadIdx.x, w = t / 32;
  SHFL[t] = (double)v;
  WBAR[w]->arrive_and_wait();
  const X r = (X)SHFL[(t & ~31u) | ((unsigned)src & 31u)];
  WBAR[w]->arrive_and_wait();
  return r;
}
template <class X> X atomicAdd(X* a, X v) { std::lock_guard<std::mutex> g(ATOM); X o = *a; *a += v; return o; }
template <class X> X atomicMax(X* a, X v) { std::lock_guard<std::mutex> g(ATOM); X o = *a; if (v > o) *a = v; return o; }
template <class F> static void launch(unsigned grid, unsigned block, F body) {
  gridDim.x = grid; blockDim.x = block;
  std::barrier<> bar(block); BAR = &bar;
  for (unsigned w = 0; w < (block + 31) / 32; ++w) WBAR[w] = new std::barrier<>(block - 32 * w < 32 ? block - 32 * w : 32);
  for (unsigned g = 0; g < grid; ++g) {
    blockIdx.x = g;
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < block; ++t) ts.emplace_back([=] { threadIdx.x = t; body(); });
    for (auto& t : ts) t.join();
  }
  for (unsigned w = 0; w < (block + 31) / 32; ++w) delete WBAR[w];
}
"""


def build_cpp(tmp_path, name, src):
    """Compile C++ ``src`` (CUDA source behind a stub) into a shared library and load it."""
    cpp = tmp_path / f"{name}.cpp"
    cpp.write_text(src)
    so = tmp_path / f"{name}.so"
    subprocess.run(["g++", "-O1", "-std=c++20", "-pthread", "-shared", "-fPIC", "-o", str(so), str(cpp)], check=True)
    return ctypes.CDLL(str(so))
