"""Real Quantum ESPRESSO (pw.x) and CP2K runs through make_labeler, compared with the codes' own output.

References are read from the codes' output files independently of the labelers' parser (dpdata):
pw.x's "!    total energy" line and ASE's espresso-out reader; CP2K's ENERGY|, ATOMIC FORCES and
STRESS| lines read with regular expressions here. Failures are forced for real (too few SCF steps).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from ase import units
from ase.build import bulk

from dpsnake.errors import UserError
from dpsnake.labelers import make_labeler, sanity_check

PSEUDO = "/usr/share/espresso/pseudo"
needs_pw = pytest.mark.skipif(shutil.which("pw.x") is None, reason="pw.x (Debian quantum-espresso) not installed")
needs_cp2k = pytest.mark.skipif(shutil.which("cp2k") is None, reason="cp2k (Debian cp2k) not installed")

QE_CU = {
    "type": "qe",
    "pseudo_dir": PSEUDO,
    "pseudopotentials": {"Cu": "Cu.pbe-kjpaw.UPF"},
    "ecutwfc": 35,
    "ecutrho": 280,
    "kspacing": 0.6,
    "smearing": "mv",
    "degauss": 0.02,
}
# Si8 at Gamma has degenerate frontier states: both codes use Fermi-Dirac smearing at 1000 K
# (kT = 0.00633 Ry), which converges in 10-15 SCF steps and makes the two codes' physics the same
QE_SI = {
    "type": "qe",
    "pseudo_dir": PSEUDO,
    "pseudopotentials": {"Si": "Si.pbe-rrkj.UPF"},
    "ecutwfc": 20,
    "smearing": "fd",
    "degauss": 0.00633,
}
CP2K_SI = {"type": "cp2k", "cutoff": 200, "rel_cutoff": 30, "smearing_temperature": 1000}


def cu4():
    """Rattled 4-atom Cu cell."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=1)
    return atoms


