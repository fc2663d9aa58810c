"""``dpsnake import-dpgen param.json [machine.json] -o config.yaml [--profile-dir DIR] [--data WORKDIR]``:
a DP-GEN campaign as a dpsnake config (docs/dpgen-import.md has the key mapping).

The config is checked as ``dpsnake check-config`` checks it before it is written (atomically); every key
that is not carried over is in one table (key, value, why), printed at the end and written as a comment
block at the end of the config. Files the config needs are written next to it, in ``<config stem>.dpgen/``:
``data/<system>.h5`` (the DP-GEN labelled data, copied) and ``structures/`` (start structures in formats ASE
does not read). Paths in the config are absolute: run Snakemake from anywhere.
"""

from __future__ import annotations

import json
import pathlib

from dpsnake.errors import UserError
from dpsnake.importers.dpgen_common import Context

ORDER = ("type_map", "masses", "systems", "train", "explore", "trust", "select", "label", "convergence")
SECTION_KEYS = {
    "type_map": "type_map",
    "masses": "mass_map",
    "select": "fp_task_max",
    "convergence": "fp_accurate_threshold, model_devi_jobs",
}
NOTES = {
    "fp_task_min": "a system with fewer candidates still gets them labelled (no minimum in dpsnake)",
    "fp_accurate_soft_threshold": "no linear decay of the label budget: select.max_candidates is fixed",
    "fp_cluster_vacuum": "cluster extraction for labels: not in dpsnake",
    "detailed_report_make_fp": "dpsnake always writes stats.json and the reports",
    "model_devi_skip": "every recorded frame is a candidate (no skip of the first frames)",
    "model_devi_clean_traj": "housekeeping of DP-GEN's work folder: dpsnake keeps results/iter.N/explore",
    "model_devi_merge_traj": "housekeeping of DP-GEN's work folder: dpsnake writes one traj.extxyz per walker",
    "model_devi_nopbc": "periodicity comes from each start structure (per direction: bulk, slab, wire or cluster)",
    "model_devi_f_avg_relative": "relative force deviation: dpsnake uses the absolute max force deviation",
    "use_relative": "relative force deviation: dpsnake uses the absolute max force deviation",
    "epsilon": "relative force deviation: dpsnake uses the absolute max force deviation",
    "use_relative_v": "relative virial deviation: dpsnake uses the absolute max virial deviation",
    "epsilon_v": "relative virial deviation: dpsnake uses the absolute max virial deviation",
    "model_devi_plumed": "PLUMED enhanced sampling: not in dpsnake's MD",
    "model_devi_plumed_path": "PLUMED enhanced sampling: not in dpsnake's MD",
    "shuffle_poscar": "no shuffling of atoms in the start structures",
    "lmp_d3": "D3 dispersion in LAMMPS: not in dpsnake's MD",
    "lmp_neigh_modify_one": "LAMMPS neighbour list setting: not needed by dpsnake's MD",
    "model_devi_neidelay": "LAMMPS neighbour list setting: not needed by dpsnake's MD",
    "sys_charges": "charges of systems (Gaussian): not in dpsnake",
    "use_ele_temp": "electron temperature as a frame/atom parameter: not in dpsnake",
    "cluster_cutoff": "cluster extraction for labels: not in dpsnake",
}


def add_arguments(parser) -> None:
    parser.add_argument("param", help="DP-GEN's param.json (dpgen run)")
    parser.add_argument("machine", nargs="?", default=None, help="DP-GEN's machine.json (dpdispatcher format)")
    parser.add_argument("-o", "--out", required=True, help="the dpsnake config to write, e.g. config/mine.yaml")
    parser.add_argument("--profile-dir", default=None, help="write a Snakemake profile made from machine.json here")
    parser.add_argument("--data", default=None, help="a DP-GEN work folder: its iter.*/02.fp/data.* become init data")
    parser.add_argument(
        "--confs",
        choices=("first", "all"),
        default="first",
        help="files matched by a sys_configs entry: first (one system, replicas = files; default) or all (a system each)",
    )
    parser.add_argument(
        "--labeler", default=None, help="the label section as YAML/JSON text or a file, instead of fp_style's"
    )


