"""Start structures that exploration or the descriptor cannot take, caught at check time (issue 19
items 8 and 10, issue 20 item 5): a slab (mixed periodicity, from ASE's builders) under ``npt`` or
without a vacuum of rcut along its non-periodic direction, a periodic cell without volume, ``npt``
on a non-periodic system, more neighbours within rcut than the descriptor's ``sel``."""

from __future__ import annotations

from bad_inputs.config import config_probe, snakemake_probe

SLAB = {"builder": "fcc111", "kwargs": {"symbol": "Cu", "size": [2, 2, 3], "a": 3.61, "vacuum": 10.0}}
THIN = {"builder": "fcc111", "kwargs": {"symbol": "Cu", "size": [2, 2, 3], "a": 3.61, "vacuum": 1.0}}


def _structure(spec):
    def mutate(cfg, tmp):
        cfg["systems"]["Cu"]["structure"] = spec

    return mutate


def _nvt(cfg):
    for stage in cfg["explore"]["stages"]:
        stage.update(ensemble="nvt")
        stage.pop("pressures", None)


def _thin(cfg, tmp):
    """A slab from fcc111 with 2 A of vacuum (below rcut 4 A), on nvt stages."""
    cfg["systems"]["Cu"]["structure"] = THIN
    _nvt(cfg)


def _slab_file(cfg, tmp):
    """An extxyz slab written by ASE with pbc T T F (what ase.build.fcc111 gives), 2 A of vacuum."""
    import ase.io
    from ase.build import fcc111

    slab = fcc111("Cu", (2, 2, 3), a=3.61, vacuum=1.0)
    slab.info.clear()  # adsorbate_info: not for extxyz
    ase.io.write(tmp / "slab.extxyz", slab)
    cfg["systems"]["Cu"]["structure"] = {"file": "slab.extxyz"}
    _nvt(cfg)


def _cluster_npt(cfg, tmp):
    """A Cu cluster (no cell) explored with the reduced config's npt stage."""
    cfg["systems"]["Cu"]["structure"] = {
        "builder": "ase.cluster.Icosahedron",
        "kwargs": {"symbol": "Cu", "noshells": 2},
    }


def _descriptor(**desc):
    def mutate(cfg, tmp):
        d = cfg["train"]["input"]["model"]["descriptor"]
        d.update(desc)
        if d["type"] != "se_e2_a":
            for key in ("axis_neuron",):
                d.pop(key, None)
            cfg["train"]["backend"] = "pt"

    return mutate


PROBES = [
    # item 10 (issue 20 item 5: slabs are explored): npt on a slab; a slab without a vacuum of rcut
    config_probe(
        "structure-slab-npt",
        _structure(SLAB),
        "explore.stages[0].ensemble: npt needs a cell periodic in all directions, but system Cu is a slab",
    ),
    config_probe(
        "structure-slab-builder", _thin, "systems.Cu.structure.builder: fcc111: pbc [True, True, False]: the cell is"
    ),
    config_probe(
        "structure-slab-file",
        _slab_file,
        "systems.Cu.structure.file: slab.extxyz: pbc [True, True, False]: the cell is",
        base="tmp",
    ),
    snakemake_probe("structure-slab-snakemake", _thin, "config error: systems.Cu.structure.builder: fcc111"),
    config_probe(
        "structure-periodic-no-volume",
        _structure({"builder": "ase.Atoms", "kwargs": {"symbols": "Cu2", "pbc": True}}),
        "systems.Cu.structure.builder: ase.Atoms: periodic but the cell has zero volume",
    ),
    # item 8: npt without a cell; more neighbours than sel
    config_probe(
        "structure-npt-not-periodic",
        _cluster_npt,
        "explore.stages[0].ensemble: npt needs a periodic cell, but system Cu is not periodic",
    ),
    config_probe(
        "structure-sel-per-type",
        _descriptor(sel=[12, 12]),
        "train.input.model.descriptor.sel: system Cu's start structure already has an atom with 18 Cu "
        "neighbours within rcut 4 A, above sel[0] = 12 (Cu)",
    ),
    config_probe(
        "structure-sel-total",
        _descriptor(type="se_atten_v2", sel=16),
        "train.input.model.descriptor.sel: system Cu's start structure already has an atom with 18 "
        "neighbours within rcut 4 A, above sel = 16",
    ),
    snakemake_probe(
        "structure-sel-snakemake",
        _descriptor(sel=[12, 12]),
        "config error: train.input.model.descriptor.sel: system Cu's",
    ),
]
