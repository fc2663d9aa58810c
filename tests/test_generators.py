"""Start-structure generators (issue 20 item 2): surfaces, supercells, random alloys, vacancies,
interstitials, strain, composed in a system's ``structure.transform``; deterministic per seed; the
recipe recorded per walker; usable for init data; bad values are one line naming the key."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.geometry import get_distances
from select_helpers import cu_config

from dpsnake.errors import UserError
from dpsnake.workflow.structures import build_structure

CU = {"builder": "bulk", "kwargs": {"name": "Cu", "crystalstructure": "fcc", "a": 3.61, "cubic": True}}
CHAIN = [
    {"supercell": [3, 3, 3]},
    {"alloy": {"fractions": {"Cu": 0.7, "Ni": 0.3}, "seed": 1}},
    {"vacancies": {"count": 3, "element": "Ni", "seed": 2}},
    {"interstitials": {"element": "H", "count": 2, "min_dist": 1.6, "seed": 3}},
    {"strain": 0.01},
]


def _slab_gap(atoms) -> float:
    """Vacuum between the slab and its periodic image along the cell's third vector (A)."""
    normal = np.cross(atoms.cell[0], atoms.cell[1])
    normal /= np.linalg.norm(normal)
    z = atoms.positions @ normal
    return float(abs(atoms.cell[2] @ normal) - (z.max() - z.min()))


def test_surface_slab_periodic_with_vacuum():
    prim = {"builder": "bulk", "kwargs": {"name": "Cu", "crystalstructure": "fcc", "a": 3.61}}
    spec = {
        **prim,
        "transform": [{"surface": {"miller": [1, 1, 1], "layers": 4, "vacuum": 6.0}}, {"supercell": [2, 2, 1]}],
    }
    slab = build_structure(spec)
    assert slab.pbc.tolist() == [True, True, True] and len(slab) == 16
    assert _slab_gap(slab) == pytest.approx(12.0, abs=1e-6)  # 6 A on each side
    # 4 (111) layers, 2.084 A apart (a / sqrt 3)
    z = np.unique(np.round(slab.positions @ (np.cross(slab.cell[0], slab.cell[1]) / slab.cell.area(2)), 4))
    assert len(z) == 4 and np.diff(z) == pytest.approx([3.61 / 3**0.5] * 3, abs=1e-3)
    tt_f = {**prim, "transform": [{"surface": {"miller": [1, 0, 0], "layers": 3, "vacuum": 5, "periodic": False}}]}
    assert build_structure(tt_f).pbc.tolist() == [True, True, False]


@pytest.mark.parametrize("periodic", [True, False])
def test_interstitials_of_a_slab_stay_inside_it(periodic):
    prim = {"builder": "bulk", "kwargs": {"name": "Cu", "crystalstructure": "fcc", "a": 3.61}}
    surf = {"miller": [1, 1, 1], "layers": 4, "vacuum": 6.0, "periodic": periodic}
    spec = {**prim, "transform": [{"surface": surf}, {"supercell": [2, 2, 1]}]}
    slab = build_structure(spec, ".")
    spec["transform"].append({"interstitials": {"element": "H", "count": 10, "seed": 1}})
    at = build_structure(spec, ".")
    normal = np.cross(at.cell[0], at.cell[1])
    normal /= np.linalg.norm(normal)
    z, zcu = at.positions[at.symbols == "H"] @ normal, slab.positions @ normal
    assert len(z) == 10 and zcu.min() <= z.min() and z.max() <= zcu.max()  # none in the vacuum
    d = get_distances(at.positions[at.symbols == "H"], slab.positions, cell=at.cell, pbc=at.pbc)[1]
    assert d.min() >= 1.5


def test_composed_chain_counts_distances_and_seeds():
    a = build_structure({**CU, "transform": CHAIN})
    sym = np.array(a.get_chemical_symbols())
    # 108 sites: 32 Ni (0.3 x 108 = 32.4 rounded), 3 of them removed; 2 H added
    assert (sym == "Cu").sum() == 76 and (sym == "Ni").sum() == 29 and (sym == "H").sum() == 2 and len(a) == 107
    h = np.flatnonzero(sym == "H")
    d = get_distances(a.positions[h], a.positions, cell=a.cell, pbc=True)[1]
    d[np.arange(2), h] = np.inf
    assert d.min() >= 1.6 * 1.01 - 1e-9  # placed 1.6 A away, then strained by 1 %
    assert a.cell.volume == pytest.approx((3 * 3.61 * 1.01) ** 3)
    # deterministic per seed, different with another seed
    b = build_structure({**CU, "transform": CHAIN})
    assert np.array_equal(a.positions, b.positions) and a.get_chemical_symbols() == b.get_chemical_symbols()
    other = [dict(s) for s in CHAIN]
    other[1] = {"alloy": {"fractions": {"Cu": 0.7, "Ni": 0.3}, "seed": 5}}
    c = build_structure({**CU, "transform": other})
    assert c.get_chemical_symbols() != a.get_chemical_symbols()


