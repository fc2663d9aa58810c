"""Config mistakes caught by ``dpsnake check-config`` (and before any Snakemake job): schema, files,
elements, trust levels, the exploration plan, the labeler's name.

Each probe writes the reduced test config with one mistake and runs ``dpsnake check-config FILE``:
exit 2, one line on stderr naming the key or file. ``config_probe`` is shared with the labeler and
structure probes (tests/bad_inputs/labelers.py, structures.py).
"""

from __future__ import annotations

import copy
import pathlib
import subprocess
import sys
from collections.abc import Callable

import yaml

from bad_inputs import ROOT, Probe, dpsnake

REDUCED = yaml.safe_load((ROOT / "tests" / "configs" / "reduced.yaml").read_text())


def write_config(tmp_path: pathlib.Path, mutate: Callable, name: str = "bad.yaml") -> pathlib.Path:
    """The reduced config with ``mutate(cfg, tmp_path)`` applied, written to ``tmp_path/name``."""
    cfg = copy.deepcopy(REDUCED)
    mutate(cfg, tmp_path)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def config_probe(id: str, mutate: Callable, names: str, base: str = "root") -> Probe:
    """A probe running ``dpsnake check-config`` on the reduced config changed by ``mutate(cfg, tmp)``;
    relative paths start from the checkout (``base='root'``) or from the probe's tmp folder."""

    def run(tmp_path):
        path = write_config(tmp_path, mutate)
        return dpsnake("check-config", path, "--base", ROOT if base == "root" else tmp_path, cwd=tmp_path)

    return Probe(id, run, names)


def snakemake_probe(id: str, mutate: Callable, names: str) -> Probe:
    """The same mistake through ``snakemake -n``: the Snakefile checks the config before any job."""

    def run(tmp_path):
        path = write_config(tmp_path, mutate)
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "snakemake",
                "-n",
                "--cores",
                "1",
                "-s",
                str(ROOT / "Snakefile"),
                "--configfile",
                str(path),
                "--directory",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert not (tmp_path / "results").exists(), "a job ran"
        return p.returncode, p.stdout + p.stderr

    return Probe(id, run, names, rc=None)


def _set(*path, value):
    """mutate: cfg[path...] = value."""

    def mutate(cfg, tmp):
        d = cfg
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value

    return mutate


def _init_data_ag(cfg, tmp):
    """systems.Cu.init_data: a real deepmd/npy set of Ag (not in the type_map)."""
    import dpdata
    from ase.build import bulk
    from ase.calculators.emt import EMT

    a = bulk("Ag", "fcc", a=4.1, cubic=True)
    a.calc = EMT()
    a.get_potential_energy()
    dpdata.LabeledSystem(a, fmt="ase/structure").to_deepmd_npy(str(tmp / "ag"))
    cfg["systems"]["Cu"]["init_data"] = str(tmp / "ag")


def _file_missing(tmp_path):
    return dpsnake("check-config", tmp_path / "no_such.yaml", cwd=tmp_path)


def _not_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("type_map: [Cu\nsystems: {\n")
    return dpsnake("check-config", tmp_path / "bad.yaml", cwd=tmp_path)


STAGE = ("explore", "stages", 0)


def _pressure_ramp(ramp):
    """mutate: the first stage's pressures replaced by the schedule ``ramp``."""

    def mutate(cfg, tmp):
        cfg["explore"]["stages"][0].pop("pressures", None)
        cfg["explore"]["stages"][0]["pressure_ramp"] = ramp

    return mutate