def si8(rotated=False):
    """Rattled Si8; rotated: its cell is not lower-triangular (dpdata rotates such cells; the labels
    must come back in the frame's own orientation)."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=2)
    if rotated:
        atoms.rotate(25, "z", rotate_cell=True)
        atoms.rotate(15, "x", rotate_cell=True)
        assert abs(atoms.cell[0, 1]) > 1.0
    return atoms


@pytest.fixture(scope="module")
def qe_cu(tmp_path_factory):
    """One real pw.x run (Cu4 PAW, 35/280 Ry, 3x3x3 k, ~20 s), shared by the tests below."""
    atoms = cu4()
    workdir = tmp_path_factory.mktemp("qe") / "cu4"
    result = make_labeler(QE_CU).label(atoms, workdir)
    return atoms, result, workdir


@needs_pw
@pytest.mark.dft
def test_qe_cu4_matches_pw_output(qe_cu):
    import ase.io

    atoms, result, workdir = qe_cu
    assert result.ok, result.reason
    text = (workdir / "pw.out").read_text()
    assert "3 3 3" in (workdir / "pw.in").read_text()  # kspacing 0.6/A on a 3.6 A cube -> 3x3x3
    assert not (workdir / "scratch").exists()  # wavefunctions removed
    e_ry = float(re.findall(r"!\s+total energy\s+=\s+(-?\d+\.\d+) Ry", text)[-1])
    assert result.energy == pytest.approx(e_ry * units.Ry, rel=1e-7)  # dpdata and ASE use different CODATA years
    # pw.x's forces in the input's Cartesian frame (Ry/Bohr), read line by line
    f_ry = np.array(
        [[float(x) for x in m] for m in re.findall(r"atom\s+\d+ type\s+\d+\s+force =\s+(\S+)\s+(\S+)\s+(\S+)", text)]
    )[: len(atoms)]
    np.testing.assert_allclose(result.forces, f_ry * units.Ry / units.Bohr, rtol=1e-7, atol=1e-7)
    ref = ase.io.read(workdir / "pw.out", format="espresso-out")  # ASE's own reader, Ry/Bohr^3 columns
    np.testing.assert_allclose(result.forces, ref.get_forces(), atol=1e-6)
    virial_ref = -ref.get_stress(voigt=False) * atoms.get_volume()
    np.testing.assert_allclose(result.virial, virial_ref, atol=2e-3)  # dpdata reads the 2-decimal kbar columns
    np.testing.assert_allclose(result.virial, result.virial.T, atol=1e-8)
    assert np.abs(result.forces.sum(axis=0)).max() < 0.02  # translational invariance
    assert 0.3 < np.abs(result.forces).max() < 3.0  # a 0.05 A rattle in Cu: forces of order 1 eV/A


@needs_pw
@pytest.mark.dft
def test_qe_sanity_cap_fails_large_forces(qe_cu):
    atoms, result, _ = qe_cu
    capped = sanity_check(make_copy(result), len(atoms), max_force=0.5)
    assert not capped.ok and "sanity cap" in capped.reason
    assert sanity_check(make_copy(result), len(atoms), max_force=50.0).ok


def make_copy(result):
    from dataclasses import replace

    return replace(result, forces=np.array(result.forces), virial=np.array(result.virial))


@needs_pw
@pytest.mark.dft
def test_qe_scf_not_converged_is_a_failure(tmp_path):
    spec = dict(QE_SI, electrons={"electron_maxstep": 1})
    result = make_labeler(spec).label(si8(), tmp_path / "si")
    assert not result.ok
    assert result.reason.startswith("SCF not converged"), result.reason


# Debian's Open MPI launcher (pw.x's MPI); the mpich wheel of DeePMD-kit's torch extra may put another
# mpirun first on PATH
OPENMPI_RUN = shutil.which("mpirun", path="/usr/bin:/bin")


@needs_pw
@pytest.mark.dft
@pytest.mark.skipif(OPENMPI_RUN is None, reason="mpirun (Open MPI) not installed")
def test_qe_mpi_command_template_gives_the_serial_labels(tmp_path):
    """'mpirun -np {nproc} pw.x -in {input}' with nproc 2 (as root too): pw.x reports 2 processors and
    the labels equal the serial run's to SCF precision; a launcher of another MPI (pw.x started as
    serial copies) is a failed label that says so."""
    atoms = si8()
    spec = dict(QE_SI, electrons={"conv_thr": 1e-9})
    serial = make_labeler(spec).label(atoms, tmp_path / "serial")
    mpi = make_labeler(dict(spec, command=OPENMPI_RUN + " -np {nproc} pw.x -in {input}", nproc=2, timeout=300)).label(
        atoms, tmp_path / "mpi"
    )
    other = shutil.which("mpirun")
    version = subprocess.run([other, "--version"], capture_output=True, text=True).stdout if other else ""
    if other and "Open MPI" not in version and "open-mpi" not in version:  # e.g. mpich's hydra
        bad = make_labeler(dict(spec, command="mpirun -np {nproc} pw.x -in {input}", nproc=2, timeout=300)).label(
            atoms, tmp_path / "other"
        )
        assert not bad.ok and "is not the MPI pw.x was built with" in bad.reason, bad.reason
    assert serial.ok and mpi.ok, (serial.reason, mpi.reason)
    assert re.search(r"running on\s+2 processors", (tmp_path / "mpi" / "pw.out").read_text())
    assert mpi.energy == pytest.approx(serial.energy, abs=1e-5)
    np.testing.assert_allclose(mpi.forces, serial.forces, atol=2e-3)
    np.testing.assert_allclose(mpi.virial, serial.virial, atol=5e-3)


@needs_pw
@pytest.mark.dft
def test_qe_output_problems_are_failures(qe_cu, tmp_path):
    atoms, _, workdir = qe_cu
    ref = tmp_path / "ref.out"
    shutil.copy(workdir / "pw.out", ref)
    lines = ref.read_text().splitlines(keepends=True)
    cut = next(i for i, ln in enumerate(lines) if re.search(r"atom\s+2 type", ln))
    (tmp_path / "truncated.out").write_text("".join(lines[:cut]))  # output stops inside the force table
    cases = {
        "truncated": (f"cat {tmp_path / 'truncated.out'}", None),
        "exit": (f"sh -c 'cat {ref}; exit 3'", "exited with code 3"),
        "nobinary": ("pw.x.not-installed -in {input}", "cannot start"),
        "empty": ("true", "missing output"),
        "timeout": ("sleep 20", "timed out"),
    }
    for name, (command, expect) in cases.items():
        spec = dict(QE_CU, command=command, timeout=1.0)
        result = make_labeler(spec).label(atoms, tmp_path / name)
        assert not result.ok, name
        if expect:
            assert expect in result.reason, (name, result.reason)
    # a complete output of the frame parses through the same path (the cases above fail for their reason)
    assert make_labeler(dict(QE_CU, command=f"cat {ref}")).label(atoms, tmp_path / "again").ok
    # pw.x's own error message becomes the reason (real run, stops while reading the input)
    result = make_labeler(dict(QE_CU, system={"nspin": 7})).label(atoms, tmp_path / "pwerror")
    assert not result.ok and result.reason == "pw.x error: Error in routine system_checkin (7): nspin out of range"


@pytest.fixture(scope="module")
def cp2k_si8(tmp_path_factory):
    """One real CP2K run (rotated Si8, 200/30 Ry, Gamma, smeared, 10-30 s), shared by the tests below."""
    atoms = si8(rotated=True)
    workdir = tmp_path_factory.mktemp("cp2k") / "si8"
    return atoms, make_labeler(CP2K_SI).label(atoms, workdir), workdir


@needs_pw
@needs_cp2k
@pytest.mark.dft
def test_qe_and_cp2k_agree_on_si8(cp2k_si8, tmp_path):
    """Two codes, two parsers, same (rotated) frame: forces and virial agree to DFT-setup accuracy.

    Catches unit (Ry vs Ha, Bohr), sign, orientation and atom-order mistakes, which are far larger
    than the differences between plane waves and Gaussians at these test-grade settings (measured:
    0.17 eV/A at most for forces up to 1.2 eV/A, 5 % in virial)."""
    import ase.io

    atoms, cp, _ = cp2k_si8
    qe = make_labeler(QE_SI).label(atoms, tmp_path / "qe")
    assert qe.ok and cp.ok, (qe.reason, cp.reason)
    ref = ase.io.read(tmp_path / "qe" / "pw.out", format="espresso-out")  # pw.x's forces, the frame's own axes
    np.testing.assert_allclose(qe.forces, ref.get_forces(), atol=1e-6)
    np.testing.assert_allclose(qe.virial, -ref.get_stress(voigt=False) * atoms.get_volume(), atol=5e-3)
    assert np.abs(qe.forces - cp.forces).max() < 0.25
    assert np.abs(qe.virial - cp.virial).max() < 0.1 * np.abs(qe.virial).max()


def cp2k_reference(text: str, natoms: int, volume: float):
    """CP2K's own printed energy (eV), forces (eV/A) and stress x volume (eV), read here with regexps."""
    energy = float(re.findall(r"ENERGY\| Total FORCE_EVAL \( QS \) energy \[a\.u\.\]:\s+(\S+)", text)[-1])
    energy *= units.Hartree
    block = text[text.rindex("ATOMIC FORCES in [a.u.]") :]
    rows = re.findall(r"^\s+\d+\s+\d+\s+[A-Z][a-z]?\s+(\S+)\s+(\S+)\s+(\S+)\s*$", block, re.M)[:natoms]
    forces = np.array(rows, dtype=float) * units.Hartree / units.Bohr
    if "STRESS| Analytical stress tensor [GPa]" not in text:
        return energy, forces, None
    stress = text[text.rindex("STRESS| Analytical stress tensor [GPa]") :]
    num = r"(-?\d+\.\d+E[-+]\d+)"
    gpa = np.array(re.findall(rf"STRESS\|\s+[xyz]\s+{num}\s+{num}\s+{num}", stress)[:3], dtype=float)
    return energy, forces, gpa * units.GPa * volume


