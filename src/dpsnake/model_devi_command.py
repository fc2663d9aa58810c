"""``dpsnake model-devi``: model deviation of an ensemble on given frames (like ``dp model-devi``).

Systems are deepmd/npy folders (read with dpdata) or any trajectory file ASE reads (extxyz, ...).
The output is the LAMMPS plugin's ``model_devi.out`` format plus the ``devi_e`` column; with several
systems their blocks follow each other, each after a ``# <system>`` line (as ``dp model-devi`` does).
"""

from __future__ import annotations

import pathlib
import warnings

import numpy as np

from dpsnake.errors import UserError
from dpsnake.fsio import write_text_atomic


def add_arguments(parser) -> None:
    parser.add_argument("-m", "--models", nargs="+", required=True, help="model files (.dp)")
    parser.add_argument(
        "-s", "--system", nargs="+", required=True, help="deepmd/npy folders or trajectory files ASE reads"
    )
    parser.add_argument("-o", "--output", default="model_devi.out", help="output file")
    parser.add_argument("-f", "--frequency", type=int, default=1, help="steps between frames")
    parser.add_argument("--relative", type=float, default=None, help="relative force deviation with this level (eV/A)")
    parser.add_argument(
        "--relative-v",
        "--relative_v",
        dest="relative_v",
        type=float,
        default=None,
        help="relative virial deviation with this level (eV)",
    )
    parser.add_argument("--precision", choices=["double", "mixed"], default="double")
    parser.add_argument(
        "--compress",
        type=float,
        default=None,
        metavar="MIN_NBOR_DIST",
        help="tabulated embedding nets (as `dp compress`) for neighbours no closer than MIN_NBOR_DIST (A)",
    )
    parser.add_argument("--device", choices=["cpu", "gpu", "auto"], default="cpu")
    parser.add_argument("--batch-atoms", type=int, default=200_000, help="atoms per engine call (bounds memory)")


def read_frames(path: str, type_map: list[str]):
    """(coords (nf, nat, 3), cells (nf, 9) or None, atom types (nat,) in model indices, pbc (3,) bool
    per direction: a slab's frames (pbc T T F) keep their cells and are imaged in-plane only)."""
    p = pathlib.Path(path)
    if not p.exists():
        raise UserError(f"system: {path} not found")
    if p.is_dir():
        import dpdata

        try:
            s = dpdata.System(str(p), fmt="deepmd/npy")
        except Exception as err:  # dpdata raises many kinds
            raise UserError(f"system: {path} is not a deepmd/npy folder ({err})") from None
        names = list(s["atom_names"])
        coords, cells, types = s["coords"], s["cells"].reshape(-1, 9), s["atom_types"]
        pbc = np.full(3, not s.nopbc)
        symbols = [names[t] for t in types]
    else:
        from ase.io import read

        try:
            frames = read(str(p), index=":")
        except Exception as err:
            raise UserError(f"system: cannot read {path} ({err})") from None
        if not frames:
            raise UserError(f"system: {path} has no frames")
        symbols = frames[0].get_chemical_symbols()
        if any(a.get_chemical_symbols() != symbols for a in frames):
            raise UserError(f"system: {path}: frames differ in atoms (one composition per file)")
        coords = np.array([a.positions for a in frames])
        cells = np.array([a.cell.array.reshape(9) for a in frames])
        pbc = np.array(frames[0].pbc, dtype=bool)
    missing = sorted(set(symbols) - set(type_map))
    if missing:
        raise UserError(f"system: {path}: elements {missing} are not in the models' type_map {type_map}")
    types = np.array([type_map.index(s) for s in symbols], dtype=np.int64)
    return coords, (cells if pbc.any() else None), types, pbc


def run(args) -> int:
    from dpsnake.engine.deeppot import frames_to_flat
    from dpsnake.engine.dispatch import make_ensemble
    from dpsnake.engine.model_devi import COLUMNS, deviation_columns

    xp = np
    if args.device in ("gpu", "auto"):
        try:
            import cupy

            cupy.cuda.runtime.getDeviceCount()
            xp = cupy
        except Exception:
            if args.device == "gpu":
                raise UserError("device: gpu requested but CuPy/CUDA is not available") from None
    ens = make_ensemble(
        args.models,
        precision=args.precision,
        compress=None if args.compress is None else {"min_nbor_dist": args.compress},
    )
    blocks = []
    for sysp in args.system:
        coords, cells, types, pbc3 = read_frames(sysp, ens.type_map)
        nf, nat = coords.shape[0], len(types)
        if nat == 0:  # the force deviation is a max/min over atoms
            raise UserError(f"system: {sysp}: frames without atoms")
        per = max(1, args.batch_atoms // max(nat, 1))
        cols, over = [], 0
        for a in range(0, nf, per):
            b = min(nf, a + per)
            c, t, s, cl, pbc, k, _ = frames_to_flat(
                xp, xp.asarray(coords[a:b]), None if cells is None else xp.asarray(cells[a:b]), xp.asarray(types)
            )
            with warnings.catch_warnings():  # reported once per system below
                warnings.simplefilter("ignore", RuntimeWarning)
                out = ens.evaluate(c, t, s, cl, np.broadcast_to(pbc3, (k, 3)) if pbc3.any() else pbc)
            over += ens.last_overflow
            cols.append(deviation_columns(out, s, xp.full(k, nat), args.relative, args.relative_v))
            # a NaN/inf frame (atoms on top of each other, a cell of zero volume) is reported, not
            # written as a row of NaN: the models are checked finite on load, so the frame is at fault
            bad = ~np.isfinite(np.stack([cols[-1][n] for n in COLUMNS[1:] + ["devi_e"]])).all(axis=0)
            if bad.any():
                raise UserError(
                    f"system: {sysp}: frame {a + int(np.argmax(bad))}: energies or forces are not "
                    "finite (NaN/inf): atoms on top of each other?"
                )
        steps = np.arange(nf, dtype=np.int64) * args.frequency
        data = {n: np.concatenate([c[n] for c in cols]) for n in COLUMNS[1:] + ["devi_e"]}
        blocks.append((sysp, steps, data))
        print(
            f"{sysp}: {nf} frames, max_devi_f up to {data['max_devi_f'].max():.4g} eV/A"
            + (f"; {over} atom-frames had more neighbours than sel (truncated)" if over else "")
        )
    names = COLUMNS[1:] + ["devi_e"]
    header = "#" + f"{'step':>11s}" + "".join(f"{n:>19s}" for n in names)
    lines = []
    for sysp, steps, data in blocks:
        if len(blocks) > 1:
            lines.append(f"# {sysp}")
        lines.append(header)
        for k, st in enumerate(steps):
            lines.append(f"{int(st):12d}" + "".join(f" {data[n][k]:18.6e}" for n in names))
    write_text_atomic(args.output, "\n".join(lines) + "\n")
    return 0
