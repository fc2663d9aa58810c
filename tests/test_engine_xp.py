"""The NumPy fast forms in dpsnake.engine.xp give the same bits as the general forms they replace."""

from __future__ import annotations

import numpy as np
import pytest

from dpsnake.engine.xp import dot3, take_rows


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dot3_equals_the_reduction_bitwise(dtype):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(37, 53, 3)).astype(dtype)
    b = rng.normal(size=(37, 53, 4)).astype(dtype)[..., 1:]  # a strided view, as gR[..., 1:]
    for x, y in ((a, a), (a, b), (b[:, ::2], a[:, ::2])):
        out = dot3(x, y)
        assert out.dtype == dtype and out.shape == x.shape[:-1]
        assert np.array_equal(out, (x * y).sum(axis=-1))


def test_take_rows_equals_fancy_indexing():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 3))
    idx = rng.integers(0, 500, size=(40, 27, 11))
    assert np.array_equal(take_rows(np, a, idx), a[idx])
    assert np.array_equal(take_rows(np, a[:, 0], idx), a[:, 0][idx])