def test_alloy_on_sites_of_one_element_and_fractions_exact():
    base = build_structure(
        {**CU, "transform": [{"supercell": [2, 2, 2]}, {"alloy": {"fractions": {"Cu": 0.5, "Ni": 0.5}}}]}
    )
    a = build_structure(
        {
            **CU,
            "transform": [
                {"supercell": [2, 2, 2]},
                {"alloy": {"fractions": {"Cu": 0.5, "Ni": 0.5}}},
                {"alloy": {"fractions": {"Ni": 0.25, "Co": 0.25, "Fe": 0.5}, "sites": "Ni", "seed": 4}},
            ],
        }
    )
    sym = np.array(a.get_chemical_symbols())
    was_ni = np.array(base.get_chemical_symbols()) == "Ni"
    assert (sym[~was_ni] == "Cu").all()  # only the Ni sites changed
    assert sorted(sym[was_ni].tolist()) == sorted(["Ni"] * 4 + ["Co"] * 4 + ["Fe"] * 8)


def test_strain_tensor_shears_and_supercell_matrix():
    shear = [[0, 0.05, 0], [0, 0, 0], [0, 0, 0]]
    a0 = build_structure(CU)
    a = build_structure({**CU, "transform": [{"strain": shear}]})
    assert np.allclose(a.cell.array, a0.cell.array @ (np.eye(3) + np.array(shear)).T)
    assert np.allclose(a.get_scaled_positions(), a0.get_scaled_positions())
    assert a.cell.angles()[2] < 90 - 2  # gamma sheared
    diag = build_structure({**CU, "transform": [{"strain": [0.02, 0, -0.01]}]})
    assert np.allclose(diag.cell.lengths(), 3.61 * np.array([1.02, 1, 0.99]))
    m = build_structure({**CU, "transform": [{"supercell": [[1, 1, 0], [-1, 1, 0], [0, 0, 2]]}]})
    assert len(m) == 4 * 4 and m.cell.volume == pytest.approx(4 * 3.61**3)


def test_recipe_recorded_in_walkers_plan_and_report(tmp_path):
    """plan writes each walker's recipe into walkers.json and plan.json; the report's walker table
    shows it; the explore runner takes it."""
    from dpsnake.md.walkers import parse_walkers
    from dpsnake.report.readers import walkers_table
    from dpsnake.workflow.config import write_if_changed
    from dpsnake.workflow.plan import add_arguments, run

    systems = {"Cu": {"structure": {**CU, "transform": [{"supercell": [2, 2, 1]}, {"vacancies": {"count": 1}}]}}}
    cfg = cu_config(tmp_path, systems=systems, type_map=["Cu", "Ni", "H"])
    write_if_changed(cfg, tmp_path / "config.json")
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    ex = tmp_path / "results" / "iter.000000" / "explore"
    ex.mkdir(parents=True)
    run(p.parse_args(["--config", str(tmp_path / "config.json"), "--iter", "0", "--out", str(ex / "walkers.json")]))
    want = "bulk(a=3.61, crystalstructure=fcc, cubic=True, name=Cu) | supercell [2,2,1] | vacancies count:1"
    walkers = json.loads((ex / "walkers.json").read_text())
    assert walkers[0]["recipe"] == want
    assert json.loads((ex / "plan.json").read_text())["recipes"] == {"Cu": want}
    assert parse_walkers(walkers, base=ex)[0].recipe == want
    assert walkers_table(tmp_path / "results", 0)["recipe"].tolist() == [want]


def test_init_data_from_a_generated_surface(tmp_path):
    """DP-GEN's init_surf: the initial data of a surface system is made from the generated slab."""
    from dpsnake.workflow.init_data import generate_frames

    prim = {"builder": "bulk", "kwargs": {"name": "Cu", "crystalstructure": "fcc", "a": 3.61}}
    surf = {
        **prim,
        "transform": [{"surface": {"miller": [1, 0, 0], "layers": 4, "vacuum": 5.0}}, {"supercell": [2, 2, 1]}],
    }
    cfg = cu_config(
        tmp_path, systems={"Cu": {"structure": surf}}, init_data={"scales": [1.0], "perturbations": 2, "seed": 1}
    )
    frames = generate_frames(cfg, "Cu")
    assert len(frames) == 2 and all(len(f) == 16 and f.pbc.all() for f in frames)
    assert all(_slab_gap(f) > 9.0 for f in frames)  # the vacuum stays (10 A, cell perturbed by <= 2 %)


