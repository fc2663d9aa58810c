"""``dpsnake init-data``: the initial labelled dataset of one system, as deepmd/npy.

Either the system's ``init_data`` (an existing deepmd/npy folder or deepmd/hdf5 file) converted to the
global type_map, or frames generated from the start structure (cell scaled by each of
``init_data.scales``, then ``perturbations`` random cell strains and atom displacements each, with
dpdata's ``perturb``) and labelled by the configured labeler. Failed labels are logged and left out.
``source.json`` in the output folder records what the data was made from (the structure's fingerprint:
file and content hash), so the report can say when a structure file changed after the data was labelled.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

from dpsnake.errors import UserError

SOURCE = "source.json"


def source_record(cfg: dict, system: str) -> dict:
    """What the initial data of ``system`` is made from: {"system", "init_data": path or None,
    "init_data_sha256": hash of that dataset's files, "structure": fingerprint of the start structure
    (None when an existing dataset is used)}."""
    from dpsnake.workflow.structures import fingerprint, path_sha256, path_stat

    existing = cfg["systems"][system].get("init_data")
    return {
        "system": system,
        "init_data": existing,
        "init_data_sha256": path_sha256(existing) if existing else None,
        "init_data_stat": path_stat(existing) if existing else None,
        "structure": None if existing else fingerprint(cfg["systems"][system]["structure"], "."),
    }


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="results/config.json")
    parser.add_argument("--system", required=True, help="system name (config key under systems)")
    parser.add_argument("--out", required=True, help="output deepmd/npy folder, e.g. results/data/init/Cu")


def _load_existing(path: str, type_map: list[str]) -> list:
    """An existing dataset as dpdata.LabeledSystems with the global type_map: a deepmd/npy folder, or a
    deepmd/hdf5 file holding one system (type.raw at its root) or several (one group each)."""
    import dpdata
    import h5py

    p = pathlib.Path(path)
    try:
        if p.is_dir():
            systems = [dpdata.LabeledSystem(str(p), fmt="deepmd/npy")]
        else:
            with h5py.File(p, "r") as h:
                single = "type.raw" in h
            systems = (
                [dpdata.LabeledSystem(str(p), fmt="deepmd/hdf5")]
                if single
                else list(dpdata.MultiSystems.from_file(str(p), fmt="deepmd/hdf5").systems.values())
            )
    except Exception as err:
        raise UserError(f"init_data: {path}: dpdata cannot read it ({type(err).__name__}: {err})") from None
    for s in systems:
        bad = sorted(set(n for n, c in zip(s["atom_names"], s["atom_numbs"]) if c) - set(type_map))
        if bad:
            raise UserError(f"init_data: {path}: elements {bad} not in the global type_map {type_map}")
        s.apply_type_map(type_map)
    return [s for s in systems if len(s)]


def generate_frames(cfg: dict, system: str) -> list:
    """Scaled and perturbed copies of the system's start structure (list of ase.Atoms, unlabelled)."""
    import dpdata

    from dpsnake.workflow.structures import build_structure, with_masses

    gen = cfg["init_data"]
    atoms = build_structure(cfg["systems"][system]["structure"], ".", key=f"systems.{system}.structure")
    # dpdata's perturb draws from NumPy's global generator: seed it per system for reproducible data
    np.random.seed((gen["seed"] * 1000003 + sum(map(ord, system))) % (2**32))
    frames = []
    for scale in gen["scales"]:
        a = atoms.copy()
        a.set_cell(a.cell.array * scale, scale_atoms=True)
        s = dpdata.System(a, fmt="ase/structure")
        p = s.perturb(gen["perturbations"], gen["cell_perturbation"], gen["atom_displacement"], "normal")
        for f in p.to("ase/structure"):
            f.pbc = atoms.pbc
            frames.append(with_masses(f, cfg["masses"]))
    return frames


def run(args) -> int:
    from dpsnake.fsio import replace_dir, temp_dir_for, write_json_atomic
    from dpsnake.labelers import make_labeler, sanity_check
    from dpsnake.workflow import dataset
    from dpsnake.workflow.config import read_resolved

    cfg = read_resolved(args.config)
    if args.system not in cfg["systems"]:
        raise UserError(f"--system: unknown system {args.system!r}")
    out = pathlib.Path(args.out)
    tmap = cfg["type_map"]
    tmp = temp_dir_for(out)
    existing = cfg["systems"][args.system].get("init_data")
    if existing:
        systems = _load_existing(existing, tmap)
        if not systems:
            raise UserError(f"systems.{args.system}.init_data: {existing}: holds no frames")
        for k, s in enumerate(systems):
            # several compositions (an HDF5 file of several systems): one deepmd/npy folder each
            folder = tmp / "data" / (f"{k:03d}" if len(systems) > 1 else "")
            s.to_deepmd_npy(str(folder), set_size=max(len(s), 1))
            rows = [
                {
                    "iteration": -1,
                    "system": args.system,
                    "walker": "init",
                    "step": i,
                    "max_devi_f": "",
                    "task": f"{pathlib.Path(existing).name}:{k}:{i}",
                }
                for i in range(len(s))
            ]
            (folder / "provenance.csv").write_text(dataset.provenance_text(rows))
        print(f"init-data {args.system}: {sum(map(len, systems))} frames from {existing}")
    else:
        labeler = make_labeler(cfg["label"])
        frames = generate_frames(cfg, args.system)
        ok, rows, failed = [], [], 0
        for i, atoms in enumerate(frames):
            res = sanity_check(labeler.label(atoms, tmp), len(atoms), cfg["label"].get("max_force"))
            if not res.ok:
                failed += 1
                print(f"init-data {args.system}: frame {i} failed to label: {res.reason}", file=sys.stderr)
                continue
            from ase.calculators.singlepoint import SinglePointCalculator

            a = atoms.copy()
            kw = {"energy": res.energy, "forces": res.forces}
            if res.virial is not None:
                kw["stress"] = -np.asarray(res.virial) / a.get_volume()
            a.calc = SinglePointCalculator(a, **kw)
            ok.append(a)
            rows.append(
                {
                    "iteration": -1,
                    "system": args.system,
                    "walker": "init",
                    "step": i,
                    "max_devi_f": "",
                    "task": f"init.{i:06d}",
                }
            )
        if not ok:
            raise UserError(f"init-data {args.system}: all {len(frames)} generated frames failed to label")
        dataset.write_system(tmp / "data", ok, rows, tmap)
        print(f"init-data {args.system}: {len(ok)} frames labelled by {labeler.name}, {failed} failed")
    write_json_atomic(tmp / "data" / SOURCE, source_record(cfg, args.system))
    # the labeler may leave scratch files in tmp: only the dataset itself is moved into place
    replace_dir(tmp / "data", out)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0
