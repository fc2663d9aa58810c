"""DP-GEN's systems, trust levels and exploration plan as dpsnake's ``systems``, ``trust``, ``select``
and ``explore.stages``.

- ``sys_configs[i]`` (globs, joined to ``sys_configs_prefix``, relative to param.json's folder) is DP-GEN
  system ``i``: every matched file starts MD walkers. ``confs="first"`` (default): one dpsnake system
  ``sysNNN`` from the first file (sorted, as DP-GEN sorts), and each stage gets ``replicas`` = the number of
  matched files, so the walker count per (system, T, P) and the label budget per DP-GEN system stay the
  same; ``confs="all"``: one system ``sysNNN_KKK`` per file (``fp_task_max`` then counts per file).
- trust levels: a float, or a list / dict (``"i"`` keys) per DP-GEN system, force and virial.
- ``model_devi_jobs[j]`` -> stage ``j`` with ``max_iterations: 1`` (DP-GEN runs each job in one iteration).
"""

from __future__ import annotations

import glob
import pathlib
import re

from dpsnake.importers.dpgen_common import Context

# DP-GEN ensemble names (make_lammps_input) -> dpsnake ensembles
ENSEMBLES = {
    "nvt": "nvt",
    "nve": "nve",
    "npt": "npt",
    "npt-i": "npt",
    "npt-iso": "npt",
    "npt-a": "npt-aniso",
    "npt-aniso": "npt-aniso",
    "npt-t": "npt-tri",
    "npt-tri": "npt-tri",
}
NO_TRUST = 1e10  # DP-GEN's default virial trust levels: off


def expand_idx(ctx: Context, key: str, items) -> list[int]:
    """DP-GEN's ``sys_idx``: integers and "a-b[:step]" ranges (b excluded, as DP-GEN's expand_idx)."""
    out = []
    for item in items if isinstance(items, list) else [items]:
        if isinstance(item, int):
            out.append(item)
            continue
        m = re.fullmatch(r"\s*(\d+)-(\d+)(?::(\d+))?\s*", str(item))
        if not m:
            raise ctx.error(key, f"{item!r} is neither an index nor a range 'a-b[:step]'")
        out += range(int(m.group(1)), int(m.group(2)), int(m.group(3) or 1))
    return out


# ---------------------------------------------------------------- systems


def _read_structure(ctx: Context, path: pathlib.Path, fmt: str, type_map: list[str], out_dir: pathlib.Path, name: str):
    """The structure spec of one start configuration: the file itself when ASE reads it with elements of the
    type_map (POSCARs), else converted with dpdata (``sys_format``, the type_map) to a POSCAR in ``out_dir``."""
    if fmt in ("vasp/poscar", "vasp/contcar", "poscar"):
        try:
            import ase.io

            atoms = ase.io.read(path, format="vasp")
            if set(atoms.get_chemical_symbols()) <= set(type_map):
                return {"file": str(path), "format": "vasp"}, atoms
        except Exception:  # VASP 4 POSCARs without element names: dpdata with the type_map below
            pass
    import dpdata

    from dpsnake.fsio import atomic_path

    try:
        system = dpdata.System(str(path), fmt=fmt, type_map=type_map)
    except Exception as err:
        raise ctx.error(
            "sys_configs", f"{path}: dpdata cannot read it as {fmt} ({type(err).__name__}: {err})"
        ) from None
    target = out_dir / "structures" / f"{name}.vasp"
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        system.to("vasp/poscar", str(tmp), frame_idx=0)
    import ase.io

    return {"file": str(target.resolve()), "format": "vasp"}, ase.io.read(target, format="vasp")


def build_systems(ctx: Context, type_map: list[str], out_dir: pathlib.Path, confs: str) -> dict:
    """``sys_configs`` -> {"systems": {name: {"structure": ...}}, "names": [[names of DP-GEN system i]],
    "nconfs": [files of system i], "atoms": {name: ase.Atoms}}."""
    prefix = ctx.get("sys_configs_prefix")
    fmt = ctx.get("sys_format", "vasp/poscar")
    configs = ctx.require("sys_configs")
    if not isinstance(configs, list) or not configs:
        raise ctx.error("sys_configs", "expected a list of lists of file patterns")
    systems, names, nconfs, atoms_of = {}, [], [], {}
    for i, patterns in enumerate(configs):
        patterns = patterns if isinstance(patterns, list) else [patterns]
        files = []
        for pat in patterns:
            files += glob.glob(str(ctx.resolve(pat, prefix)))
        files = sorted(set(files))
        if not files:
            raise ctx.error(f"sys_configs[{i}]", f"{patterns} match no file (prefix {prefix!r}, from {ctx.base})")
        chosen = files[:1] if confs == "first" else files
        these = []
        for k, f in enumerate(chosen):
            name = f"sys{i:03d}" if confs == "first" else f"sys{i:03d}_{k:03d}"
            spec, atoms = _read_structure(ctx, pathlib.Path(f).resolve(), fmt, type_map, out_dir, name)
            systems[name] = {"structure": spec}
            atoms_of[name] = atoms
            these.append(name)
        names.append(these)
        nconfs.append(len(files))
        what = f"first of {len(files)} files, replicas {len(files)}" if confs == "first" and len(files) > 1 else ""
        ctx.source("systems", f"{', '.join(these)} <- sys_configs[{i}]" + (f" ({what})" if what else ""))
    if fmt != "vasp/poscar":
        ctx.source("systems", f"sys_format {fmt}: converted with dpdata to POSCARs in {out_dir / 'structures'}")
    return {"systems": systems, "names": names, "nconfs": nconfs, "atoms": atoms_of}


