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
    cfg = C.check(
        {
            "type_map": ["Cu"],
            "systems": {"Cu": {"structure": {"builder": "bulk", "kwargs": {"name": "Cu"}}}},
            "explore": {"stages": [{"temperatures": [300]}]},
        },
        ROOT,
    )
    assert cfg["train"]["numb_models"] == 4 and cfg["train"]["backend"] == "tf"
    assert cfg["explore"]["stages"][0]["systems"] == ["Cu"] and cfg["explore"]["stages"][0]["ensemble"] == "nvt"
    assert cfg["trust"]["force"] == [0.05, 0.15] and cfg["label"]["type"] == "ase"
    assert cfg["convergence"]["accurate_ratio"] == 0.95 and cfg["select"]["pick"] == "random"


def test_check_config_cli_writes_the_resolved_config(tmp_path):
    """A valid config: exit 0 and the resolved config written (the bad ones: tests/bad_inputs/config.py)."""
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpsnake.cli",
            "check-config",
            str(ROOT / "config" / "config.yaml"),
            "--base",
            str(ROOT),
            "--out",
            str(tmp_path / "resolved.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and (tmp_path / "resolved.json").is_file()


def _check(mutate):
    cfg = copy.deepcopy(REDUCED)
    mutate(cfg)
    with pytest.raises(UserError) as err:
        C.check(cfg, ROOT)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_slab_from_ase_builder_needs_nvt_and_a_vacuum():
    """fcc111(..., vacuum=10) has pbc (True, True, False): explored as a slab, but not with the reduced
    config's npt stage (one line with the remedy); without a vacuum of rcut along its non-periodic
    direction (training sees the cell as periodic) it is one line naming the length needed."""
    slab = {"builder": "fcc111", "kwargs": {"symbol": "Cu", "size": [2, 2, 3], "vacuum": 10.0}}
    msg = _check(lambda c: c["systems"]["Cu"].update(structure=slab))
    assert msg.startswith("explore.stages[0].ensemble: npt needs a cell periodic in all directions, but system Cu")
    assert "use nvt for it" in msg

    def nvt(c, vacuum):
        c["systems"]["Cu"]["structure"] = {"builder": "fcc111", "kwargs": dict(slab["kwargs"], vacuum=vacuum)}
        c["explore"]["stages"][0].update(ensemble="nvt")
        c["explore"]["stages"][0].pop("pressures")

    fixed = copy.deepcopy(REDUCED)
    nvt(fixed, 10.0)
    assert C.check(fixed, ROOT)["systems"]["Cu"]["structure"]["kwargs"]["vacuum"] == 10.0
    msg = _check(lambda c: nvt(c, 1.0))
    assert msg.startswith("systems.Cu.structure.builder: fcc111: pbc [True, True, False]: the cell is")
    assert "vacuum of rcut 4 A" in msg


def test_sel_counts_match_a_brute_force_count():
    """The neighbour count behind the sel check is the plain count r < rcut over periodic images."""
    import itertools

    import numpy as np
    from ase.build import bulk

    from dpsnake.workflow.check_structures import neighbour_counts

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    atoms.symbols[[0, 5, 9]] = "Ni"
    atoms.rattle(0.05, seed=1)
    atype = np.array([["Cu", "Ni"].index(s) for s in atoms.get_chemical_symbols()])
    counts = neighbour_counts(atoms, 4.0, 2, atype)
    cell = atoms.cell.array
    brute = np.zeros_like(counts)
    for i, j in itertools.product(range(len(atoms)), repeat=2):
        for n in itertools.product(range(-2, 3), repeat=3):
            d = np.linalg.norm(atoms.positions[j] + np.array(n) @ cell - atoms.positions[i])
            if 0 < d < 4.0:
                brute[i, atype[j]] += 1
    np.testing.assert_array_equal(counts, brute)
    assert counts.sum(axis=1).max() == 18  # fcc: 12 + 6 neighbours within 4 A


def test_sel_semantics_per_type_and_total():
    """se_e2_a: sel per type (CuNi has at most 12 Ni neighbours within 4 A, so sel [32, 10] fails on
    Ni); se_atten_v2: one total (18 neighbours)."""
    from dpsnake.workflow.check_structures import check_sel
    from dpsnake.workflow.structures import build_structure

    atoms_of = {n: build_structure(s["structure"]) for n, s in REDUCED["systems"].items()}
    cfg = {"type_map": ["Cu", "Ni"]}
    per_type = lambda sel: {"descriptor": {"type": "se_e2_a", "rcut": 4.0, "sel": sel}}
    check_sel(cfg, atoms_of, per_type([18, 18]))
    with pytest.raises(
        UserError,
        match=r"descriptor.sel: system CuNi's .* Ni neighbours within rcut 4 A, "
        r"above sel\[1\] = 10 \(Ni\)",
    ):
        check_sel(cfg, atoms_of, per_type([32, 10]))
    check_sel(cfg, atoms_of, per_type("auto"))  # set from the data by DeePMD-kit: nothing to check
    total = lambda sel: {"descriptor": {"type": "se_atten_v2", "rcut": 4.0, "sel": sel}}
    check_sel(cfg, atoms_of, total(18))
    check_sel(cfg, atoms_of, total([9, 9]))  # a list is summed, as DeePMD-kit does
    with pytest.raises(UserError, match=r"descriptor.sel: system Cu's .* 18 neighbours .* above sel = 17"):
        check_sel(cfg, atoms_of, total(17))
    dpa3 = {"descriptor": {"type": "dpa3", "repflow": {"e_rcut": 4.0, "e_sel": 30, "a_rcut": 3.0, "a_sel": 11}}}
    with pytest.raises(UserError, match=r"repflow.a_sel: system Cu's .* 12 neighbours within rcut 3 A"):
        check_sel(cfg, atoms_of, dpa3)
    dpa3["descriptor"]["repflow"]["use_dynamic_sel"] = True
    check_sel(cfg, atoms_of, dpa3)


def test_ase_labeler_kwargs_checked_without_building_the_calculator():
    from dpsnake.labelers import make_labeler

    assert (
        make_labeler(
            {"type": "ase", "calculator": "LennardJones", "kwargs": {"sigma": 2.3, "epsilon": 0.4, "rc": 6.0}}
        ).kwargs["sigma"]
        == 2.3
    )
    assert make_labeler({"type": "ase", "calculator": "MorsePotential", "kwargs": {"rho0": 4.0}})
    with pytest.raises(UserError, match=r"label.kwargs: MorsePotential does not take \['rho'\]"):
        make_labeler({"type": "ase", "calculator": "MorsePotential", "kwargs": {"rho": 4.0}})
    # a calculator whose constructor names all its arguments: Python's own binding says what is wrong
    tip3p = "ase.calculators.tip3p.TIP3P"
    assert make_labeler({"type": "ase", "calculator": tip3p, "kwargs": {"rc": 4.0}})
    with pytest.raises(UserError, match=r"label.kwargs: .*TIP3P: got an unexpected keyword argument 'rcut'"):
        make_labeler({"type": "ase", "calculator": tip3p, "kwargs": {"rcut": 4.0}})
    with pytest.raises(UserError, match=r"label.kwargs: .*SpringCalculator: missing a required argument: 'k'"):
        make_labeler(
            {
                "type": "ase",
                "calculator": "ase.calculators.harmonic.SpringCalculator",
                "kwargs": {"ideal_positions": [[0, 0, 0]]},
            }
        )


def test_label_program_found_like_the_label_job_does(tmp_path):
    from dpsnake.labelers.filebased import missing_program

    assert missing_program("env OMP_NUM_THREADS=1 sh -c 'exit 0'") is None
    assert missing_program("sh -c 'cat x; exit 3'") is None
    assert "'/nonexistent/pw.x': no such file" in missing_program("mpirun -np 2 /nonexistent/pw.x -in {input}")
    assert "'nope.x': not found on PATH" in missing_program("sh -c 'nope.x < {input} > out'")
    prog = tmp_path / "bin" / "mycode"
    prog.parent.mkdir()
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o755)
    assert "not found on PATH" in missing_program("mycode -i {input}")
    assert missing_program("mycode -i {input}", env={"PATH": str(prog.parent)}) is None  # label.env's PATH
