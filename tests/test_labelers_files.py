"""VASP and ABACUS labelers (no binaries here) and the shared command runner.

Writers are checked on the files they write; parsers on small outputs in the codes' real formats
(tests/data/labelers/: a VASP 6 OUTCAR and an ABACUS 3.4 running_scf.log, numbers chosen by hand).
The run path is the real one: the "code" is a shell command that drops the stored output in place.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from ase import Atoms

from dpsnake.errors import UserError
from dpsnake.labelers import make_labeler
from dpsnake.labelers.filebased import check_template, kmesh, species_order

DATA = pathlib.Path(__file__).parent / "data" / "labelers"
KBAR = 1.0 / 1602.176621  # eV/A^3 per kbar
VOLUME = 3.6**3
# the numbers written in OUTCAR / running_scf.log, in the frame's own atom order (Cu Ni Cu Cu)
FORCES = np.array([[-0.312, 0.0, 0.0], [0.104, -0.021, -0.021], [0.104, 0.0, 0.021], [0.104, 0.021, 0.0]])
VIRIAL = np.array([[12.34, 0.0, 0.0], [0.0, 11.22, 0.56], [0.0, 0.56, 11.22]]) * KBAR * VOLUME


def cuni_frame(shift=0.0):
    """Cu3Ni with the Ni second: files group atoms by element (Cu Cu Cu Ni), so order must be mapped back."""
    return Atoms(
        "CuNiCuCu",
        positions=[[0.05 + shift, 0, 0], [0, 1.8, 1.8], [1.8, 0, 1.8], [1.8, 1.8, 0]],
        cell=np.eye(3) * 3.6,
        pbc=True,
    )


@pytest.fixture
def potcars(tmp_path):
    """A stand-in POTCAR folder (real POTCARs are licensed): one small file per element."""
    for el, date in (("Cu", "22Jun2005"), ("Ni", "02Aug2007")):
        (tmp_path / "pot" / el).mkdir(parents=True)
        (tmp_path / "pot" / el / "POTCAR").write_text(f"  PAW_PBE {el} {date}\n  (test stand-in)\n")
    return tmp_path / "pot"


def vasp_spec(potcar_dir, outcar="OUTCAR", **kw):
    spec = {
        "type": "vasp",
        "potcar_dir": str(potcar_dir),
        "incar": {"ENCUT": 400, "ISMEAR": 1, "SIGMA": 0.1},
        "kspacing": 0.5,
        "command": f"cp {DATA / 'vasp' / outcar} OUTCAR",
    }
    spec.update(kw)
    return spec


def test_vasp_writes_inputs_and_parses_outcar(potcars, tmp_path):
    atoms = cuni_frame()
    result = make_labeler(vasp_spec(potcars)).label(atoms, tmp_path / "run")
    assert result.ok, result.reason
    assert result.energy == pytest.approx(-16.12345678, abs=1e-10)  # free  energy   TOTEN
    np.testing.assert_allclose(result.forces, FORCES, atol=1e-12)
    np.testing.assert_allclose(result.virial, VIRIAL, rtol=1e-9)
    run = tmp_path / "run"
    incar = dict(line.split(" = ") for line in (run / "INCAR").read_text().splitlines())
    assert incar["NSW"] == "0" and incar["IBRION"] == "-1" and incar["ENCUT"] == "400" and incar["ISIF"] == "2"
    assert incar["LWAVE"] == ".FALSE."
    assert (run / "KPOINTS").read_text().splitlines()[2:4] == ["Gamma", "4 4 4"]  # 2 pi / 3.6 / 0.5 = 3.5
    assert (run / "POTCAR").read_text() == (potcars / "Cu/POTCAR").read_text() + (potcars / "Ni/POTCAR").read_text()
    import ase.io

    poscar = ase.io.read(run / "POSCAR", format="vasp")
    assert poscar.get_chemical_symbols() == ["Cu", "Cu", "Cu", "Ni"]
    np.testing.assert_allclose(poscar.positions, atoms.positions[[0, 2, 3, 1]], atol=1e-10)


def test_vasp_failures(potcars, tmp_path):
    atoms = cuni_frame()
    lab = make_labeler(vasp_spec(potcars, "OUTCAR.unconverged"))
    result = lab.label(atoms, tmp_path / "nelm")
    assert not result.ok and result.reason.startswith("SCF not converged"), result.reason
    text = (DATA / "vasp" / "OUTCAR").read_text()
    (tmp_path / "cut").write_text(text[: text.index("      1.80000      1.80000      0.00000")])
    cases = {
        "truncated": (f"cp {tmp_path / 'cut'} OUTCAR", "incomplete"),
        "exit": (f"sh -c 'cp {DATA / 'vasp' / 'OUTCAR'} OUTCAR; exit 2'", "exited with code 2"),
        "missing": ("true", "missing output OUTCAR"),
    }
    for name, (command, expect) in cases.items():
        result = make_labeler(vasp_spec(potcars, command=command)).label(atoms, tmp_path / name)
        assert not result.ok and expect in result.reason, (name, result.reason)
    # an output that belongs to another structure is refused, not mislabelled
    result = make_labeler(vasp_spec(potcars)).label(cuni_frame(shift=0.1), tmp_path / "other")
    assert not result.ok and "positions differ" in result.reason


def test_vasp_xml_parser(potcars, tmp_path):
    atoms = cuni_frame()
    xml = DATA / "vasp" / "vasprun.xml"
    lab = make_labeler(vasp_spec(potcars, parser="xml", command=f"cp {xml} vasprun.xml"))
    result = lab.label(atoms, tmp_path / "x")
    assert result.ok, result.reason
    assert result.energy == pytest.approx(-16.12345678, abs=1e-10)  # the calculation's e_fr_energy
    np.testing.assert_allclose(result.forces, FORCES, atol=1e-12)
    np.testing.assert_allclose(result.virial, VIRIAL, rtol=1e-9)
    bad = DATA / "vasp" / "vasprun.unconverged.xml"  # 3 electronic steps with NELM = 3
    lab = make_labeler(vasp_spec(potcars, parser="xml", command=f"cp {bad} vasprun.xml"))
    result = lab.label(atoms, tmp_path / "nc")
    assert not result.ok and result.reason.startswith("SCF not converged"), result.reason
    text = xml.read_text()
    (tmp_path / "cut.xml").write_text(text[: text.index(' <structure name="finalpos"')])  # killed while writing
    result = make_labeler(vasp_spec(potcars, parser="xml", command=f"cp {tmp_path / 'cut.xml'} vasprun.xml")).label(
        atoms, tmp_path / "cut"
    )
    assert not result.ok and "incomplete" in result.reason, result.reason
    with pytest.raises(UserError, match="label.parser"):
        make_labeler(vasp_spec(potcars, parser="h5"))


def test_vasp_config_errors(potcars, tmp_path):
    with pytest.raises(UserError, match="label.incar.NSW"):
        make_labeler(vasp_spec(potcars, incar={"NSW": 10}))
    with pytest.raises(UserError, match="label.potcars.Cu"):
        make_labeler(vasp_spec(potcars, potcars={"Cu": "Cu_pv/POTCAR"}))
    with pytest.raises(UserError, match="label.potcar_dir"):
        make_labeler(vasp_spec(tmp_path / "none"))
    with pytest.raises(UserError, match="label.kspacing"):
        make_labeler(vasp_spec(potcars, kspacing=None))
    with pytest.raises(UserError, match="label.potcars.Al"):
        make_labeler(vasp_spec(potcars)).label(Atoms("Al", cell=np.eye(3) * 3, pbc=True), tmp_path / "al")


@pytest.fixture
def pseudos(tmp_path):
    (tmp_path / "pp").mkdir()
    for el in ("Cu", "Ni"):
        (tmp_path / "pp" / f"{el}_ONCV_PBE-1.0.upf").write_text("stand-in\n")
    return tmp_path / "pp"


def abacus_spec(pseudos, log="running_scf.log", **kw):
    spec = {
        "type": "abacus",
        "pseudo_dir": str(pseudos),
        "ecutwfc": 60,
        "kpts": [3, 3, 3],
        "pseudopotentials": {"Cu": "Cu_ONCV_PBE-1.0.upf", "Ni": "Ni_ONCV_PBE-1.0.upf"},
        "smearing_method": "gaussian",
        "smearing_sigma": 0.01,
        "input": {"scf_thr": 1e-8},
        "command": f"sh -c 'mkdir -p OUT.dpsnake && cp {DATA / 'abacus' / log} OUT.dpsnake/running_scf.log'",
    }
    spec.update(kw)
    return spec


def test_abacus_writes_inputs_and_parses_log(pseudos, tmp_path):
    import dpdata

    atoms = cuni_frame()
    result = make_labeler(abacus_spec(pseudos)).label(atoms, tmp_path / "run")
    assert result.ok, result.reason
    assert result.energy == pytest.approx(-2904.63123456, abs=1e-8)  # "final etot is"
    np.testing.assert_allclose(result.forces, FORCES, atol=1e-12)
    np.testing.assert_allclose(result.virial, VIRIAL, rtol=1e-6)
    run = tmp_path / "run"
    keys = dict(line.split(None, 1) for line in (run / "INPUT").read_text().splitlines()[1:])
    assert keys["calculation"].strip() == "scf" and keys["cal_force"].strip() == "1"
    assert keys["cal_stress"].strip() == "1" and keys["ecutwfc"].strip() == "60"
    assert keys["scf_thr"].strip() == "1e-08" and keys["smearing_method"].strip() == "gaussian"
    assert (run / "KPT").read_text().splitlines()[3] == "3 3 3 0 0 0"
    stru = dpdata.System(str(run / "STRU"), fmt="abacus/stru")  # dpdata reads back what it wrote
    assert list(stru["atom_names"]) == ["Cu", "Ni"] and list(stru["atom_numbs"]) == [3, 1]
    np.testing.assert_allclose(stru["coords"][0], atoms.positions[[0, 2, 3, 1]], atol=1e-8)
    assert "Cu_ONCV_PBE-1.0.upf" in (run / "STRU").read_text()


def test_abacus_lcao_inputs(pseudos, tmp_path):
    import dpdata

    (tmp_path / "orb").mkdir()
    orbitals = {el: f"{el}_gga_8au_100Ry_2s2p2d1f.orb" for el in ("Cu", "Ni")}
    for name in orbitals.values():
        (tmp_path / "orb" / name).write_text("stand-in\n")
    spec = abacus_spec(pseudos, basis_type="lcao", orbital_dir=str(tmp_path / "orb"), orbitals=orbitals)
    atoms = cuni_frame()
    assert make_labeler(spec).label(atoms, tmp_path / "run").ok
    keys = dict(line.split(None, 1) for line in (tmp_path / "run" / "INPUT").read_text().splitlines()[1:])
    assert keys["basis_type"].strip() == "lcao" and keys["orbital_dir"].strip() == str(tmp_path / "orb")
    stru = (tmp_path / "run" / "STRU").read_text()
    assert "NUMERICAL_ORBITAL\nCu_gga_8au_100Ry_2s2p2d1f.orb\nNi_gga_8au_100Ry_2s2p2d1f.orb" in stru
    back = dpdata.System(str(tmp_path / "run" / "STRU"), fmt="abacus/stru")
    np.testing.assert_allclose(back["coords"][0], atoms.positions[[0, 2, 3, 1]], atol=1e-8)


def test_abacus_failures_and_config_errors(pseudos, tmp_path):
    atoms = cuni_frame()
    result = make_labeler(abacus_spec(pseudos, "running_scf.unconverged.log")).label(atoms, tmp_path / "nc")
    assert not result.ok and result.reason.startswith("SCF not converged"), result.reason
    for name, command, expect in (
        ("missing", "true", "missing output"),
        ("exit", "sh -c 'exit 134'", "exited with code 134"),
    ):
        result = make_labeler(abacus_spec(pseudos, command=command)).label(atoms, tmp_path / name)
        assert not result.ok and expect in result.reason, (name, result.reason)
    with pytest.raises(UserError, match="label.input.calculation"):
        make_labeler(abacus_spec(pseudos, input={"calculation": "md"}))
    with pytest.raises(UserError, match="label.orbitals"):
        make_labeler(abacus_spec(pseudos, basis_type="lcao"))
    with pytest.raises(UserError, match="label.pseudopotentials.Ni"):
        make_labeler(abacus_spec(pseudos, pseudopotentials={"Cu": "Cu_ONCV_PBE-1.0.upf", "Ni": "x.upf"}))


def test_runner_helpers():
    elements, order = species_order(["Ni", "Cu", "Ni", "H", "Cu"])
    assert elements == ["Ni", "Cu", "H"] and list(order) == [0, 2, 1, 4, 3]
    slab = Atoms("Cu", cell=[3.6, 3.6, 20.0], pbc=[True, True, False])
    assert kmesh(slab, 0.5) == [4, 4, 1]
    fcc = Atoms("Cu", cell=[[0, 1.8, 1.8], [1.8, 0, 1.8], [1.8, 1.8, 0]], pbc=True)
    assert kmesh(fcc, 0.25) == [13, 13, 13]  # 2 pi sqrt(3) / 3.6 / 0.25 = 12.09
    check_template("mpirun -np {nproc} pw.x -in {input}", "label.command")
    with pytest.raises(UserError, match="unknown placeholder"):
        check_template("pw.x -in {inpt}", "label.command")
    with pytest.raises(UserError, match="label.command"):
        check_template("", "label.command")
    with pytest.raises(UserError, match="label.nproc"):
        make_labeler({"type": "vasp", "potcar_dir": "/", "kspacing": 0.5, "nproc": 0})


def test_rerun_never_parses_stale_output_and_unknown_keys_are_refused(potcars, pseudos, tmp_path):
    atoms = cuni_frame()
    assert make_labeler(vasp_spec(potcars)).label(atoms, tmp_path / "v").ok
    again = make_labeler(vasp_spec(potcars, command="true")).label(atoms, tmp_path / "v")  # same workdir
    assert not again.ok and "missing output" in again.reason
    assert make_labeler(abacus_spec(pseudos)).label(atoms, tmp_path / "a").ok
    again = make_labeler(abacus_spec(pseudos, command="true")).label(atoms, tmp_path / "a")
    assert not again.ok and "missing output" in again.reason
    with pytest.raises(UserError, match=r"unknown key\(s\) \['ecut'\]"):
        make_labeler(vasp_spec(potcars, ecut=400))
    with pytest.raises(UserError, match=r"unknown key\(s\) \['bassis'\]"):
        make_labeler({"type": "pyscf", "bassis": "sto-3g"})


def test_missing_program_is_a_check_time_error(potcars, tmp_path):
    """The program of label.command is looked up once at check time (preflight; check-config and every
    Snakemake start call it); a labeler built anyway still fails each frame with 'cannot start'."""
    from dpsnake.labelers import preflight

    preflight(make_labeler(vasp_spec(potcars)))  # cp: on PATH
    preflight(make_labeler({"type": "ase"}))  # in-process calculators have no program
    lab = make_labeler(vasp_spec(potcars, command="/nonexistent/vasp_std"))
    with pytest.raises(UserError, match=r"^label.command: cannot start '/nonexistent/vasp_std': no such executable"):
        preflight(lab)
    result = lab.label(cuni_frame(), tmp_path / "v")
    assert not result.ok and result.reason.startswith("cannot start '/nonexistent/vasp_std'")
    with pytest.raises(UserError, match=r"'/nonexistent/vasp_std': no such file \(the program mpirun"):
        preflight(make_labeler(vasp_spec(potcars, command="mpirun -np {nproc} /nonexistent/vasp_std")))
    with pytest.raises(UserError, match=r"mpirun starts no program found on PATH \(looked for 'vasp_std_x'\)"):
        preflight(make_labeler(vasp_spec(potcars, command="mpirun -np {nproc} vasp_std_x")))
    # a program found through label.env's PATH, as the label job will find it
    (tmp_path / "bin").mkdir()
    prog = tmp_path / "bin" / "vasp_std_x"
    prog.write_text("#!/bin/sh\ncp OUTCAR.ref OUTCAR\n")
    prog.chmod(0o755)
    with pytest.raises(UserError, match="vasp_std_x': not found on PATH"):
        preflight(make_labeler(vasp_spec(potcars, command="vasp_std_x")))
    preflight(make_labeler(vasp_spec(potcars, command="vasp_std_x", env={"PATH": f"{prog.parent}:/usr/bin:/bin"})))


def test_a_value_of_the_wrong_kind_is_one_line(pseudos):
    """Keys without a check of their own (QE's koffset) still give one line, not a traceback."""
    spec = {
        "type": "qe",
        "pseudo_dir": str(pseudos),
        "pseudopotentials": {"Cu": "Cu_ONCV_PBE-1.0.upf"},
        "ecutwfc": 30,
        "koffset": 1,
    }
    with pytest.raises(UserError, match=r"^label: a value of label.type 'qe' is not what it takes \(TypeError"):
        make_labeler(spec)
