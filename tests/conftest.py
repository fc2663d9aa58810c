import os
import pathlib
import shutil

import pytest
from dpmodels import SEED2, train_model


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> pathlib.Path:
    """Folder where trained test models live (DPSNAKE_TEST_CACHE keeps them between sessions)."""
    env = os.environ.get("DPSNAKE_TEST_CACHE")
    if env:
        p = pathlib.Path(env)
        p.mkdir(parents=True, exist_ok=True)
        return p
    return tmp_path_factory.mktemp("dpmodels")


@pytest.fixture(scope="session")
def dp_model(model_cache):
    """Factory: dp_model(overrides=None, data="Cu") -> {"pb", "dp", "input", "dir"} (trained once per session)."""
    return lambda overrides=None, data="Cu": train_model(model_cache, overrides, data)


@pytest.fixture(scope="session")
def cu_model(dp_model):
    """The default FP64 single-type Cu model."""
    return dp_model()


@pytest.fixture(scope="session")
def pt_model(model_cache):
    """Factory: pt_model(descriptor="se_atten_v2", seed=1, steps=10) -> {"pth", "dp", "input", "dir"}
    (DeePMD-kit PyTorch backend, CuNi data; trained once per session)."""
    from dpmodels import train_pt_model

    return lambda descriptor="se_atten_v2", seed=1, steps=10, overrides=None: train_pt_model(
        model_cache, descriptor, seed, steps, overrides
    )


@pytest.fixture
def wd(tmp_path):
    """A copy of the workflow (not the package: that is installed) in a temporary folder, with
    tests/configs/reduced.yaml as reduced.yaml (test_workflow.CONFIG)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    for name in ("Snakefile", "workflow", "config", "profiles", "envs"):
        src = root / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    shutil.copy(root / "tests" / "configs" / "reduced.yaml", tmp_path / "reduced.yaml")
    return tmp_path


@pytest.fixture(scope="module")
def models(cu_model, dp_model):
    """Two FP64 Cu models (.dp paths) that differ by their seeds: an ensemble for MD and deviation tests."""
    return [str(cu_model["dp"]), str(dp_model(SEED2)["dp"])]
