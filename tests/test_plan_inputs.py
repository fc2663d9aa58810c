"""What the plan and the initial data record about their inputs, fast (no training; issue 19, item 9):
plan.json's structure fingerprints, a stale exploration checkpoint removed when a start structure
changes, init data's source.json, and the report's list of data built from an older input."""

from __future__ import annotations

import copy
import json
import pathlib
import subprocess
import sys

import yaml

from dpsnake.report.sources import stale_data
from dpsnake.workflow.config import check, write_if_changed
from dpsnake.workflow.structures import changed, file_sha256, fingerprint

ROOT = pathlib.Path(__file__).resolve().parents[1]


def dpsnake(*args, cwd):
    p = subprocess.run([sys.executable, "-m", "dpsnake.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def _structure(path: pathlib.Path, a: float) -> str:
    import ase.io
    from ase.build import bulk

    ase.io.write(path, bulk("Cu", "fcc", a=a, cubic=True).repeat((2, 2, 2)), format="extxyz")
    return file_sha256(path)


def _config(tmp_path, **cu) -> dict:
    """tests/configs/reduced.yaml with Cu read from cu.extxyz (CuNi stays an ASE builder)."""
    raw = copy.deepcopy(yaml.safe_load((ROOT / "tests" / "configs" / "reduced.yaml").read_text()))
    raw["systems"]["Cu"] = {"structure": {"file": "cu.extxyz"}, **cu}
    raw["init_data"] = {"scales": [1.0], "perturbations": 2}
    cfg = check(raw, tmp_path)
    write_if_changed(cfg, tmp_path / "results" / "config.json")
    return cfg


def test_plan_records_structures_and_drops_a_stale_checkpoint(tmp_path):
    sha = _structure(tmp_path / "cu.extxyz", 3.61)
    _config(tmp_path)
    ex = tmp_path / "results" / "iter.000000" / "explore"
    plan = ["plan", "--config", "results/config.json", "--iter", 0, "--out", ex / "walkers.json"]
    dpsnake(*plan, cwd=tmp_path)
    rec = json.loads((ex / "plan.json").read_text())["structures"]
    assert rec["Cu"]["file"] == "cu.extxyz" and rec["Cu"]["sha256"] == sha
    assert rec["CuNi"]["builder"] == "bulk" and "sha256" not in rec["CuNi"]
    # the explore runner's checkpoint of an interrupted exploration (it knows walker specs, not the
    # structures' contents): kept when the plan is rewritten from the same structures ...
    ck = ex / "checkpoint.npz"
    ck.write_bytes(b"an interrupted exploration")
    dpsnake(*plan, cwd=tmp_path)
    assert ck.is_file()
    # ... removed when a start structure changed, so the exploration starts from the new one
    new = _structure(tmp_path / "cu.extxyz", 3.65)
    dpsnake(*plan, cwd=tmp_path)
    assert not ck.exists()
    assert json.loads((ex / "plan.json").read_text())["structures"]["Cu"]["sha256"] == new
    import ase.io

    assert ase.io.read(ex / "structures" / "Cu.extxyz").cell[0, 0] == 2 * 3.65


def test_init_data_source_and_stale_data(tmp_path):
    import dpdata

    res = tmp_path / "results"
    sha = _structure(tmp_path / "cu.extxyz", 3.61)
    cfg = _config(tmp_path)
    dpsnake(
        "init-data", "--config", "results/config.json", "--system", "Cu", "--out", res / "data/init/Cu", cwd=tmp_path
    )
    src = json.loads((res / "data/init/Cu/source.json").read_text())
    assert src["init_data"] is None and src["structure"] == fingerprint(cfg["systems"]["Cu"]["structure"], tmp_path)
    assert src["structure"]["sha256"] == sha
    assert dpdata.LabeledSystem(str(res / "data/init/Cu"), fmt="deepmd/npy").get_nframes() == 2  # still a dataset
    assert not len(stale_data(cfg, res, tmp_path))
    new = _structure(tmp_path / "cu.extxyz", 3.65)
    rows = stale_data(cfg, res, tmp_path).to_dict(orient="records")
    assert rows == [
        {
            "data": "data/init/Cu",
            "system": "Cu",
            "note": f"initial data built from an older version of cu.extxyz (sha256 {sha[:12]}, now {new[:12]})",
        }
    ]

    # an existing dataset as init_data: its files' hash is recorded and compared
    (tmp_path / "own").mkdir()
    s = dpdata.LabeledSystem(str(res / "data/init/Cu"), fmt="deepmd/npy")
    s.to_deepmd_npy(str(tmp_path / "own" / "Cu"))
    cfg = _config(tmp_path, init_data="own/Cu")
    dpsnake(
        "init-data", "--config", "results/config.json", "--system", "Cu", "--out", res / "data/init/Cu", cwd=tmp_path
    )
    src = json.loads((res / "data/init/Cu/source.json").read_text())
    assert src["init_data"] == "own/Cu" and src["structure"] is None and len(src["init_data_sha256"]) == 64
    assert not len(stale_data(cfg, res, tmp_path))
    s[:1].to_deepmd_npy(str(tmp_path / "own" / "Cu"))  # one frame less
    (note,) = stale_data(cfg, res, tmp_path)["note"]
    assert note.startswith("initial data converted from an older version of own/Cu (sha256 ")


def test_changed_in_words():
    a = {"file": "a.vasp", "sha256": "1" * 64, "spec_sha256": "x"}
    assert changed(a, a) is None and changed(None, a) is None
    assert changed(a, {**a, "sha256": "2" * 64}) == (
        f"built from an older version of a.vasp (sha256 {'1' * 12}, now {'2' * 12})"
    )
    assert changed(a, {**a, "sha256": None}) == "built from a.vasp, which no longer exists"
    assert (
        changed(a, {"file": "b.vasp", "sha256": "1" * 64, "spec_sha256": "y"})
        == "built from a.vasp; the config now names b.vasp"
    )
    assert (
        changed(a, {**a, "spec_sha256": "y"})
        == "built from an older version of the system's structure settings in the config"
    )
    assert changed({"builder": "bulk", "spec_sha256": "x"}, {"builder": "bulk", "spec_sha256": "x"}) is None
