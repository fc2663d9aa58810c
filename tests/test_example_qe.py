"""config/examples/cu-qe.yaml end to end: the whole loop with real Quantum ESPRESSO labels (pw.x,
Debian's Cu PAW pseudopotential), two short iterations on a 4-atom cell. The test runs the example with
fewer pw.x calls and cheaper ones (2 initial frames instead of 4, one label per iteration instead of two,
the Gamma point instead of 2x2x2 k-points, about a third less CPU per call; every other key as shipped):
5 pw.x calls instead of 9 (the recomputed label included); the checks do not depend on these numbers."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
from test_workflow import smk

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "examples" / "cu-qe.yaml"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.dft,
    pytest.mark.skipif(shutil.which("pw.x") is None, reason="pw.x not installed (apt: quantum-espresso)"),
]


def test_cu_qe_example_runs_the_loop_with_real_qe_labels(tmp_path):
    import ase.io
    import dpdata
    import yaml

    from dpsnake.labelers import make_labeler
    from dpsnake.labelers.io import read_labeled

    for name in ("Snakefile", "workflow", "config", "profiles", "envs"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["init_data"]["perturbations"] = 1
    cfg["select"]["max_candidates"] = 1
    cfg["label"]["kpts"] = [1, 1, 1]
    (tmp_path / "reduced.yaml").write_text(yaml.safe_dump(cfg))  # smk() passes --configfile reduced.yaml
    smk(tmp_path)

    res = tmp_path / "results"
    iters = sorted(res.glob("iter.*/select/stats.json"))
    assert len(iters) == cfg["convergence"]["max_iterations"] == 2
    labels = sorted(res.glob("iter.*/label/task.*.extxyz"))
    assert labels, "no frame was selected for labelling"
    ok = [p for p in labels if read_labeled(p)[1]]
    summaries = [json.loads(p.read_text()) for p in res.glob("iter.*/collect/summary.json")]
    assert sum(s["labelled"] for s in summaries) == len(ok)
    assert sum(s["failed"] for s in summaries) == len(labels) - len(ok)

    # the dataset holds DFT numbers (PAW total energies are ~ -2,900 eV per Cu atom; EMT's are ~0)
    frames = []
    for d in sorted(res.glob("data/**/type.raw")):
        s = dpdata.LabeledSystem(str(d.parent), fmt="deepmd/npy")
        frames.append(s["energies"] / s.get_natoms())
    e_atom = np.concatenate(frames)
    n_init = len(cfg["init_data"]["scales"]) * cfg["init_data"]["perturbations"]
    assert len(e_atom) == n_init + len(ok) and n_init == 2  # the initial frames + every good label, nothing twice
    assert np.all(e_atom < -1000.0)

    # one label recomputed by calling pw.x again through the labeler equals what the loop stored
    atoms, good, _ = read_labeled(ok[0] if ok else labels[0])
    assert good
    spec = json.loads((res / "config.json").read_text())["label"]
    again = make_labeler(spec).label(ase.io.read(ok[0]), tmp_path / "again")
    assert again.ok, again.reason
    assert again.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-6)
    np.testing.assert_allclose(again.forces, atoms.get_forces(), atol=1e-6)
    assert (res / "reports" / "index.html").is_file() and (res / "models" / "final").is_dir()
