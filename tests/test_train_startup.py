"""What `dpsnake train` does around DeePMD-kit to start and step faster (issue 17, the GPU demo), checked
against DeePMD-kit's own code on real deepmd/npy data:

- ``observed_types``: the ``model.info.observed_type`` DeePMD-kit's PyTorch trainer would compute
  (``collect_observed_types`` on the data's types mapped to the model's type_map);
- ``serial_frame_loading``: DeePMD-kit's frame loader without its per-frame thread pool returns the
  same arrays; the stand-in executor returns results and raises errors as a thread pool does.
"""

from __future__ import annotations

import numpy as np
import pytest
from dpmodels import emt_dataset


def _deepmd_observed(systems, type_map):
    """DeePMD-kit's own answer: its data reader maps each system's types onto ``type_map``, then
    ``collect_observed_types`` sorts the elements found."""
    from deepmd.dpmodel.utils.stat import collect_observed_types
    from deepmd.utils.data import DeepmdData

    sampled = [{"atype": DeepmdData(str(s), type_map=type_map).atom_type[None, :]} for s in systems]
    return collect_observed_types(sampled, type_map)


@pytest.mark.parametrize(
    "kinds, type_map",
    [
        (["Cu"], ["Cu"]),
        (["Cu", "CuNi"], ["Ni", "Cu"]),  # the model's order is not the data's
        (["CuNiAl"], ["H", "Ni", "Cu", "Al", "O"]),  # types the data never has
    ],
)
def test_observed_types_equal_deepmd(model_cache, kinds, type_map):
    from dpsnake.workflow.train import observed_types

    systems = [emt_dataset(model_cache, k) for k in kinds]
    ours = observed_types([str(s) for s in systems], type_map)
    assert ours == _deepmd_observed(systems, type_map)
    assert set(ours) == {e for k in kinds for e in ("Cu", "Ni", "Al") if e in k}


def test_observed_types_leave_mixed_type_data_to_deepmd(tmp_path, model_cache):
    import dpdata

    from dpsnake.workflow.train import observed_types

    s = dpdata.LabeledSystem(str(emt_dataset(model_cache, "CuNi")), fmt="deepmd/npy")
    dpdata.MultiSystems(s).to_deepmd_npy_mixed(str(tmp_path / "mixed"))
    folders = sorted(str(p.parent) for p in (tmp_path / "mixed").rglob("type.raw"))
    assert folders and observed_types(folders, ["Cu", "Ni"]) is None


def test_serial_frame_loading_gives_deepmds_frames(model_cache, monkeypatch):
    import deepmd.utils.data as data

    from dpsnake.workflow.train_proc import SerialExecutor, serial_frame_loading

    monkeypatch.setattr(data, "ThreadPoolExecutor", data.ThreadPoolExecutor)  # restored after the test
    system = str(emt_dataset(model_cache, "CuNi"))

    def frames():
        d = data.DeepmdData(system, type_map=["Cu", "Ni"])
        d.add("energy", 1, atomic=False, must=False, high_prec=True)
        d.add("force", 3, atomic=True, must=False, high_prec=False)
        d.add("virial", 9, atomic=False, must=False, high_prec=False)
        return [d.get_single_frame(i, 1) for i in range(d.nframes)]

    pooled = frames()
    assert serial_frame_loading() and data.ThreadPoolExecutor is SerialExecutor
    serial = frames()
    assert len(serial) == len(pooled) == 6
    for a, b in zip(pooled, serial):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
        assert np.abs(np.asarray(a["force"])).max() > 0  # real labels, not zeros

    with SerialExecutor(max_workers=3) as ex:
        assert ex.submit(pow, 2, 10).result() == 1024
        failed = ex.submit(int, "x")
    assert failed.done() and isinstance(failed.exception(), ValueError)
    with pytest.raises(ValueError):
        failed.result()
