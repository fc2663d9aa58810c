"""Mixed periodicity on a GPU (issue 20 item 5): slabs and wires through the engine's CUDA neighbour
kernels (CuPy), the CuPy MD explorer (CUDA graphs) and the DeePMD-kit provider on CUDA torch, against
the NumPy array code and the fully periodic vacuum reference (tests/test_mixed_pbc.py's systems).

Needs CuPy with a device and the test suite's tiny Cu model the device runs carry (DPSNAKE_GPU_CU,
default .whl/models/t_cu.dp; the provider test also .whl/models/t_cu.pth and DeePMD-kit); skipped
otherwise (CI has no GPU):  python -m pytest tests/test_mixed_pbc_gpu.py
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from engine_helpers import cluster, cupy_or_skip, gpu_model, rel_err
from test_md_engine import walker
from test_mixed_pbc import bulk_cu, flat, reference, slab, variants, wire, x_slab

cp = cupy_or_skip()
MODEL, pytestmark = gpu_model("DPSNAKE_GPU_CU", "t_cu.dp")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _batch():
    structs = [*variants(slab(seed=1)).values(), bulk_cu(), cluster(nat=19), wire(seed=2), x_slab(seed=3)]
    structs[4].symbols[:] = "Cu"
    return structs


def test_engine_on_gpu_equals_numpy_and_the_reference():
    """The mixed batch on CuPy (default settings: CUDA kernels, guessed widths) equals NumPy's array
    code to 1e-12 and each slab or wire its fully periodic reference to 1e-10, call after call."""
    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.engine.settings import EngineSettings

    structs = _batch()
    host = flat(structs)
    refs = flat([reference(a) for a in structs])  # every system periodic with a vacuum (cluster too)
    gpu = Ensemble([str(MODEL)])
    cpu = Ensemble([str(MODEL)], settings=EngineSettings(fast=frozenset(), kernels=False))
    want = cpu.evaluate(*host, atomic=True)
    want_ref = cpu.evaluate(*refs)
    dev = [cp.asarray(x) for x in host]
    layout = gpu.layout(dev[1], dev[2], dev[4])
    for _ in range(3):
        got = gpu.evaluate(*dev, atomic=True, layout=layout)
        for k in ("energy", "force", "virial", "atom_energy", "atom_virial"):
            assert isinstance(got[k], cp.ndarray)
            assert rel_err(got[k].get(), want[k]) < 1e-12, k
        for k in ("energy", "force", "virial"):
            assert rel_err(got[k].get(), want_ref[k]) < 1e-10, k


def test_explore_slab_on_gpu_equals_cpu(tmp_path):
    """NVT on a slab lying above its cell, explored on the GPU (CuPy state, CUDA graphs) and on the
    CPU: the same frames (1e-8 A), pbc T T F, z not wrapped."""
    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.md.explorer import Explorer
    from dpsnake.md.providers import EnsembleProvider
    from dpsnake.md.trajectory import read_frames
    from dpsnake.md.walkers import parse_walkers

    at = slab(seed=8)
    at.positions = at.positions + [0.0, 0.0, 30.0]
    at.write(tmp_path / "slab.extxyz")
    frames = {}
    for name, xp in (("cpu", np), ("gpu", cp)):
        ws = parse_walkers([walker("w", str(tmp_path / "slab.extxyz"), ensemble="nvt", nsteps=40, trj_freq=10)])
        Explorer(ws, EnsembleProvider(Ensemble([str(MODEL)], xp=xp)), ["Cu"], tmp_path / name, progress=False).run()
        frames[name] = read_frames(tmp_path / name / "w" / "traj.extxyz")
    assert len(frames["gpu"]) == 5
    for x, y in zip(frames["gpu"], frames["cpu"]):
        assert x.pbc.tolist() == [True, True, False]
        assert np.abs(x.positions - y.positions).max() < 1e-8
        assert x.positions[:, 2].min() > at.cell[2, 2]


def test_deepmd_provider_on_gpu_equals_cpu():
    """DeePMD-kit's PyTorch model on CUDA (CuPy state through DLPack, the slabs' vacuum boxes made on
    the device) equals the CPU provider and the reference on slabs, a wire and a bulk cell."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("deepmd")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    pth = MODEL.with_suffix(".pth")
    if not pth.exists():
        pytest.skip(f"no model at {pth}")
    from dpsnake.md.deepmd_provider import DeepmdProvider

    structs = [*variants(slab(seed=5)).values(), wire(seed=6), bulk_cu(), x_slab(seed=7)]
    host = flat(structs)
    cpu = DeepmdProvider([pth]).evaluate(*host)
    ref = DeepmdProvider([pth]).evaluate(*flat([reference(a) for a in structs]))
    got = DeepmdProvider([pth], xp=cp).evaluate(*(cp.asarray(x) for x in host))
    for k in ("energy", "force", "virial"):
        assert isinstance(got[k], cp.ndarray)
        assert rel_err(got[k].get(), cpu[k]) < 1e-10, k
        assert rel_err(got[k].get(), ref[k]) < 1e-10, k