@needs_cp2k
@pytest.mark.dft
def test_cp2k_si8_matches_cp2k_output(cp2k_si8):
    atoms, result, workdir = cp2k_si8
    assert result.ok, result.reason
    energy, forces, virial = cp2k_reference((workdir / "cp2k.out").read_text(), len(atoms), atoms.get_volume())
    assert result.energy == pytest.approx(energy, abs=1e-5)
    np.testing.assert_allclose(result.forces, forces, atol=1e-5)
    np.testing.assert_allclose(result.virial, virial, rtol=1e-5, atol=1e-5)
    assert np.abs(result.forces.sum(axis=0)).max() < 0.02


@needs_cp2k
@pytest.mark.dft
def test_cp2k_molecule_in_a_box(tmp_path):
    """Non-periodic frame: PERIODIC NONE cell and Poisson solver, no stress, forces as CP2K prints them."""
    from ase.build import molecule

    atoms = molecule("H2O")
    atoms.positions[1] += [0.0, 0.08, -0.05]
    atoms.set_cell([8.0, 8.0, 8.0])
    atoms.center()
    atoms.pbc = False
    result = make_labeler({"type": "cp2k", "cutoff": 300, "rel_cutoff": 40}).label(atoms, tmp_path / "h2o")
    assert result.ok, result.reason
    assert result.virial is None
    text = (tmp_path / "h2o" / "cp2k.out").read_text()
    energy, forces, stress = cp2k_reference(text, len(atoms), atoms.get_volume())
    assert stress is None and "PERIODIC NONE" in (tmp_path / "h2o" / "cp2k.inp").read_text()
    assert result.energy == pytest.approx(energy, abs=1e-5)
    np.testing.assert_allclose(result.forces, forces, atol=1e-5)
    assert np.abs(result.forces[1]).max() > 1.0  # the stretched O-H bond pulls back


