"""DeePMD-kit provider on a GPU: CuPy state <-> torch through DLPack (skipped without CuPy + a CUDA device)."""

import numpy as np
import pytest
from engine_helpers import cupy_or_skip

cp = cupy_or_skip()
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("torch sees no CUDA device", allow_module_level=True)

from test_md_deepmd import TYPE_MAP, cuni, flat_state, mixed_batch, walker, write  # noqa: E402


def test_gpu_batch_equals_cpu(pt_model):
    """The mixed-size batch on the GPU (CuPy in, CuPy out) equals the CPU provider to 1e-10 relative."""
    from dpsnake.md.deepmd_provider import DeepmdProvider

    m = pt_model("dpa3")
    st = flat_state(mixed_batch())
    ref = DeepmdProvider([m["pth"]])(st, True)
    dst = type(st)(**{k: cp.asarray(v) for k, v in vars(st).items()})
    out = DeepmdProvider([m["pth"]], xp=cp)(dst, True)
    for k in ("energy", "force", "virial"):
        assert isinstance(out[k], cp.ndarray)
        got = out[k].get()
        assert np.abs(got - ref[k]).max() <= 1e-10 * np.abs(ref[k]).max(), k


def test_gpu_explore_equals_cpu(tmp_path, pt_model):
    """20 NPT steps of two walkers on CuPy (with the CUDA-graph integrator) equal the NumPy run's frames."""
    from dpsnake.md.deepmd_provider import DeepmdProvider
    from dpsnake.md.explorer import Explorer
    from dpsnake.md.trajectory import read_frames
    from dpsnake.md.walkers import parse_walkers

    models = [pt_model("se_atten_v2")["pth"], pt_model("se_atten_v2", seed=2)["pth"]]
    ws = [
        walker(
            "a",
            write(cuni((2, 2, 2), seed=1), tmp_path / "a.extxyz"),
            ensemble="npt",
            pressure=1000.0,
            nsteps=20,
            trj_freq=5,
            seed=3,
        ),
        walker(
            "b",
            write(cuni((1, 1, 1), seed=2, a=3.7), tmp_path / "b.extxyz"),
            ensemble="nvt",
            nsteps=20,
            trj_freq=5,
            seed=4,
        ),
    ]
    for xp, d in ((np, "cpu"), (cp, "gpu")):
        Explorer(parse_walkers(ws), DeepmdProvider(models, xp=xp), TYPE_MAP, tmp_path / d, xp=xp, progress=False).run()
    for w in ("a", "b"):
        fa, fb = read_frames(tmp_path / "cpu" / w / "traj.extxyz"), read_frames(tmp_path / "gpu" / w / "traj.extxyz")
        assert len(fa) == len(fb) == 5
        assert max(np.abs(x.positions - y.positions).max() for x, y in zip(fa, fb)) < 1e-8
        da = np.loadtxt(tmp_path / "cpu" / w / "model_devi.out")
        db = np.loadtxt(tmp_path / "gpu" / w / "model_devi.out")
        assert np.allclose(da, db, rtol=1e-5, atol=1e-12)
