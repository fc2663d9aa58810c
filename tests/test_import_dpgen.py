"""``dpsnake import-dpgen``: DP-GEN param.json / machine.json fixtures (tests/data/dpgen/, written after the
examples in DP-GEN's repository: VASP, pwscf, CP2K, ABACUS, Gaussian + GROMACS engine, per-system trust and
adaptive trust lo, LAMMPS template jobs; Slurm and PBS/LSF machines) converted and checked key by key; the
result passes check-config; ``--data`` takes the labels of a DP-GEN run; a converted Cu campaign runs end to
end on EMT labels (slow)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from dpsnake.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "data" / "dpgen"


def _labelled(symbols: str, n: int, seed: int, type_map=None):
    """n EMT-labelled perturbed frames of a 4-atom fcc cell (Cu4 or Cu2Ni2) as a dpdata.LabeledSystem."""
    import ase.build
    import dpdata
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    if symbols == "CuNi":
        atoms.symbols[[1, 3]] = "Ni"
    out = None
    for _ in range(n):
        a = atoms.copy()
        a.positions += rng.normal(0, 0.05, a.positions.shape)
        a.calc = EMT()
        a.get_forces()
        a.get_stress()
        s = dpdata.LabeledSystem(a, fmt="ase/structure")
        if out is None:
            out = s
        else:
            out.append(s)
    if type_map is not None:
        out.apply_type_map(type_map)
    return out


@pytest.fixture(scope="module")
def camp(tmp_path_factory):
    """The fixtures in a temporary folder, with what a DP-GEN campaign folder holds besides param.json:
    init data (EMT labels), pseudopotential / POTCAR / orbital files (empty stand-ins) and stand-ins for
    the DFT programs that are not installed (vasp_std, abacus) on PATH."""
    d = tmp_path_factory.mktemp("dpgen") / "campaign"
    shutil.copytree(FIXTURES, d)
    _labelled("Cu", 4, 0).to_deepmd_npy(str(d / "init" / "cu.fcc" / "deepmd"))
    _labelled("CuNi", 3, 1).to_deepmd_npy(str(d / "init" / "cuni" / "deepmd"))
    (d / "pp").mkdir()
    for f in ("POTCAR_Cu", "POTCAR_Ni", "Cu.pbe.UPF", "Ni.pbe.UPF", "Cu.upf", "Ni.upf", "Cu.orb", "Ni.orb"):
        (d / "pp" / f).write_text("stand-in\n")
    (d / "bin").mkdir()
    for prog in ("vasp_std", "abacus"):
        (d / "bin" / prog).write_text("#!/bin/sh\nexit 0\n")
        (d / "bin" / prog).chmod(0o755)
    old = os.environ["PATH"]
    os.environ["PATH"] = f"{d / 'bin'}{os.pathsep}{old}"
    yield d
    os.environ["PATH"] = old


def convert(camp, name, **kw):
    from dpsnake.importers.dpgen import convert as conv

    out = camp / "out" / f"{name}.yaml"
    cfg, ctx, printed = conv(camp / f"param-{name}.json", out, **kw)
    return cfg, {k for k, _, _ in ctx.notes}, ctx


def test_vasp(camp):
    cfg, notes, ctx = convert(camp, "vasp")
    assert cfg["type_map"] == ["Cu", "Ni"] and cfg["masses"] == {"Cu": 63.546, "Ni": 58.693}
    # sys_configs: the first matched POSCAR per system, replicas = matched files
    assert cfg["systems"]["sys000"]["structure"] == {
        "file": str(camp / "confs" / "cu.fcc" / "000000" / "POSCAR"),
        "format": "vasp",
    }
    assert cfg["systems"]["sys001"]["structure"]["file"].endswith("cuni/000000/POSCAR")
    # init data: copied per system by composition
    assert cfg["systems"]["sys000"]["init_data"].endswith("vasp.dpgen/data/sys000.h5")
    assert pathlib.Path(cfg["systems"]["sys001"]["init_data"]).is_file()
    tr = cfg["train"]
    assert tr["numb_models"] == 4 and tr["backend"] == "tf" and tr["numb_steps"] == 20000
    assert tr["init_from_previous"] is True and tr["init_lr_schedule"] == "reset" and tr["init_numb_steps"] == 5000
    inp = tr["input"]
    assert "type_map" not in inp["model"] and "seed" not in inp["model"]["descriptor"]
    assert inp["model"]["descriptor"]["sel"] == [60, 60] and inp["model"]["descriptor"]["rcut"] == 5.0
    assert "stop_batch" not in inp["training"] and "seed" not in inp["training"]
    assert inp["training"]["training_data"] == {"batch_size": 1}
    assert "_comment" not in inp["model"] and "_comment2" not in inp["training"]
    # keys DeePMD-kit 3 does not know (a 1.x leftover, a typo) went into the table
    assert {"default_training_param.training.coord_norm", "default_training_param.model.fitting_net.sedd"} <= notes
    st = cfg["explore"]["stages"]
    assert st[0] == {
        "systems": ["sys000"],
        "temperatures": [100.0, 300.0],
        "ensemble": "nvt",
        "nsteps": 300,
        "trj_freq": 10,
        "dt": 0.002,
        "replicas": 2,
        "max_iterations": 1,
    }
    assert st[1]["systems"] == ["sys000", "sys001"] and st[1]["pressures"] == [1.0, 1000.0]
    assert st[1]["ensemble"] == "npt" and st[1]["trj_freq"] == 20 and st[1]["nsteps"] == 1000
    assert cfg["convergence"] == {"max_iterations": 2}
    assert cfg["trust"] == {"force": [0.05, 0.15], "virial": None}
    assert cfg["select"] == {"max_candidates": 20, "pick": "random", "adaptive": {"enabled": False}}
    lab = cfg["label"]
    assert lab["type"] == "vasp" and lab["potcar_dir"] == str(camp / "pp")
    assert lab["potcars"] == {"Cu": "POTCAR_Cu", "Ni": "POTCAR_Ni"}
    assert lab["incar"]["ENCUT"] == 520 and lab["incar"]["KSPACING"] == 0.16 and lab["incar"]["EDIFF"] == 1e-6
    assert "NSW" not in lab["incar"] and "IBRION" not in lab["incar"] and lab["gamma"] is False
    assert {"fp_task_min", "model_devi_clean_traj", "training_reuse_start_lr", "cvasp"} <= notes
    assert "model_devi_skip" not in notes  # 0: nothing to carry
    assert not {k for k in ctx.param if not k.startswith("_")} - ctx.used  # every key read or in the table


def test_pwscf_and_slurm_machine(camp):
    prof = camp / "out" / "prof-slurm"
    cfg, notes, _ = convert(camp, "pwscf", machine=camp / "machine-slurm.json", profile_dir=prof)
    lab = cfg["label"]
    assert lab["type"] == "qe" and lab["pseudopotentials"] == {"Cu": "Cu.pbe.UPF", "Ni": "Ni.pbe.UPF"}
    assert (lab["ecutwfc"], lab["ecutrho"], lab["smearing"], lab["degauss"], lab["kspacing"]) == (
        60,
        480,
        "mv",
        0.02,
        0.3,
    )
    assert lab["control"] == {"disk_io": "none"} and lab["system"] == {"input_dft": "pbe"}
    assert lab["electrons"] == {"electron_maxstep": 200, "mixing_beta": 0.5, "conv_thr": 1e-8}
    assert lab["command"] == "mpirun -n 32 pw.x -in {input}" and lab["env"] == {"OMP_NUM_THREADS": "1"}
    assert lab["max_failed_fraction"] == 0.1
    assert cfg["train"]["backend"] == "pt" and cfg["explore"]["compress"] == "auto"
    s0, s1 = cfg["explore"]["stages"]
    # aliases Ts / Ps / t_freq / ens, the range "0-2" (= 0, 1), a job dt
    assert s0["systems"] == ["sys000", "sys001"] and s0["ensemble"] == "npt-tri" and s0["dt"] == 0.001
    assert (s0["temperatures"], s0["pressures"], s0["trj_freq"]) == ([500.0], [1.0], 5)
    assert s1["ensemble"] == "nve" and s1["tau_t"] == 0.2 and "pressures" not in s1 and "replicas" not in s1
    assert "model_devi_jobs[1].nbeads" in notes
    p = yaml.safe_load((prof / "config.yaml").read_text())
    assert p["executor"] == "slurm"
    tr, ex, la = p["set-resources"]["train"], p["set-resources"]["explore"], p["set-resources"]["label"]
    assert (tr["slurm_partition"], tr["runtime"], tr["mem_mb"], tr["slurm_account"]) == ("gpu", 1440, 32768, "myproj")
    assert tr["cpus_per_task"] == 8 and tr["gres"] == "gpu:1"
    assert ex["runtime"] == 120 and ex["slurm_extra"] == "--exclusive"
    assert (la["slurm_partition"], la["tasks"], la["cpus_per_task"], la["runtime"]) == ("cpu", 32, 1, 60)
    assert p["group-components"] == ["label=5"] and p["resources"] == ["label_slots=1"]
    assert p["default-resources"]["slurm_partition"] == "cpu"
    env = (prof / "setup-env.sh").read_text()
    assert (
        "module load deepmd-kit/3.0" in env and "module load qe/7.2" in env and "source ~/venvs/dp/bin/activate" in env
    )
    assert {"machine.json:fp.resources.para_deg", "machine.json:train.machine.remote_profile"} <= notes
    assert "machine.json:train.command" in notes


def test_cp2k(camp):
    cfg, notes, _ = convert(camp, "cp2k")
    lab = cfg["label"]
    assert lab["type"] == "cp2k" and (lab["cutoff"], lab["rel_cutoff"], lab["xc"]) == (500, 60, "PBE")
    assert (lab["eps_scf"], lab["max_scf"]) == (1e-6, 50)
    assert (lab["basis_set_file"], lab["potential_file"]) == ("BASIS_MOLOPT", "GTH_POTENTIALS")
    assert lab["potential"] == {"Cu": "GTH-PBE-q11", "Ni": "GTH-PBE-q18"}
    assert lab["basis"] == {"Cu": "DZVP-MOLOPT-SR-GTH", "Ni": "DZVP-MOLOPT-SR-GTH"}
    assert lab["max_failed_fraction"] == 0.2 and cfg["trust"]["force"] == [0.02, 0.15]
    assert "user_fp_params.FORCE_EVAL.DFT.SCF.OT" in notes
    assert not any(k.startswith("user_fp_params.FORCE_EVAL.SUBSYS") for k in notes)


def test_abacus(camp):
    cfg, notes, _ = convert(camp, "abacus")
    lab = cfg["label"]
    assert lab["type"] == "abacus" and lab["basis_type"] == "lcao" and lab["ecutwfc"] == 100
    assert lab["orbitals"] == {"Cu": "Cu.orb", "Ni": "Ni.orb"} and lab["orbital_dir"] == str(camp / "pp")
    assert (lab["smearing_method"], lab["smearing_sigma"], lab["kpts"]) == ("gauss", 0.002, [2, 2, 2])
    assert lab["input"] == {"symmetry": 0, "scf_thr": 1e-8, "scf_nmax": 100, "mixing_type": "pulay", "mixing_beta": 0.3}
    assert "fp_dpks_descriptor" in notes


def test_trust_per_system_adaptive(camp):
    cfg, notes, _ = convert(camp, "trust")
    sysc = cfg["systems"]
    assert sysc["sys000"]["trust"] == {"force": [0.05, 0.2], "virial": [0.02, 0.1]}  # dict lo, list hi
    assert sysc["sys001"]["trust"] == {"force": [0.08, 0.3], "virial": [0.02, 0.1]}
    assert cfg["select"]["adaptive"] == {"enabled": True, "numb_candidates": 12, "ratio": 0.05, "min_lo": 0.0}
    assert cfg["convergence"]["accurate_ratio"] == 0.98
    lab = cfg["label"]  # pwscf fp_params (DP-GEN's old recipe)
    assert (lab["ecutwfc"], lab["kspacing"], lab["smearing"], lab["degauss"]) == (45, 0.5, "mp", 0.02)
    assert lab["electrons"] == {"conv_thr": 1e-8}
    assert cfg["train"]["init_from_previous"] is True and cfg["train"]["init_numb_steps"] == 3000
    assert {
        "training_reuse_iter",
        "training_reuse_old_ratio",
        "model_devi_jobs[0].model_devi_f_trust_lo",
        "model_devi_numb_candi_v",
        "fp_accurate_soft_threshold",
    } <= notes


def test_template_jobs(camp):
    cfg, notes, _ = convert(camp, "template")
    (stage,) = cfg["explore"]["stages"]  # job 1 gives no temperature: left out
    assert stage["ensemble"] == "npt-aniso" and stage["dt"] == 0.001 and stage["nsteps"] == 4000
    assert stage["temperatures"] == [300.0, 600.0] and stage["pressures"] == [1.0, 100.0]
    assert {
        "model_devi_jobs[0].template",
        "model_devi_jobs[0].rev_mat.plm",
        "model_devi_jobs[0].rev_mat.lmp.V_NSTEPS",
        "model_devi_jobs[1]",
        "model_devi_plumed",
    } <= notes
    assert cfg["convergence"]["max_iterations"] == 1


def test_gromacs_engine_gaussian_lammps_data(camp):
    cfg, notes, _ = convert(camp, "gromacs")
    # sys_format lammps/lmp: converted by dpdata with the type_map
    f = pathlib.Path(cfg["systems"]["sys000"]["structure"]["file"])
    assert f.parent.name == "structures" and f.is_file()
    lab = cfg["label"]
    assert lab["type"] == "ase" and lab["calculator"] == "ase.calculators.gaussian.Gaussian"
    assert lab["kwargs"] == {
        "method": "b3lyp",
        "basis": "6-31g**",
        "extra": "nosymm",
        "nprocshared": 4,
        "charge": 0,
        "mult": 1,
    }
    assert [s["temperatures"] for s in cfg["explore"]["stages"]] == [[300.0]]
    assert {"model_devi_engine", "gromacs_settings", "model_devi_jobs[0]", "model_devi_nopbc", "sys_charges"} <= notes


def test_pbs_lsf_machine(camp):
    from dpsnake.importers.machine import write_profile

    prof = camp / "out" / "prof-pbs"
    extras, notes, _ = write_profile(camp / "machine-pbs-lsf.json", prof)
    p = yaml.safe_load((prof / "config.yaml").read_text())
    assert p["executor"] == "cluster-generic" and "qsub" in p["cluster-generic-submit-cmd"]
    assert p["set-resources"]["train"]["pbs_resources"] == "select=1:ncpus=4:ngpus=1,walltime=10:00:00"
    assert p["set-resources"]["label"]["pbs_resources"] == "select=1:ncpus=28,walltime=02:30:00"
    assert p["set-resources"]["label"]["pbs_queue"] == "small" and p["set-resources"]["label"]["pbs_extra"] == "-m abe"
    assert "groups" not in p  # fp group_size 1
    assert extras["fp_command"] == "mpirun -n 28 cp2k.popt -i input.inp"
    keys = {k for k, _, _ in notes}
    assert "machine.json:model_devi.machine.batch_type" in keys  # LSF beside PBS: one executor per profile
    from dpsnake.importers.dpgen_label import fp_command

    assert fp_command("cp2k", extras["fp_command"]) == "mpirun -n 28 cp2k.popt -i {input}"


def test_data_of_a_dpgen_run(camp, tmp_path):
    """--data: iter.*/02.fp/data.* (no type_map.raw: DP-GEN's type_map names the types) become init data of
    their system; the plan starts after the finished iterations."""
    work = tmp_path / "dpgen-run"
    for it, idx, sym, n in ((0, 0, "Cu", 2), (0, 1, "CuNi", 3), (1, 0, "Cu", 1)):
        folder = work / f"iter.{it:06d}" / "02.fp" / f"data.{idx:03d}"
        _labelled(sym, n, 10 + it, type_map=["Cu", "Ni"]).to_deepmd_npy(str(folder))
        (folder / "type_map.raw").unlink()
    (work / "record.dpgen").write_text("0 0\n0 8\n1 0\n")  # iteration 1 not finished
    cfg, notes, _ = convert(camp, "vasp", data=work)
    import dpdata

    def frames(name):
        ms = dpdata.MultiSystems.from_file(cfg["systems"][name]["init_data"], fmt="deepmd/hdf5")
        return sum(len(s) for s in ms.systems.values())

    assert frames("sys000") == 4 + 2 + 1 and frames("sys001") == 3 + 3
    assert [s["systems"] for s in cfg["explore"]["stages"]] == [["sys000", "sys001"]]  # job 0 done
    assert "model_devi_jobs[0:1]" in notes


def test_confs_all(camp):
    """--confs all: one system per matched file; the Cu init data is split so no system generates its own."""
    cfg, _, _ = convert(camp, "vasp", confs="all")
    assert list(cfg["systems"]) == ["sys000_000", "sys000_001", "sys001_000"]
    assert [s["systems"] for s in cfg["explore"]["stages"]][0] == ["sys000_000", "sys000_001"]
    assert all("replicas" not in s for s in cfg["explore"]["stages"])
    assert all(pathlib.Path(s["init_data"]).is_file() for s in cfg["systems"].values())


def test_cli_table_and_yaml(camp, capsys):
    from dpsnake.cli import main

    out = camp / "out" / "cli.yaml"
    assert main(["import-dpgen", str(camp / "param-template.json"), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "passes check-config" in text and "DP-GEN keys not carried over:" in text
    assert text.rstrip().splitlines()[-1].startswith("model_devi_plumed") or "model_devi_plumed" in text
    body = out.read_text()
    assert "# ---- DP-GEN keys not carried over" in body and "# model_devi_jobs[0].template" in body
    assert "# explore.stages[0] <- model_devi_jobs[0]" in body
    assert main(["check-config", str(out)]) == 0


@pytest.mark.parametrize(
    "edit, words",
    [
        ({"mass_map": [1.0]}, "mass_map: expected 2 masses"),
        ({"sys_configs": [["nowhere/*/POSCAR"]]}, "sys_configs[0]: ['nowhere/*/POSCAR'] match no file"),
        ({"fp_style": "siesta"}, "fp_style: 'siesta': dpsnake has no labeler"),
        ({"model_devi_f_trust_lo": [0.05]}, "model_devi_f_trust_lo: a list of 1 values"),
        (
            {"model_devi_jobs": [{"sys_idx": [5], "temps": [300], "nsteps": 10, "ensemble": "nvt", "trj_freq": 5}]},
            "sys_idx",
        ),
    ],
)
def test_bad_input_one_line(camp, edit, words):
    param = json.loads((camp / "param-vasp.json").read_text())
    param.update(edit)
    (camp / "param-bad.json").write_text(json.dumps(param))
    with pytest.raises(UserError) as err:
        convert(camp, "bad")
    msg = str(err.value)
    assert "param-bad.json: " in msg and words in msg and "\n" not in msg


@pytest.mark.slow
def test_converted_campaign_runs_end_to_end(camp, tmp_path):
    """A small Cu campaign (tiny network, 100 steps, one short exploration job) converted with an EMT labeler
    runs through the workflow (profiles/local) and labels frames."""
    wd = tmp_path / "wd"
    wd.mkdir()
    for name in ("Snakefile", "workflow", "profiles", "envs", "config"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, wd / name)
    param = json.loads((camp / "param-vasp.json").read_text())
    tp = param["default_training_param"]
    tp["model"].update(type_map=["Cu"])
    tp["model"]["descriptor"].update(sel=[60], neuron=[4, 8], axis_neuron=4)
    tp["model"]["fitting_net"] = {"neuron": [8, 8], "resnet_dt": True}
    tp["learning_rate"].update(decay_steps=20, stop_lr=3e-4, start_lr=3e-3)
    tp["training"].update(stop_batch=100, disp_freq=50, save_freq=100)
    param.update(
        type_map=["Cu"],
        mass_map="auto",
        numb_models=2,
        init_data_sys=["cu.fcc/deepmd"],
        sys_configs=[["cu.fcc/000000/POSCAR"]],
        model_devi_jobs=[{"sys_idx": [0], "temps": [600], "trj_freq": 10, "nsteps": 40, "ensemble": "nvt"}],
        model_devi_f_trust_lo=0.0,
        model_devi_f_trust_hi=10.0,
        fp_task_max=2,
        fp_pp_files=["POTCAR_Cu"],
    )
    param.pop("training_init_model")
    (camp / "param-e2e.json").write_text(json.dumps(param))
    cfgfile = wd / "dpgen.yaml"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "dpsnake.cli", "import-dpgen", str(camp / "param-e2e.json"), "-o", str(cfgfile)]
    p = subprocess.run(cmd + ["--labeler", "{type: ase, calculator: EMT}"], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = yaml.safe_load(cfgfile.read_text())
    cfg["explore"].update(device="cpu", threads=1)
    cfgfile.write_text(yaml.safe_dump(cfg))
    smk = [
        sys.executable,
        "-m",
        "snakemake",
        "--profile",
        "profiles/local",
        "--configfile",
        "dpgen.yaml",
        "--cores",
        "2",
    ]
    p = subprocess.run(smk, cwd=wd, capture_output=True, text=True, env=env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    stats = json.loads((wd / "results" / "iter.000000" / "select" / "stats.json").read_text())
    assert stats["systems"]["sys000"]["total"] > 0 and stats["systems"]["sys000"]["selected"] == 2
    assert (wd / "results" / "data" / "init" / "sys000").is_dir()
    assert (wd / "results" / "models" / "final").is_dir()


@pytest.mark.parametrize(
    "param, machine, resource",
    [("pwscf", "machine-slurm", "slurm_partition=gpu"), ("cp2k", "machine-pbs-lsf", "pbs_resources=select=1")],
)
def test_profile_and_config_pass_a_snakemake_dry_run(camp, tmp_path, param, machine, resource):
    """The converted config with the profile made from the machine.json: Snakemake (with the SLURM or the
    generic cluster executor plugin) accepts both and plans the first iteration."""
    from dpsnake.importers.dpgen import convert as conv
    from dpsnake.importers.dpgen import to_yaml

    wd = tmp_path / "wd"
    wd.mkdir()
    for name in ("Snakefile", "workflow", "envs", "config"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, wd / name)
    out = wd / "dpgen.yaml"
    cfg, ctx, _ = conv(camp / f"param-{param}.json", out, machine=camp / f"{machine}.json", profile_dir=wd / "prof")
    out.write_text(to_yaml(cfg, ctx))
    cmd = [sys.executable, "-m", "snakemake", "-n", "--profile", "prof", "--configfile", "dpgen.yaml"]
    p = subprocess.run(cmd, cwd=wd, capture_output=True, text=True)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert resource in p.stdout and "This was a dry-run" in p.stdout
    assert re.search(r"^train\s+4$", p.stdout, re.M) and re.search(r"^explore\s+1$", p.stdout, re.M)