@needs_cp2k
@pytest.mark.dft
def test_cp2k_scf_not_converged_is_a_failure(tmp_path):
    # CP2K writing its output itself (-o {output}): the labeler reads that file, stdout goes to "stdout"
    spec = dict(CP2K_SI, max_scf=2, command="cp2k -i {input} -o {output}")
    result = make_labeler(spec).label(si8(), tmp_path / "si8")
    assert not result.ok
    assert result.reason.startswith("SCF not converged"), result.reason
    assert "SCF run NOT converged" in (tmp_path / "si8" / "cp2k.out").read_text()


@needs_cp2k
@pytest.mark.dft
def test_cp2k_abort_message_is_the_reason(tmp_path):
    """A basis name CP2K cannot find: it aborts (non-zero exit); the reason is CP2K's own message."""
    result = make_labeler(dict(CP2K_SI, basis="NO-SUCH-BASIS")).label(si8(), tmp_path / "abort")
    assert not result.ok
    assert result.reason.startswith("CP2K aborted: The requested basis set <NO-SUCH-BASIS> for element <Si>")


def test_cp2k_template_and_config_errors(tmp_path):
    lab = make_labeler(dict(CP2K_SI, kspacing=0.4))
    text = lab.render(si8())
    assert "SCHEME MONKHORST-PACK 3 3 3" in text  # 2 pi / 5.43 / 0.4 = 2.9 -> 3
    assert "PERIODIC XYZ" in text and text.count("&KIND Si") == 1 and "{{" not in text
    own = tmp_path / "own.inp"  # a user template: CP2K's ${VAR} syntax passes through untouched
    own.write_text(
        "@SET CUT {{CUTOFF}}\n&FORCE_EVAL\n &DFT\n  &MGRID\n   CUTOFF ${CUT}\n  &END MGRID\n &END DFT\n"
        " &SUBSYS\n  {{CELL}}\n  {{COORD}}\n  {{KINDS}}\n &END SUBSYS\n&END FORCE_EVAL\n"
    )
    text = make_labeler(dict(CP2K_SI, template=str(own), cutoff=280)).render(si8())
    assert "@SET CUT 280\n" in text and "CUTOFF ${CUT}" in text and text.count("\n      Si ") == 8
    bad = tmp_path / "bad.inp"
    bad.write_text("&FORCE_EVAL\n &SUBSYS\n  {{CELL}}\n  {{KINDS}}\n &END SUBSYS\n&END FORCE_EVAL\n")
    with pytest.raises(UserError, match=r"\{\{COORD\}\}"):
        make_labeler(dict(CP2K_SI, template=str(bad)))
    with pytest.raises(UserError, match="label.basis_set_file"):
        make_labeler(dict(CP2K_SI, basis_set_file="NO_SUCH_BASIS"))
    with pytest.raises(UserError, match="label.basis: no entry for element Si"):
        make_labeler(dict(CP2K_SI, basis={"Cu": "DZVP-MOLOPT-SR-GTH"})).render(si8())


