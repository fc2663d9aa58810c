"""Check-time checks of the systems' start structures against what exploration and training need.

Run by ``dpsnake check-config`` and before any Snakemake job (``workflow.config.check``), so that a
structure the explorer would refuse, or a descriptor too small for it, fails before the first
training instead of an iteration later:

- periodicity: exploration runs cells periodic in all directions or in none; a slab from ASE's
  builders (``fcc111(..., vacuum=10)``: pbc (True, True, False)) is named with the remedy;
- ``npt*`` ensembles need a periodic cell;
- ``sel``: the most neighbours within ``rcut`` the descriptor keeps (per type for se_e2_a and the
  other ``se_*`` descriptors, in total for the attention descriptors, DPA-2, DPA-3). DeePMD-kit
  drops the farthest neighbours above it (a note in the training log only); exploration compresses
  and heats the structure, so a start structure already above ``sel`` is an error.
"""

from __future__ import annotations

import inspect

import numpy as np

from dpsnake.errors import UserError

# descriptors whose sel is a list with one entry per type (type_map order)
PER_TYPE = (
    "se_e2_a",
    "se_a",
    "se_e2_r",
    "se_r",
    "se_e3",
    "se_at",
    "se_a_3be",
    "se_a_tpe",
    "se_a_ebd",
    "se_a_ebd_v2",
    "se_a_mask",
)
# descriptors whose sel is one total (a list is summed, as DeePMD-kit does)
TOTAL = ("se_atten", "dpa1", "se_atten_v2", "se_e3_tebd")


def structure_key(spec: dict, key: str) -> str:
    """The config key that names where a structure comes from (its file, or its builder)."""
    return f"{key}.file: {spec['file']}" if "file" in spec else f"{key}.builder: {spec['builder']}"


def check_periodicity(spec: dict, atoms, key: str) -> None:
    """Mixed periodicity (unsupported by exploration) and periodic cells without volume."""
    pbc = [bool(p) for p in atoms.pbc]
    where = structure_key(spec, key)
    if any(pbc) and not all(pbc):
        if "file" in spec:
            how = (
                "write the file with pbc True in all directions (e.g. atoms.pbc = True, then "
                "ase.io.write to extxyz or POSCAR)"
            )
        elif _takes(spec["builder"], "periodic"):
            how = "add periodic: true to its kwargs"
        else:
            how = "build it periodic in all directions (a file written with atoms.pbc = True)"
        vacuum = (
            "keep the vacuum"
            if abs(np.linalg.det(atoms.cell.array)) > 1e-6
            else "give it a vacuum (a cell length) along the non-periodic direction"
        )
        raise UserError(
            f"{where}: pbc {pbc} (periodic in some directions only) is not supported by "
            f"exploration yet; make it periodic in all directions and {vacuum}, as DP-GEN "
            f"users do for slabs: {how}"
        )
    if all(pbc) and abs(np.linalg.det(atoms.cell.array)) < 1e-6:
        raise UserError(f"{where}: periodic but the cell has zero volume {atoms.cell.lengths().round(3).tolist()}")


def _takes(builder: str, arg: str) -> bool:
    """Whether the builder function accepts keyword ``arg`` (e.g. ase.build.fcc111's periodic)."""
    from dpsnake.workflow.structures import _builder

    try:
        return arg in inspect.signature(_builder(builder, "structure")).parameters
    except (UserError, TypeError, ValueError):
        return False


def check_ensembles(cfg: dict, atoms_of: dict) -> None:
    """``npt*`` stages only on periodic systems (the barostat scales the cell)."""
    from dpsnake.workflow.stages import group_key, groups_of

    for i, stage in enumerate(cfg["explore"]["stages"]):
        for j, group in enumerate(groups_of(stage)):
            if not group["ensemble"].startswith("npt"):
                continue
            for name in group["systems"]:
                atoms = atoms_of[name]
                if not atoms.pbc.all():
                    raise UserError(
                        f"{group_key(stage, i, j)}.ensemble: {group['ensemble']} needs a periodic cell, but "
                        f"system {name} is not periodic (pbc {[bool(p) for p in atoms.pbc]}); use nvt "
                        "for it (a stage or group of its own) or give it a periodic cell"
                    )


