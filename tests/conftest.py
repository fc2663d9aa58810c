import os
import pathlib

import pytest

from dpmodels import emt_dataset, train_model


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
