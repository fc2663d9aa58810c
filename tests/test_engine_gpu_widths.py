"""Guessed compaction widths on a GPU (the default there): the async copy of each chunk's stats,
the check after the call is issued, the redo when a chunk outgrew the guess; CuPy against NumPy.

Needs CuPy with a device and the small two-type model the device runs carry (DPSNAKE_GPU_CUNI,
default .whl/models/t_cuni.dp); skipped otherwise (CI has no GPU):
    python -m pytest tests/test_engine_gpu_widths.py
"""

from __future__ import annotations

import warnings

import numpy as np
from engine_helpers import cupy_or_skip, fcc, gpu_model, rel_err

cp = cupy_or_skip()
MODEL, pytestmark = gpu_model("DPSNAKE_GPU_CUNI", "t_cuni.dp")


def _batch(a, nsys=6, seed=0):
    """nsys rattled CuNi cells of lattice constant a as flat (coords, atype, system, cells, pbc)."""
    ats = [fcc(a=a, rep=(2, 2, 2), ni_frac=0.3, seed=seed + k) for k in range(nsys)]
    coords = np.concatenate([at.positions for at in ats])
    atype = np.concatenate([(np.array(at.get_chemical_symbols()) == "Ni").astype(int) for at in ats])
    system = np.repeat(np.arange(nsys), [len(at) for at in ats])
    return coords, atype, system, np.stack([at.cell.array for at in ats]), np.ones(nsys, dtype=bool)


def test_guessed_widths_on_gpu_equal_numpy():
    from dpsnake.engine.ensemble import Ensemble

    gpu = Ensemble(  # default settings: widths guessed on CuPy
        [str(MODEL)], precision="double", chunk_atoms=40
    )
    loose, dense = _batch(4.0), _batch(3.45)
    for host, misses in [(loose, 0), (loose, 0), (dense, 1), (dense, 1), (loose, 1)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the dense cells overflow sel
            got = gpu.evaluate(*(cp.asarray(x) for x in host), atomic=True)
            cpu = Ensemble([str(MODEL)], precision="double", chunk_atoms=40)
            ref = cpu.evaluate(*host, atomic=True)
        assert gpu.width_misses == misses
        assert gpu.last_overflow == cpu.last_overflow  # read from the same async copies
        for key in ("energy", "force", "virial", "atom_energy", "atom_virial"):
            assert rel_err(cp.asnumpy(got[key]), ref[key]) < 1e-11, key
    assert len(gpu._widths) > 2  # several chunks, each with its own widths