def descriptor_sels(desc: dict, key: str) -> list[tuple[str, float, list | int]]:
    """(config key of sel, rcut, sel) for every neighbour list of a normalized DeePMD-kit descriptor;
    sel a list (per type) or an int (total). ``sel: auto`` (set from the data) is left out."""
    dtype = desc.get("type", "se_e2_a")
    out = []
    if dtype == "hybrid":
        for i, sub in enumerate(desc.get("list") or []):
            out += descriptor_sels(sub, f"{key}.list[{i}]")
    elif dtype in PER_TYPE or dtype in TOTAL:
        sel = desc.get("sel")
        if dtype in TOTAL and isinstance(sel, list):
            sel = int(sum(sel))
        out.append((f"{key}.sel", desc.get("rcut"), sel))
    elif dtype == "dpa2":
        rep, fmr = desc.get("repinit") or {}, desc.get("repformer") or {}
        out.append((f"{key}.repinit.nsel", rep.get("rcut"), rep.get("nsel")))
        if rep.get("use_three_body"):
            out.append((f"{key}.repinit.three_body_sel", rep.get("three_body_rcut"), rep.get("three_body_sel")))
        out.append((f"{key}.repformer.nsel", fmr.get("rcut"), fmr.get("nsel")))
    elif dtype == "dpa3":
        flow = desc.get("repflow") or {}
        if not flow.get("use_dynamic_sel"):  # dynamic selection keeps every neighbour within rcut
            out.append((f"{key}.repflow.e_sel", flow.get("e_rcut"), flow.get("e_sel")))
            out.append((f"{key}.repflow.a_sel", flow.get("a_rcut"), flow.get("a_sel")))
    return [
        (k, float(r), s)
        for k, r, s in out
        if r and (isinstance(s, int) or (isinstance(s, list) and all(isinstance(x, int) for x in s)))
    ]


def neighbour_counts(atoms, rcut: float, ntypes: int, atype: np.ndarray, pairs=None) -> np.ndarray:
    """(natoms, ntypes) number of neighbours of each type within rcut (r < rcut, images included);
    ``pairs``: (i, j, d) of ASE's neighbour list for a cutoff >= rcut, to list the pairs once."""
    from ase.neighborlist import neighbor_list

    i, j, d = pairs if pairs is not None else neighbor_list("ijd", atoms, rcut, self_interaction=False)
    keep = d < rcut
    counts = np.zeros((len(atoms), ntypes), dtype=np.int64)
    np.add.at(counts, (i[keep], atype[j[keep]]), 1)
    return counts


def check_sel(cfg: dict, atoms_of: dict, model: dict) -> None:
    """Every start structure within the descriptor's sel (see the module docstring)."""
    from ase.neighborlist import neighbor_list

    # per-type sel follows the model's type_map: a fine-tuned model's may be the pretrained one's
    tmap = list(model.get("type_map") or cfg["type_map"])
    sels = descriptor_sels(model.get("descriptor") or {}, "train.input.model.descriptor")
    if not sels:
        return
    rmax = max(r for _, r, _ in sels)
    for name, atoms in atoms_of.items():
        if not set(atoms.get_chemical_symbols()) <= set(tmap):
            continue  # named elsewhere (the type_map checks)
        atype = np.array([tmap.index(s) for s in atoms.get_chemical_symbols()])
        pairs = neighbor_list("ijd", atoms, rmax, self_interaction=False)  # once per system
        for key, rcut, sel in sels:
            counts = neighbour_counts(atoms, rcut, len(tmap), atype, pairs)
            if isinstance(sel, list):
                for t, el in enumerate(tmap):
                    worst = int(counts[:, t].max(initial=0))
                    if t < len(sel) and worst > sel[t]:
                        _sel_error(key, name, f"{worst} {el} neighbours", rcut, f"sel[{t}] = {sel[t]} ({el})")
            else:
                worst = int(counts.sum(axis=1).max(initial=0))
                if worst > sel:
                    _sel_error(key, name, f"{worst} neighbours", rcut, f"sel = {sel}")


def _sel_error(key: str, system: str, found: str, rcut: float, sel: str) -> None:
    raise UserError(
        f"{key}: system {system}'s start structure already has an atom with {found} within "
        f"rcut {rcut:g} A, above {sel}; DeePMD-kit would drop the farthest (and the explored MD "
        "compresses and heats): raise sel with headroom, or use sel: auto"
    )


def check_structures(cfg: dict, specs: dict, atoms_of: dict, model: dict | None) -> None:
    """All of the above for the systems' start structures ``atoms_of`` {system: Atoms}."""
    for name, atoms in atoms_of.items():
        check_periodicity(specs[name], atoms, f"systems.{name}.structure")
    check_ensembles(cfg, atoms_of)
    if model is not None:
        check_sel(cfg, atoms_of, model)