# ---------------------------------------------------------------- trust levels


def _per_system(ctx: Context, key: str, value, i: int):
    """DP-GEN's _trust_limitation_check: a float, or list[i] / dict[str(i)]."""
    if isinstance(value, list):
        if i >= len(value):
            raise ctx.error(key, f"a list of {len(value)} values, but sys_configs has system {i}")
        return value[i]
    if isinstance(value, dict):
        if str(i) not in value:
            raise ctx.error(
                key, f"no entry for system {i} (a dict needs one per sys_configs index, keys '0', '1', ...)"
            )
        return value[str(i)]
    return value


def _pair(ctx: Context, key: str, lo, hi):
    if lo is None or hi is None:
        return None
    if not lo < hi:
        raise ctx.error(key, f"lower trust level {lo} is not below the upper one {hi}")
    return [float(lo), float(hi)]


def build_trust(ctx: Context, cfg: dict, names: list[list[str]]) -> None:
    """``model_devi_f_trust_lo/hi`` and ``model_devi_v_trust_lo/hi`` -> ``trust`` (global) and per-system
    ``systems.<name>.trust`` when DP-GEN gives them per system (list or dict)."""
    keys = ("model_devi_f_trust_lo", "model_devi_f_trust_hi", "model_devi_v_trust_lo", "model_devi_v_trust_hi")
    raw = {k: ctx.get(k) for k in keys}
    if raw["model_devi_f_trust_lo"] is None or raw["model_devi_f_trust_hi"] is None:
        raise ctx.error("model_devi_f_trust_lo", "model_devi_f_trust_lo and model_devi_f_trust_hi are required")
    per_system = any(isinstance(v, (list, dict)) for v in raw.values())
    levels = []
    for i in range(len(names)):
        v = {k: _per_system(ctx, k, raw[k], i) for k in keys}
        force = _pair(ctx, "model_devi_f_trust_lo", v["model_devi_f_trust_lo"], v["model_devi_f_trust_hi"])
        vlo = NO_TRUST if v["model_devi_v_trust_lo"] is None else v["model_devi_v_trust_lo"]
        vhi = NO_TRUST if v["model_devi_v_trust_hi"] is None else v["model_devi_v_trust_hi"]
        virial = None
        if vlo < NO_TRUST and vhi >= NO_TRUST:
            virial = [float(vlo), NO_TRUST]
        elif vhi < NO_TRUST:
            if vlo >= NO_TRUST:
                ctx.note(
                    "model_devi_v_trust_hi",
                    vhi,
                    "a virial cap without model_devi_v_trust_lo: dpsnake's virial trust needs both levels",
                )
            else:
                virial = _pair(ctx, "model_devi_v_trust_lo", vlo, vhi)
        levels.append({"force": force, "virial": virial})
    cfg["trust"] = dict(levels[0]) if levels else {"force": [0.05, 0.15], "virial": None}
    ctx.source("trust", "trust.force <- model_devi_f_trust_lo/hi; trust.virial <- model_devi_v_trust_lo/hi")
    if per_system:
        for i, group in enumerate(names):
            for name in group:
                cfg["systems"][name]["trust"] = levels[i]
        ctx.source("systems", "systems.<name>.trust <- the per-system (list / dict) trust levels of DP-GEN system i")


def build_adaptive(ctx: Context, select: dict) -> None:
    """``model_devi_adapt_trust_lo`` + ``model_devi_numb_candi_f`` / ``model_devi_perc_candi_f`` (percent)."""
    on = bool(ctx.get("model_devi_adapt_trust_lo", False))
    numb_f, perc_f = ctx.get("model_devi_numb_candi_f"), ctx.get("model_devi_perc_candi_f")
    numb_v, perc_v = ctx.get("model_devi_numb_candi_v"), ctx.get("model_devi_perc_candi_v")
    if on:
        select["adaptive"] = {
            "enabled": True,
            "numb_candidates": int(10 if numb_f is None else numb_f),
            "ratio": float(perc_f or 0.0) / 100.0,
            "min_lo": 0.0,
        }
        ctx.source(
            "select",
            "select.adaptive <- model_devi_adapt_trust_lo, model_devi_numb_candi_f, model_devi_perc_candi_f / 100",
        )
        for key, val in (("model_devi_numb_candi_v", numb_v), ("model_devi_perc_candi_v", perc_v)):
            if val:
                ctx.note(key, val, "dpsnake adapts the lower force trust level only, not the virial one")
    else:
        select["adaptive"] = {"enabled": False}
        for key, val in (
            ("model_devi_numb_candi_f", numb_f),
            ("model_devi_perc_candi_f", perc_f),
            ("model_devi_numb_candi_v", numb_v),
            ("model_devi_perc_candi_v", perc_v),
        ):
            if val is not None:
                ctx.note(key, val, "unused: model_devi_adapt_trust_lo is off (in DP-GEN too)")