@pytest.mark.parametrize(
    "transform, message",
    [
        (
            [{"vacancies": {"count": 0}}],
            "systems.Cu.structure.transform[0].vacancies.count: 0 is less than the minimum",
        ),
        ([{"vacancies": {"count": 2, "element": "Fe"}}], "transform[0].vacancies.element: no 'Fe' atoms"),
        (
            [{"vacancies": {"count": 4}}],
            "transform[0].vacancies.count: 4 vacancies, but the structure has 4 such atoms",
        ),
        (
            [{"alloy": {"fractions": {"Cu": 0.5, "Ni": 0.4}}}],
            "transform[0].alloy.fractions: must add up to 1, they add up to 0.9",
        ),
        ([{"alloy": {"fractions": {"Cu": 0.5, "Xx": 0.5}}}], "transform[0].alloy.fractions.Xx: not an element"),
        ([{"surface": {"miller": [0, 0, 0], "layers": 3}}], "transform[0].surface.miller: [0, 0, 0] is no plane"),
        ([{"surface": {"miller": [1, 1, 1]}}], "transform[0].surface: 'layers' is a required property"),
        (
            [
                {"surface": {"miller": [1, 1, 1], "layers": 2, "periodic": False}},
                {"surface": {"miller": [1, 0, 0], "layers": 2}},
            ],
            "transform[1].surface: needs a bulk periodic in all directions",
        ),
        (
            [{"interstitials": {"element": "H", "count": 1, "min_dist": 9.0}}],
            "transform[0].interstitials.min_dist: no room",
        ),
        ([{"strain": -1.0}], "transform[0].strain: I + strain must keep the cell's volume positive"),
        ([{"strain": [0.1, 0.2]}], "transform[0].strain: give a number, [exx, eyy, ezz] or a 3x3 tensor"),
        ([{"supercell": [2, 0, 1]}], "transform[0].supercell: must be an integer >= 1, got 0"),
        ([{"rattle": 0.1}], "transform[0].rattle: unknown key"),
        (
            [{"supercell": [2, 2, 2], "strain": 0.1}],
            "transform[0]: {'supercell': [2, 2, 2], 'strain': 0.1} has too many",
        ),
    ],
)
def test_bad_generator_values_are_one_line(tmp_path, transform, message):
    systems = {"Cu": {"structure": {**CU, "transform": transform}}}
    with pytest.raises(UserError) as err:
        cu_config(tmp_path, systems=systems, type_map=["Cu", "Ni", "H"])
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_example_ramps_surfaces_passes_check_config_and_plans(tmp_path):
    """config/examples/ramps_surfaces.yaml: check-config passes (one line), and both stages plan
    walkers the explore runner takes: the slabs' structures (pbc T T T with vacuum, and T T F), the
    ramps, the recipes."""
    import pathlib
    import subprocess
    import sys

    import yaml

    from dpsnake.md.walkers import parse_walkers, read_structure
    from dpsnake.workflow.config import check
    from dpsnake.workflow.plan import make_walkers

    root = pathlib.Path(__file__).resolve().parents[1]
    example = root / "config" / "examples" / "ramps_surfaces.yaml"
    p = subprocess.run(
        [sys.executable, "-m", "dpsnake.cli", "check-config", str(example)], capture_output=True, text=True, cwd=root
    )
    assert p.returncode == 0 and "is valid (3 systems, 2 exploration stage(s)" in p.stdout, p.stdout + p.stderr
    cfg = check(yaml.safe_load(example.read_text()), root)
    names = {}
    for stage in (0, 1):
        ws = make_walkers(cfg, stage, stage, tmp_path / f"s{stage}")
        parsed = parse_walkers(ws, base=tmp_path / f"s{stage}")
        names[stage] = [w.name for w in parsed]
        for w in parsed:
            atoms, _ = read_structure(w, cfg["type_map"])
            assert atoms.pbc.tolist() == ([True, True, False] if w.system == "Cu100" else [True] * 3)
            assert "surface" in w.recipe if w.system.startswith("Cu1") else "alloy" in w.recipe
    assert names[0] == [
        "CuNi.heat.T300-1200.P0.r0",
        "CuNi.heat.T300-1200.P10000.r0",
        "Cu111.anneal.T300-900-300.r0",
        "Cu100.anneal.T300-900-300.r0",
    ]
    assert "CuNi.squeeze.T600.P0-25000-50000.r0" in names[1] and len(names[1]) == 5
