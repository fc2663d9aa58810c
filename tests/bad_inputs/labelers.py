"""Labeler mistakes caught at check time (``dpsnake check-config``, and so before any Snakemake job):
unknown or missing keys, calculator keyword arguments the ASE calculator does not take, a program
that does not exist, the DFT labelers' own files and keys.

The DFT specs use a folder of (empty) pseudopotential / POTCAR files made in the probe's tmp folder:
the check only needs them to exist; ``pw.x`` is replaced by ``true`` where the program is not the
point, so the probes run where Quantum ESPRESSO is not installed.
"""

from __future__ import annotations

from bad_inputs import Probe
from bad_inputs.config import config_probe, snakemake_probe


def _pseudos(tmp):
    d = tmp / "pseudo"
    d.mkdir(exist_ok=True)
    for el in ("Cu", "Ni"):
        (d / f"{el}.UPF").write_text("")
        (d / el).mkdir(exist_ok=True)
        (d / el / "POTCAR").write_text("")
    return d


def qe(**keys):
    """mutate: label = a QE spec (fake pseudopotentials) updated with ``keys`` (None deletes a key)."""

    def mutate(cfg, tmp):
        spec = {
            "type": "qe",
            "pseudo_dir": str(_pseudos(tmp)),
            "ecutwfc": 30,
            "pseudopotentials": {"Cu": "Cu.UPF", "Ni": "Ni.UPF"},
            "command": "true",
        }
        spec.update(keys)
        cfg["label"] = {k: v for k, v in spec.items() if v is not None}

    return mutate


def vasp(**keys):
    def mutate(cfg, tmp):
        spec = {"type": "vasp", "potcar_dir": str(_pseudos(tmp)), "kspacing": 0.5, "command": "true"}
        spec.update(keys)
        cfg["label"] = spec

    return mutate


def _vasp_without_ni(cfg, tmp):
    vasp()(cfg, tmp)
    (tmp / "pseudo" / "Ni" / "POTCAR").unlink()


def _cp2k_basis_cu_only(cfg, tmp):
    data = _pseudos(tmp)
    for name in ("BASIS_MOLOPT", "GTH_POTENTIALS"):
        (data / name).write_text("")
    cfg["label"] = {"type": "cp2k", "command": "true", "data_dir": str(data), "basis": {"Cu": "DZVP-MOLOPT-SR-GTH"}}


def ase(**keys):
    def mutate(cfg, tmp):
        cfg["label"] = {"type": "ase", "calculator": "EMT", **keys}

    return mutate


PROBES = [
    # issue 19 item 3
    config_probe("label-ase-unknown-key", ase(ecut=30), "label: unknown key(s) ['ecut'] for label.type 'ase'"),
    config_probe(
        "label-ase-kwargs-not-taken", ase(kwargs={"asap_cutof": True}), "label.kwargs: EMT does not take ['asap_cutof']"
    ),
    config_probe(
        "label-ase-kwargs-lj",
        ase(calculator="LennardJones", kwargs={"sigma": 2.3, "cutoff": 6.0}),
        "label.kwargs: LennardJones does not take ['cutoff']",
    ),
    config_probe(
        "label-program-missing",
        qe(command="/nonexistent/pw.x -in {input}"),
        "label.command: cannot start '/nonexistent/pw.x': no such executable file",
    ),
    config_probe(
        "label-program-missing-behind-mpirun",
        qe(command="mpirun -np {nproc} /nonexistent/pw.x -in {input}"),
        "label.command: '/nonexistent/pw.x': no such file",
    ),
    config_probe(
        "label-program-not-on-path",
        qe(command="pw.x.not-installed -in {input}"),
        "label.command: cannot start 'pw.x.not-installed': not found on PATH",
    ),
    config_probe(
        "label-program-missing-in-shell",
        vasp(command="sh -c 'vasp_std.not-installed > OUTCAR'"),
        "label.command: cannot start 'vasp_std.not-installed'",
    ),
    snakemake_probe(
        "label-program-missing-snakemake",
        qe(command="/nonexistent/pw.x -in {input}"),
        "config error: label.command: cannot start '/nonexistent/pw.x'",
    ),
    # keys of the DFT labelers, now through check-config
    config_probe("label-qe-unknown-key", qe(ecut=30), "label: unknown key(s) ['ecut'] for label.type 'qe'"),
    config_probe("label-qe-missing-key", qe(ecutwfc=None), "label.ecutwfc: required for label.type 'qe'"),
    config_probe(
        "label-qe-pseudo-file",
        qe(pseudopotentials={"Cu": "Cu.UPF", "Ni": "Ni.pbe.UPF"}),
        "label.pseudopotentials.Ni: 'Ni.pbe.UPF' not found",
    ),
    config_probe("label-qe-pseudo-dir", qe(pseudo_dir="/nonexistent/pseudo"), "label.pseudo_dir: folder not found"),
    config_probe("label-qe-owned-key", qe(control={"calculation": "relax"}), "label.control.calculation"),
    config_probe("label-qe-placeholder", qe(command="true {inpt}"), "label.command: unknown placeholder(s) ['inpt']"),
    config_probe("label-qe-nproc", qe(nproc=0), "label.nproc: must be a positive integer"),
    config_probe("label-qe-kpts-not-a-list", qe(kpts=3), "label.kpts: must be three positive integers, got 3"),
    config_probe("label-qe-env-not-a-mapping", qe(env="PATH=/opt"), "label.env: give a mapping"),
    config_probe("label-ase-calculator-not-a-name", ase(calculator=5), "label.calculator: give a short name"),
    config_probe("label-vasp-potcar", vasp(potcars={"Cu": "Cu_pv/POTCAR"}), "label.potcars.Cu"),
    # every element of the systems has what the code needs (before: named at its first frame)
    config_probe(
        "label-qe-element-without-pseudo",
        qe(pseudopotentials={"Cu": "Cu.UPF"}),
        "label.pseudopotentials: no pseudopotential for element(s) ['Ni'] of the systems",
    ),
    config_probe("label-vasp-element-without-potcar", _vasp_without_ni, "label.potcars.Ni: POTCAR not found"),
    config_probe("label-cp2k-element-without-basis", _cp2k_basis_cu_only, "label.basis: no entry for element Ni"),
    config_probe("label-vasp-fixed-incar", vasp(incar={"NSW": 10}), "label.incar.NSW"),
    config_probe(
        "label-pyscf-unknown-key",
        lambda c, t: c.update(label={"type": "pyscf", "bassis": "sto-3g"}),
        "label: unknown key(s) ['bassis'] for label.type 'pyscf'",
    ),
]

__all__ = ["PROBES", "Probe"]
