"""Config validation: every bad input fails before any work with one line naming the key or file."""

from __future__ import annotations

import copy
import pathlib
import subprocess
import sys

import pytest
import yaml

from dpsnake.errors import UserError
from dpsnake.workflow import config as C

ROOT = pathlib.Path(__file__).resolve().parents[1]
REDUCED = yaml.safe_load((ROOT / "tests" / "configs" / "reduced.yaml").read_text())


def _bad(mutate, tmp_path=ROOT):
    cfg = copy.deepcopy(REDUCED)
    mutate(cfg)
    with pytest.raises(UserError) as err:
        C.check(cfg, tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_shipped_configs_are_valid():
    for path in (ROOT / "config" / "config.yaml", ROOT / "tests" / "configs" / "reduced.yaml"):
        cfg = C.load(path, ROOT)
        assert cfg["train"]["numb_models"] >= 2
        assert cfg["type_map"] == ["Cu", "Ni"] and set(cfg["systems"]) == {"Cu", "CuNi"}
    demo = C.load(ROOT / "config" / "config.yaml", ROOT)
    temps = [t for st in demo["explore"]["stages"] for t in st["temperatures"]]
    press = [p for st in demo["explore"]["stages"] for p in st["pressures"]]
    assert min(temps) == 300 and max(temps) == 1200 and min(press) == 0 and max(press) == 10000
    assert demo["label"]["calculator"] == "EMT" and demo["train"]["numb_models"] == 4


def test_defaults_filled():
    cfg = C.check({"type_map": ["Cu"], "systems": {"Cu": {"structure": {"builder": "bulk", "kwargs": {"name": "Cu"}}}},
                   "explore": {"stages": [{"temperatures": [300]}]}}, ROOT)
    assert cfg["train"]["numb_models"] == 4 and cfg["train"]["backend"] == "tf"
    assert cfg["explore"]["stages"][0]["systems"] == ["Cu"] and cfg["explore"]["stages"][0]["ensemble"] == "nvt"
    assert cfg["trust"]["force"] == [0.05, 0.15] and cfg["label"]["type"] == "ase"
    assert cfg["convergence"]["accurate_ratio"] == 0.95 and cfg["select"]["pick"] == "random"


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c.update(foo=1), "foo: unknown key"),
    (lambda c: c["train"].update(numb_stepz=5), "train.numb_stepz: unknown key"),
    (lambda c: c["train"].update(numb_models="two"), "train.numb_models: 'two' is not of type 'integer'"),
    (lambda c: c["explore"]["stages"][0].update(temperatures="hot"), "explore.stages[0].temperatures"),
    (lambda c: c["explore"]["stages"][0].update(ensemble="npx"), "explore.stages[0].ensemble"),
    (lambda c: c["explore"]["stages"][0].update(systems=["Fe"]), "explore.stages[0].systems: unknown system 'Fe'"),
    (lambda c: c.pop("systems"), "'systems' is a required property"),
    (lambda c: c["trust"].update(force=[0.3, 0.1]), "trust.force: theta_low 0.3 must be below theta_high 0.1"),
    (lambda c: c["systems"]["Cu"].update(trust={"force": [0.2]}), "systems.Cu.trust.force"),
    (lambda c: c.update(type_map=["Cu"]), "systems.CuNi.structure: elements ['Ni'] not in the global type_map"),
    (lambda c: c["systems"]["Cu"].update(type_map=["Cu", "Fe"]), "systems.Cu.type_map: element 'Fe'"),
    (lambda c: c["train"]["input"]["model"].update(type_map=["Ni", "Cu"]), "train.input.model.type_map"),
    (lambda c: c["systems"]["Cu"].update(structure={"file": "nope/POSCAR"}), "systems.Cu.structure.file: nope/POSCAR: no such file"),
    (lambda c: c["systems"]["Cu"]["structure"].update(builder="no_such_builder"), "systems.Cu.structure.builder"),
    (lambda c: c["systems"]["Cu"]["structure"].update(file="x.vasp"), "systems.Cu.structure: give exactly one of"),
    (lambda c: c["systems"]["Cu"].update(init_data="missing_data"), "systems.Cu.init_data: missing_data: no such file or folder"),
    (lambda c: c.update(masses={"Fe": 55.8}), "masses.Fe: element not in type_map"),
    (lambda c: c["label"].update(calculator="NoSuchCalc"), "label.calculator"),
    (lambda c: c["label"].update(type="vasp-nope"), "label.type: unknown labeler"),
    (lambda c: c.update(test_data=["no/such/set"]), "test_data[0]: no/such/set"),
    (lambda c: c["systems"].update({"bad name": c["systems"]["Cu"]}), "name 'bad name'"),
    (lambda c: c["explore"].update(compress=-1.0), "explore.compress"),
    (lambda c: c["explore"].update(compress="yes"), "explore.compress"),
])
def test_bad_config_one_line(mutate, expected):
    assert expected in _bad(mutate)


def test_init_data_type_map_mismatch(tmp_path):
    """An existing dataset holding an element outside the global type_map is named with its file."""
    import dpdata
    from ase.build import bulk
    from ase.calculators.emt import EMT

    a = bulk("Ag", "fcc", a=4.1, cubic=True)
    a.calc = EMT()
    a.get_potential_energy()
    dpdata.LabeledSystem(a, fmt="ase/structure").to_deepmd_npy(str(tmp_path / "ag"))
    cfg = copy.deepcopy(REDUCED)
    cfg["systems"]["Cu"]["init_data"] = str(tmp_path / "ag")
    with pytest.raises(UserError, match=r"systems.Cu.init_data: .*ag: elements \['Ag'\] not in the global type_map"):
        C.check(cfg, ROOT)


def test_check_config_cli_and_snakemake_fail_with_one_line(tmp_path):
    bad = copy.deepcopy(REDUCED)
    bad["select"]["pick"] = "best"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    p = subprocess.run([sys.executable, "-m", "dpsnake.cli", "check-config", str(tmp_path / "bad.yaml")],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "select.pick: 'best' is not one of" in p.stderr
    ok = subprocess.run([sys.executable, "-m", "dpsnake.cli", "check-config", str(ROOT / "config" / "config.yaml"),
                         "--base", str(ROOT), "--out", str(tmp_path / "resolved.json")], capture_output=True, text=True)
    assert ok.returncode == 0 and (tmp_path / "resolved.json").is_file()
    # through Snakemake: the same line, before any job (nothing is created)
    p = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "-s", str(ROOT / "Snakefile"),
                        "--configfile", str(tmp_path / "bad.yaml"), "--directory", str(tmp_path)],
                       capture_output=True, text=True)
    assert p.returncode != 0
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert lines == ["config error: select.pick: 'best' is not one of ['random', 'highest']"], lines
    assert not (tmp_path / "results").exists()