PROBES = [
    config_probe("config-unknown-top-key", lambda c, t: c.update(foo=1), "foo: unknown key"),
    config_probe("config-unknown-train-key", _set("train", "numb_stepz", value=5), "train.numb_stepz: unknown key"),
    config_probe("config-train-server", _set("train", "server", value="maybe"), "train.server: 'maybe' is not one of"),
    config_probe(
        "config-explore-warmup", _set("explore", "warmup", value="yes"), "explore.warmup: 'yes' is not one of"
    ),
    config_probe(
        "config-explore-compile", _set("explore", "compile", value="yes"), "explore.compile: 'yes' is not one of"
    ),
    config_probe(
        "config-select-random-fraction",
        _set("select", "random_fraction", value=2),
        "select.random_fraction: 2 is greater than the maximum of 1",
    ),
    config_probe(
        "config-select-quota",
        _set("select", "quota", value="weighted"),
        "select.quota: 'weighted' is not one of ['system', 'condition', 'condition_weighted']",
    ),
    config_probe(
        "config-train-init-lr-warmup",
        _set("train", "init_lr_warmup", value=1.5),
        "train.init_lr_warmup: 1.5 is greater than or equal to the maximum of 1",
    ),
    config_probe(
        "config-wrong-type",
        _set("train", "numb_models", value="two"),
        "train.numb_models: 'two' is not of type 'integer'",
    ),
    config_probe(
        "config-temperatures-not-a-list", _set(*STAGE, "temperatures", value="hot"), "explore.stages[0].temperatures"
    ),
    config_probe("config-unknown-ensemble", _set(*STAGE, "ensemble", value="npx"), "explore.stages[0].ensemble"),
    config_probe(
        "config-stage-unknown-system",
        _set(*STAGE, "systems", value=["Fe"]),
        "explore.stages[0].systems: unknown system 'Fe'",
    ),
    config_probe("config-no-systems", lambda c, t: c.pop("systems"), "'systems' is a required property"),
    config_probe(
        "config-trust-order",
        _set("trust", "force", value=[0.3, 0.1]),
        "trust.force: theta_low 0.3 must be below theta_high 0.1",
    ),
    config_probe(
        "config-system-trust-short", _set("systems", "Cu", "trust", value={"force": [0.2]}), "systems.Cu.trust.force"
    ),
    config_probe(
        "config-element-outside-type-map",
        _set("type_map", value=["Cu"]),
        "systems.CuNi.structure: elements ['Ni'] not in the global type_map",
    ),
    config_probe(
        "config-system-type-map",
        _set("systems", "Cu", "type_map", value=["Cu", "Fe"]),
        "systems.Cu.type_map: element 'Fe'",
    ),
    config_probe(
        "config-model-type-map",
        _set("train", "input", "model", "type_map", value=["Ni", "Cu"]),
        "train.input.model.type_map",
    ),
    config_probe(
        "config-structure-file-missing",
        _set("systems", "Cu", "structure", value={"file": "nope/POSCAR"}),
        "systems.Cu.structure.file: nope/POSCAR: no such file",
    ),
    config_probe(
        "config-unknown-builder",
        _set("systems", "Cu", "structure", "builder", value="no_such_builder"),
        "systems.Cu.structure.builder",
    ),
    config_probe(
        "config-file-and-builder",
        _set("systems", "Cu", "structure", "file", value="x.vasp"),
        "systems.Cu.structure: give exactly one of",
    ),
    config_probe(
        "config-init-data-missing",
        _set("systems", "Cu", "init_data", value="missing_data"),
        "systems.Cu.init_data: missing_data: no such file or folder",
    ),
    config_probe("config-init-data-elements", _init_data_ag, "systems.Cu.init_data:"),
    config_probe(
        "config-masses-element", lambda c, t: c.update(masses={"Fe": 55.8}), "masses.Fe: element not in type_map"
    ),
    config_probe("config-unknown-calculator", _set("label", "calculator", value="NoSuchCalc"), "label.calculator"),
    config_probe("config-unknown-labeler", _set("label", "type", value="vasp-nope"), "label.type: unknown labeler"),
    config_probe(
        "config-test-data-missing", lambda c, t: c.update(test_data=["no/such/set"]), "test_data[0]: no/such/set"
    ),
    config_probe(
        "config-bad-system-name", lambda c, t: c["systems"].update({"bad name": c["systems"]["Cu"]}), "name 'bad name'"
    ),
    config_probe("config-compress-negative", _set("explore", "compress", value=-1.0), "explore.compress"),
    config_probe("config-compress-word", _set("explore", "compress", value="yes"), "explore.compress"),
    config_probe("config-shards-zero", _set("explore", "shards", value=0), "explore.shards: 0 is less than"),
    config_probe("config-shard-budget", _set("explore", "shard_budget", value=-1), "explore.shard_budget"),
    config_probe("config-pick", _set("select", "pick", value="best"), "select.pick: 'best' is not one of"),
    config_probe(
        "config-group-unknown-system",
        _set(*STAGE, "groups", value=[{"temperatures": [300]}, {"systems": ["Fe"], "temperatures": [300]}]),
        "explore.stages[0].groups[1].systems: unknown system 'Fe'",
    ),
    config_probe(
        "config-ramp-knots-order",
        _pressure_ramp({"knots": [[0, 0], [40, 1e4], [30, 0]]}),
        "explore.stages[0].pressure_ramp.knots[2]: steps must increase, got 30 after 40",
    ),
    config_probe(
        "config-transform-alloy-fractions",
        _set("systems", "Cu", "structure", "transform", value=[{"alloy": {"fractions": {"Cu": 0.5, "Ni": 0.4}}}]),
        "systems.Cu.structure.transform[0].alloy.fractions: must add up to 1, they add up to 0.9",
    ),
    Probe("config-file-missing", _file_missing, "no_such.yaml: config file not found"),
    Probe("config-not-yaml", _not_yaml, "bad.yaml: not valid YAML"),
    snakemake_probe(
        "config-pick-snakemake", _set("select", "pick", value="best"), "config error: select.pick: 'best' is not one of"
    ),
]