def test_qe_config_errors(tmp_path):
    with pytest.raises(UserError, match="label.pseudopotentials.Cu"):
        make_labeler(dict(QE_CU, pseudopotentials={"Cu": "Cu.nothere.UPF"}))
    with pytest.raises(UserError, match="label.pseudo_dir"):
        make_labeler(dict(QE_CU, pseudo_dir=str(tmp_path / "nothere")))
    with pytest.raises(UserError, match="label.control.calculation"):
        make_labeler(dict(QE_CU, control={"calculation": "relax"}))
    with pytest.raises(UserError, match="kspacing / label.kpts"):
        make_labeler(dict(QE_CU, kpts=[2, 2, 2]))
    with pytest.raises(UserError, match="unknown placeholder"):
        make_labeler(dict(QE_CU, command="pw.x -in {inptu}"))
    with pytest.raises(UserError, match=r"element\(s\) \['Si'\]"):
        make_labeler(QE_CU).label(si8(), tmp_path / "si")


@needs_pw  # the check looks the configured program up on PATH
@pytest.mark.skipif(not os.path.isdir(PSEUDO), reason="Debian quantum-espresso-data not installed")
def test_cu_qe_example_config_is_valid():
    """config/examples/cu-qe.yaml passes the workflow's check (schema + labeler built: pseudopotentials and
    pw.x found)."""
    import pathlib

    from dpsnake.workflow import config as C

    root = pathlib.Path(__file__).resolve().parents[1]
    cfg = C.load(str(root / "config" / "examples" / "cu-qe.yaml"), str(root))
    assert cfg["label"]["type"] == "qe" and cfg["type_map"] == ["Cu"]
    lab = make_labeler(cfg["label"])
    assert lab.name == "qe" and lab.timeout == 900


def test_qe_input_spin_and_species(tmp_path):
    """starting_magnetization per element -> nspin 2 and QE's indexed keys; frames' own moments never
    split species (dpdata's reader needs plain element labels)."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.symbols[1:3] = "Ni"
    atoms.set_initial_magnetic_moments([1.0, 2.0, 3.0, 4.0])
    pps = {"Cu": "Cu.pbe-kjpaw.UPF", "Ni": "Ni.pbe-nd-rrkjus.UPF"}
    spec = dict(QE_CU, pseudopotentials=pps, starting_magnetization={"Ni": 0.4})
    make_labeler(spec).write_inputs(atoms, tmp_path)
    text = (tmp_path / "pw.in").read_text()
    assert re.search(r"nspin\s+= 2", text) and re.search(r"starting_magnetization\(2\) = 0.4", text)
    assert re.search(r"ATOMIC_SPECIES\nCu\s+[\d.]+ Cu.pbe-kjpaw.UPF\nNi\s+[\d.]+ Ni.pbe-nd-rrkjus.UPF\n\n", text)
    make_labeler(dict(QE_CU, pseudopotentials=pps)).write_inputs(atoms, tmp_path)
    text = (tmp_path / "pw.in").read_text()
    assert "nspin" not in text and "Ni1" not in text
    with pytest.raises(UserError, match="label.starting_magnetization"):
        make_labeler(dict(spec, starting_magnetization={"Ni": 3.0}))
