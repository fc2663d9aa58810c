"""DP-GEN's labelled data as dpsnake init data: ``init_data_sys`` and, with ``--data WORKDIR``, the labels
of an existing run (``iter.*/02.fp/data.*``), so that a campaign continues instead of restarting.

Every dataset is read with dpdata (deepmd/npy folders, found recursively as DP-GEN does, or deepmd/hdf5
files) with the config's type_map (DP-GEN's type.raw indexes its type_map; folders without type_map.raw get
its names), and COPIED: one deepmd/hdf5 file per dpsnake system, ``<out>/data/<system>.h5``, referenced
as ``systems.<system>.init_data``. Copies, not references: the type map is made consistent once, and the
DP-GEN work folder may be moved or cleaned afterwards.

dpsnake keeps initial data per system and generates (and labels) it for a system without any, so every
dataset is given to one system: ``02.fp/data.NNN`` to DP-GEN system NNN; an init dataset to the system of
the same composition (element counts), else of the same elements, else the one with the fewest frames.
A system left without data then gets one of the datasets of a system that has several, or half the frames
of a system's only dataset; only when nothing can be split does it generate its own (a table row says so).
No frame is given twice.
"""

from __future__ import annotations

import glob
import pathlib
import re

from dpsnake.errors import UserError
from dpsnake.importers.dpgen_common import Context


def find_systems(root: pathlib.Path) -> list[pathlib.Path]:
    """deepmd/npy system folders (holding type.raw) at or under ``root``; an HDF5 file is returned as is."""
    if root.is_file():
        return [root]
    if (root / "type.raw").is_file():
        return [root]
    return sorted(p.parent for p in root.rglob("type.raw"))


def load(path: pathlib.Path, type_map: list[str], key: str) -> list:
    """dpdata.LabeledSystems of one folder or HDF5 file, in the global type_map (empty ones left out)."""
    import dpdata

    try:
        if path.is_file():
            found = list(
                dpdata.MultiSystems.from_file(str(path), fmt="deepmd/hdf5", type_map=type_map).systems.values()
            )
        else:
            # type_map.raw, when there, names the types; else DP-GEN's type_map does (type.raw indexes it)
            own = (path / "type_map.raw").is_file()
            found = [dpdata.LabeledSystem(str(path), fmt="deepmd/npy", type_map=None if own else type_map)]
    except Exception as err:
        raise UserError(f"{key}: {path}: dpdata cannot read it ({type(err).__name__}: {err})") from None
    out = []
    for s in found:
        names = [n for n, c in zip(s["atom_names"], s["atom_numbs"]) if c]
        bad = sorted(set(names) - set(type_map))
        if bad:
            raise UserError(f"{key}: {path}: elements {bad} not in type_map {type_map}")
        s.apply_type_map(type_map)
        if len(s):
            out.append(s)
    return out


def _formula(counts) -> tuple:
    return tuple(int(c) for c in counts)


def init_datasets(ctx: Context, type_map: list[str]) -> list[dict]:
    """``init_data_prefix`` + ``init_data_sys`` -> [{"label", "system": dpdata, "prefer": None}]."""
    prefix = ctx.get("init_data_prefix")
    entries = ctx.get("init_data_sys") or []
    out = []
    for i, entry in enumerate(entries):
        root = ctx.resolve(entry, prefix)
        if not root.exists():
            raise ctx.error(f"init_data_sys[{i}]", f"{root}: no such file or folder")
        found = find_systems(root)
        if not found:
            raise ctx.error(f"init_data_sys[{i}]", f"{root}: no deepmd/npy system (type.raw) in it")
        for path in found:
            for s in load(path, type_map, f"{ctx.path}: init_data_sys[{i}]"):
                out.append({"label": str(path), "system": s, "prefer": None})
    return out


def finished_iterations(workdir: pathlib.Path) -> int:
    """Iterations a DP-GEN run finished: from record.dpgen (step 8 = post_fp done), else the iterations
    with 02.fp/data.*."""
    record = workdir / "record.dpgen"
    if record.is_file():
        done = [int(a) for a, b in (ln.split()[:2] for ln in record.read_text().splitlines() if ln.split()) if b == "8"]
        return max(done) + 1 if done else 0
    its = [int(m.group(1)) for p in workdir.glob("iter.*/02.fp/data.*") if (m := re.search(r"iter\.(\d+)", str(p)))]
    return max(its) + 1 if its else 0