def _read_json(path: pathlib.Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file ({what})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object ({what})")
    return data


def _labeler(text: str | None) -> dict | None:
    if text is None:
        return None
    import yaml

    p = pathlib.Path(text)
    raw = p.read_text() if len(text) < 4096 and p.is_file() else text
    try:
        spec = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise UserError(f"--labeler: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(spec, dict) or "type" not in spec:
        raise UserError("--labeler: expected a mapping with a 'type', e.g. '{type: ase, calculator: EMT}'")
    return spec


def convert(
    param_path, out, machine=None, profile_dir=None, data=None, confs="first", labeler=None
) -> tuple[dict, Context, list[str]]:
    """param.json (+ machine.json, + a DP-GEN work folder) -> (checked config, context, lines to print)."""
    from dpsnake.importers import dpgen_data, dpgen_label, dpgen_plan, dpgen_systems, dpgen_train
    from dpsnake.importers import machine as mach

    param_path = pathlib.Path(param_path)
    ctx = Context(_read_json(param_path, "DP-GEN param.json"), param_path)
    out = pathlib.Path(out)
    assets = out.resolve().parent / f"{out.stem}.dpgen"
    printed: list[str] = []
    extras: dict = {}
    if machine is not None:
        extras, rows, printed = mach.write_profile(pathlib.Path(machine), profile_dir)
        ctx.notes += rows
    cfg: dict = {"type_map": [str(t) for t in ctx.require("type_map")]}
    cfg["masses"] = _masses(ctx, cfg["type_map"])
    found = dpgen_systems.build_systems(ctx, cfg["type_map"], assets, confs)
    cfg["systems"] = found["systems"]
    cfg["train"] = dpgen_train.build_train(ctx)
    done = dpgen_data.build_data(ctx, cfg, found["atoms"], found["names"], assets, data)
    stages = dpgen_plan.build_stages(ctx, found["names"], found["nconfs"], confs, skip=done)
    cfg["explore"] = {"stages": stages}
    if ctx.get("dp_compress", False):
        cfg["explore"]["compress"] = "auto"
        ctx.source("explore", "explore.compress: auto <- dp_compress")
    dpgen_systems.build_trust(ctx, cfg, found["names"])
    cfg["select"] = {"max_candidates": int(ctx.require("fp_task_max")), "pick": "random"}
    dpgen_systems.build_adaptive(ctx, cfg["select"])
    cfg["label"] = dpgen_label.build_label(ctx, cfg["type_map"], _labeler(labeler), extras.get("fp_command"))
    if extras.get("label_env") and cfg["label"].get("type") in ("qe", "cp2k", "vasp", "abacus"):
        cfg["label"]["env"] = extras["label_env"]
        ctx.source("label", "label.env <- machine.json fp resources.envs")
    cfg["convergence"] = {"max_iterations": len(stages)}
    threshold = ctx.get("fp_accurate_threshold")
    if threshold is not None:
        cfg["convergence"]["accurate_ratio"] = float(threshold)
    for key, why in NOTES.items():
        if ctx.has(key) and ctx.param[key] not in (None, False, 0, [], {}):
            ctx.note(key, ctx.get(key), why)
        ctx.used.add(key)
    ctx.used.update({"sys_format", "model_devi_dt", "type_map", "mass_map"})
    ctx.leftovers()
    _check(ctx, cfg)
    return cfg, ctx, printed


def _masses(ctx: Context, type_map: list[str]) -> dict:
    masses = ctx.get("mass_map", "auto")
    if masses in (None, "auto"):
        return {}
    if not isinstance(masses, list) or len(masses) != len(type_map):
        raise ctx.error("mass_map", f"expected {len(type_map)} masses (one per type_map element), got {masses!r}")
    return {el: float(m) for el, m in zip(type_map, masses)}


def _check(ctx: Context, cfg: dict) -> None:
    """The checks of ``dpsnake check-config``: DeePMD-kit's first (unknown keys of the training input go into
    the table), then the whole config."""
    from dpsnake.importers.dpgen_train import drop_unknown_keys
    from dpsnake.workflow import config as C

    try:
        C.validate_schema(cfg)
    except UserError as err:
        raise UserError(f"{ctx.path}: the converted config is not valid: {err}") from None
    drop_unknown_keys(ctx, cfg)
    try:
        C.check(cfg, ".")
    except UserError as err:
        raise UserError(f"{ctx.path}: the converted config does not pass check-config: {err}") from None


def to_yaml(cfg: dict, ctx: Context) -> str:
    """The config as commented YAML: each section says which DP-GEN keys it came from; the table at the end."""
    import yaml

    lines = [
        f"# dpsnake config made by `dpsnake import-dpgen` from {ctx.path.resolve()} (docs/dpgen-import.md).",
        "# Every key is described in docs/workflow.md. Check it with: dpsnake check-config <this file>",
        "",
    ]
    for key in ORDER:
        if key not in cfg:
            continue
        src = list(ctx.sources.get(key, []))
        if key in SECTION_KEYS:
            src.insert(0, f"{key} <- {SECTION_KEYS[key]}")
        lines += [f"# {s}" for s in src]
        lines.append(yaml.safe_dump({key: cfg[key]}, sort_keys=False, default_flow_style=None, width=110).rstrip())
        lines.append("")
    table = ctx.table()
    lines.append("# ---- DP-GEN keys not carried over (key, value, why) ----")
    lines += [f"# {ln}" for ln in (table.splitlines() if table else ["(none)"])]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    from dpsnake.fsio import write_text_atomic

    cfg, ctx, printed = convert(
        args.param, args.out, args.machine, args.profile_dir, args.data, args.confs, args.labeler
    )
    write_text_atomic(args.out, to_yaml(cfg, ctx))
    n = len(cfg["systems"])
    print(
        f"dpsnake import-dpgen: wrote {args.out} ({n} system{'s' * (n != 1)}, "
        f"{len(cfg['explore']['stages'])} stage(s), labeler {cfg['label']['type']}); it passes check-config"
    )
    for line in printed:
        print(line)
    table = ctx.table()
    print("\nDP-GEN keys not carried over:" if table else "\nEvery DP-GEN key was carried over.")
    if table:
        print(table)
    return 0
