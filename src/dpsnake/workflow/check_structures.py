"""Check-time checks of the systems' start structures against what exploration and training need.

Run by ``dpsnake check-config`` and before any Snakemake job (``workflow.config.check``), so that a
structure the explorer would refuse, or a descriptor too small for it, fails before the first
training instead of an iteration later:

- periodicity: any per direction (a slab from ASE's builders, ``fcc111(..., vacuum=10)``, has pbc
  (True, True, False); a wire (False, False, True)). Exploration images only the periodic
  directions, but training (DeePMD-kit treats every cell with a periodic direction as periodic in
  all three) and DFT labels see the cell as it is: along each non-periodic direction it must hold
  the atoms plus a vacuum of rcut, or the slab would meet its own image there;
- ``npt*`` ensembles need a cell periodic in all directions (the barostat scales all three);
- ``sel``: the most neighbours within ``rcut`` the descriptor keeps (per type for se_e2_a and the
  other ``se_*`` descriptors, in total for the attention descriptors, DPA-2, DPA-3). DeePMD-kit
  drops the farthest neighbours above it (a note in the training log only); exploration compresses
  and heats the structure, so a start structure already above ``sel`` is an error.
"""

from __future__ import annotations

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
    if "random" in spec:
        return f"{key}.random"
    return f"{key}.file: {spec['file']}" if "file" in spec else f"{key}.builder: {spec['builder']}"


def check_periodicity(spec: dict, atoms, key: str, rcut: float | None = None) -> None:
    """Periodic cells without volume; slabs and wires whose periodic cell vectors are degenerate or
    whose cell has less than ``rcut`` (A; the largest of the descriptor, None: not checked) of
    vacuum along a non-periodic direction (see the module docstring)."""
    pbc = [bool(p) for p in atoms.pbc]
    where = structure_key(spec, key)
    cell = atoms.cell.array
    if all(pbc) and abs(np.linalg.det(cell)) < 1e-6:
        raise UserError(f"{where}: periodic but the cell has zero volume {atoms.cell.lengths().round(3).tolist()}")
    if not any(pbc) or all(pbc):
        return
    from dpsnake.engine.neighbor import effective_cells

    if not abs(np.linalg.det(effective_cells(np, cell[None], np.array([pbc]))[0])) > 1e-6:
        raise UserError(f"{where}: pbc {pbc}: the cell vectors along the periodic directions are degenerate")
    det = np.linalg.det(cell)
    for k in np.nonzero(~np.array(pbc))[0]:
        # width of the cell across direction k (between the faces of the other two rows), and the
        # atoms' extent along the same normal
        m = np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3])
        area = max(float(np.linalg.norm(m)), 1e-300)
        width = abs(det) / area
        proj = atoms.positions @ (m / area)
        extent = float(proj.max() - proj.min()) if len(atoms) else 0.0
        need = extent + (rcut or 0.0)
        if not width >= need - 1e-9:
            vac = f"rcut {rcut:g} A" if rcut else "some"
            raise UserError(
                f"{where}: pbc {pbc}: the cell is {width:.3g} A across along non-periodic direction {'abc'[k]}, "
                f"the atoms span {extent:.3g} A: training (DeePMD-kit treats the cell as periodic) and DFT "
                f"labels need a vacuum of {vac} there; give the cell at least {need:.3g} A along {'abc'[k]} "
                "(e.g. the builder's vacuum, or atoms.center(vacuum=..., axis=...))"
            )


def check_ensembles(cfg: dict, atoms_of: dict) -> None:
    """``npt*`` stages only on systems periodic in all directions (the barostat scales the cell)."""
    from dpsnake.workflow.stages import group_key, groups_of

    for i, stage in enumerate(cfg["explore"]["stages"]):
        for j, group in enumerate(groups_of(stage)):
            if not group["ensemble"].startswith("npt"):
                continue
            for name in group["systems"]:
                atoms = atoms_of[name]
                if atoms.pbc.any() and not atoms.pbc.all():
                    raise UserError(
                        f"{group_key(stage, i, j)}.ensemble: {group['ensemble']} needs a cell periodic in "
                        f"all directions, but system {name} is a slab or wire (pbc {[bool(p) for p in atoms.pbc]}); "
                        "use nvt for it (a stage or group of its own)"
                    )
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


def _float(v) -> float | None:
    """v as a positive float, else None (a descriptor without a plain rcut)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None


def _sel_error(key: str, system: str, found: str, rcut: float, sel: str) -> None:
    raise UserError(
        f"{key}: system {system}'s start structure already has an atom with {found} within "
        f"rcut {rcut:g} A, above {sel}; DeePMD-kit would drop the farthest (and the explored MD "
        "compresses and heats): raise sel with headroom, or use sel: auto"
    )


def check_structures(cfg: dict, specs: dict, atoms_of: dict, model: dict | None) -> None:
    """All of the above for the systems' start structures ``atoms_of`` {system: Atoms}."""
    desc = (model or {}).get("descriptor") or {}
    rcut = max((r for _, r, _ in descriptor_sels(desc, "descriptor")), default=None) or _float(desc.get("rcut"))
    for name, atoms in atoms_of.items():
        check_periodicity(specs[name], atoms, f"systems.{name}.structure", rcut)
    check_ensembles(cfg, atoms_of)
    if model is not None:
        check_sel(cfg, atoms_of, model)