def run_datasets(workdir: pathlib.Path, type_map: list[str], names: list[list[str]]) -> tuple[list[dict], int]:
    """The labels of an existing DP-GEN run: ([{"label", "system", "prefer"}], finished iterations)."""
    if not workdir.is_dir():
        raise UserError(f"--data: {workdir}: no such folder (a DP-GEN work folder with iter.*/02.fp)")
    folders = sorted(glob.glob(str(workdir / "iter.*" / "02.fp" / "data.*")))
    if not folders:
        raise UserError(f"--data: {workdir}: no iter.*/02.fp/data.* folders")
    out = []
    for folder in folders:
        m = re.fullmatch(r"data\.(\d+)", pathlib.Path(folder).name)
        idx = int(m.group(1)) if m else None
        prefer = names[idx][0] if idx is not None and idx < len(names) else None
        for path in find_systems(pathlib.Path(folder)):
            for s in load(path, type_map, "--data"):
                out.append({"label": str(path), "system": s, "prefer": prefer})
    return out, finished_iterations(workdir)


def assign(datasets: list[dict], atoms_of: dict, type_map: list[str]) -> dict[str, list]:
    """{system: [dpdata systems]}: every dataset to one system, no system left empty when data can be split."""
    order = list(atoms_of)
    counts = {n: _formula([a.get_chemical_symbols().count(el) for el in type_map]) for n, a in atoms_of.items()}
    given = {n: [] for n in order}

    def frames(n):
        return sum(len(s) for s in given[n])

    for d in datasets:
        s = d["system"]
        target = d["prefer"]
        if target is None:
            f = _formula(s["atom_numbs"])
            same = [n for n in order if counts[n] == f]
            elems = [n for n in order if {i for i, c in enumerate(counts[n]) if c} == {i for i, c in enumerate(f) if c}]
            target = min(same or elems or order, key=frames)
        given[target].append(s)
    for n in order:  # fill empty systems from others, without duplicating a frame
        if given[n]:
            continue
        donors = sorted((m for m in order if len(given[m]) > 1), key=frames, reverse=True)
        if donors:
            given[n].append(given[donors[0]].pop())
            continue
        donors = sorted((m for m in order if given[m] and len(given[m][0]) > 1), key=frames, reverse=True)
        if donors:
            s = given[donors[0]][0]
            half = len(s) // 2
            given[donors[0]][0] = s.sub_system(list(range(half, len(s))))
            given[n].append(s.sub_system(list(range(half))))
    return given


def write(given: dict[str, list], out_dir: pathlib.Path) -> dict[str, str]:
    """One deepmd/hdf5 file per system with data: {system: absolute path}."""
    import dpdata

    from dpsnake.fsio import atomic_path

    paths = {}
    folder = out_dir / "data"
    folder.mkdir(parents=True, exist_ok=True)
    for name, systems in given.items():
        if not systems:
            continue
        target = folder / f"{name}.h5"
        with atomic_path(target, suffix=".h5") as tmp:
            dpdata.MultiSystems(*systems).to_deepmd_hdf5(str(tmp))
        paths[name] = str(target.resolve())
    return paths


def build_data(ctx: Context, cfg: dict, atoms_of: dict, names, out_dir: pathlib.Path, workdir) -> int:
    """Attach all DP-GEN labelled data to the config's systems; returns the finished iterations of ``workdir``
    (0 without it)."""
    tmap = cfg["type_map"]
    datasets = init_datasets(ctx, tmap)
    done = 0
    if workdir is not None:
        more, done = run_datasets(pathlib.Path(workdir), tmap, names)
        datasets += more
        ctx.source("systems", f"systems.<name>.init_data <- --data {workdir}: {len(more)} labelled sets (02.fp)")
    given = assign(datasets, atoms_of, tmap)
    for name, path in write(given, out_dir).items():
        cfg["systems"][name]["init_data"] = path
    nframes = sum(len(d["system"]) for d in datasets)
    ctx.source("systems", f"systems.<name>.init_data <- init_data_prefix + init_data_sys ({nframes} frames in all)")
    empty = [n for n, s in given.items() if not s]
    if empty:
        ctx.note(
            "init_data_sys",
            f"{len(datasets)} sets",
            f"not enough data for every system: {', '.join(empty)} get generated init data (init_data section)",
        )
    return done
