"""Engine edge cases found against DeePMD-kit's own test suite (issue 19 item 7), checked against
DeePMD-kit itself: frames without atoms, and a fitting's ``exclude_types`` next to the model's
``atom_exclude_types``."""

from __future__ import annotations

import numpy as np
import pytest
from engine_helpers import edit_dp, fcc, frame, ref_eval, rel_err

FP64_TOL = 1e-10
CELLS2 = np.tile((10.0 * np.eye(3)).reshape(1, 9), (2, 1))


@pytest.fixture(scope="module")
def cuni(dp_model):
    return dp_model(data="CuNi")


@pytest.mark.parametrize(
    "coords,cells",
    [
        (np.zeros((2, 0)), CELLS2),  # (nf, nat*3) with a box
        (np.zeros((2, 0, 3)), None),  # (nf, nat, 3) without
        (np.zeros((3, 0)), np.tile(10.0 * np.eye(3), (3, 1, 1))),  # (nf, 3, 3) cells
    ],
    ids=["box", "nopbc", "box33"],
)
def test_zero_atoms_equal_deepmd(pt_model, coords, cells):
    """No atoms: energy (nf, 1), force (nf, 0, 3), virial (nf, 9) [, atom_energy (nf, 0, 1),
    atom_virial (nf, 0, 9)], all zeros, exactly as DeePMD-kit's PyTorch backend returns for the same
    se_e2_a model (its TensorFlow backend fails for nf > 1, its NumPy backend for any nf)."""
    from dpsnake import DeepPot

    m = pt_model("se_e2_a")
    types = np.zeros(0, dtype=np.int64)
    ours = DeepPot(str(m["dp"])).eval(coords, cells, types, atomic=True)
    pytest.importorskip("torch")
    from deepmd.infer import DeepPot as RefPot

    ref = RefPot(str(m["pth"])).eval(coords, cells, types, atomic=True)
    nf = coords.shape[0]
    shapes = [(nf, 1), (nf, 0, 3), (nf, 9), (nf, 0, 1), (nf, 0, 9)]
    for a, b, shape in zip(ours, ref, shapes):
        assert a.shape == np.asarray(b).shape == shape
        assert a.dtype == np.float64 and not np.any(a)
        assert np.array_equal(a, b)
    e, f, v = DeepPot(str(m["dp"])).eval(coords, cells, types)
    assert (e.shape, f.shape, v.shape) == tuple(shapes[:3])


def test_zero_atoms_model_devi_is_one_line(cu_model):
    """DeePMD-kit's calc_model_devi fails on frames without atoms (a reduction over no atoms);
    ours says so in one line."""
    from dpsnake import calc_model_devi
    from dpsnake.errors import UserError

    with pytest.raises(UserError, match="no atoms") as err:
        calc_model_devi(np.zeros((2, 0)), CELLS2, np.zeros(0, dtype=np.int64), [str(cu_model["dp"])] * 2)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "edit,same_as",
    [
        ({"fitting": [1]}, {}),  # the fitting's list alone: ignored
        ({"fitting": [0], "model": [1]}, {"model": [1]}),  # the model's list wins
    ],
    ids=["fitting_only", "fitting_and_model"],
)
def test_fitting_exclude_types_ignored_as_deepmd(cuni, tmp_path, edit, same_as):
    """DeePMD-kit's atomic model resets the fitting's ``exclude_types`` to the model's
    ``atom_exclude_types`` (``fitting_net.reinit_exclude``): the fitting's own list changes nothing.
    Energies against DeePMD-kit's NumPy backend evaluating the edited .dp file."""
    from dpsnake import DeepPot
    from dpsnake.engine.model import load_model

    def apply(spec):
        def fn(m):
            if "fitting" in spec:
                m["fitting"]["exclude_types"] = spec["fitting"]
            if "model" in spec:
                m["atom_exclude_types"] = spec["model"]

        return fn

    p = edit_dp(cuni["dp"], tmp_path / "edit.dp", apply(edit))
    q = edit_dp(cuni["dp"], tmp_path / "same.dp", apply(same_as))
    c, cl, t = frame(fcc(rep=(2, 2, 2), ni_frac=0.5, seed=21), ["Cu", "Ni"])
    ref = ref_eval(p, c, cl, t)
    assert rel_err(ref[0], ref_eval(q, c, cl, t)[0]) < FP64_TOL  # DeePMD-kit: the same model
    assert rel_err(ref[3], ref_eval(q, c, cl, t)[3]) < FP64_TOL
    m = load_model(p, exclusion="v3")
    assert list(m.atom_exclude) == [t in same_as.get("model", []) for t in range(2)]
    e, f, v, ae, av = DeepPot(m).eval(c, cl, t, atomic=True)
    assert rel_err(e, ref[0]) < FP64_TOL and rel_err(ae, ref[3]) < FP64_TOL
