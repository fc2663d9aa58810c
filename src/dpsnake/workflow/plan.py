"""The exploration plan of one iteration: which stage runs, and its walkers (``walkers.json``).

Stage logic (decided by ``select`` and recorded in ``stats.json``): iteration 0 runs stage 0; a stage
repeats until every one of its systems reaches the accurate-ratio threshold or it has used its
``max_iterations``, then the next stage runs. Run as ``python -m dpsnake.workflow.plan``.

The structure files of the stage's systems are inputs of the ``plan`` rule while the iteration is
unfinished, so an edited file replans it: the start structures are copied again, ``plan.json`` records
each one's fingerprint (file hash), and an exploration checkpoint from the old structures is removed.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from dpsnake.errors import UserError

# walker seeds of iteration it: SEEDS_PER_ITERATION * it + 1, + 2, ...: unique across iterations up to
# that many walkers per iteration (iteration 0's seeds are those of earlier versions)
SEEDS_PER_ITERATION = 1_000_000
CHECKPOINT = "checkpoint.npz"  # dpsnake.md.explorer.CHECKPOINT (not imported: it pulls in the MD stack)


def iteration_stage(cfg: dict, stats_prev: dict | None) -> tuple[int, int]:
    """(stage, iteration within the stage) of the iteration after the one that wrote ``stats_prev``;
    the decision is re-evaluated with the current config."""
    from dpsnake.workflow.candidates import decide_from_stats

    if stats_prev is None:
        return 0, 0
    dec = decide_from_stats(cfg, stats_prev)
    if dec["stop"]:
        raise UserError(
            f"iteration {stats_prev.get('iteration')} decided to stop ({dec['reason']}); there is no next iteration"
        )
    nxt = dec["next_stage"]
    same = nxt == stats_prev.get("stage")
    return int(nxt), (int(stats_prev.get("stage_iteration", 0)) + 1) if same else 0


def make_walkers(cfg: dict, it: int, stage: int, outdir: pathlib.Path) -> list[dict]:
    """Walkers of stage ``stage`` in iteration ``it``: per group of the stage (``stages.groups_of``),
    systems x temperatures x pressures x replicas, each with the group's ensemble and settings.
    Start structures are written to ``outdir/structures/<system>.extxyz`` (masses included); walker
    ``structure`` paths are relative to the folder of walkers.json (``outdir``)."""
    import ase.io

    from dpsnake.fsio import atomic_path
    from dpsnake.workflow.stages import groups_of
    from dpsnake.workflow.structures import build_structure, with_masses

    st = cfg["explore"]["stages"][stage]
    groups = groups_of(st)
    sdir = outdir / "structures"
    sdir.mkdir(parents=True, exist_ok=True)
    for system in dict.fromkeys(s for g in groups for s in g["systems"]):
        atoms = with_masses(
            build_structure(cfg["systems"][system]["structure"], ".", key=f"systems.{system}.structure"), cfg["masses"]
        )
        spath = sdir / f"{system}.extxyz"
        with atomic_path(spath, ".extxyz") as tmp:
            ase.io.write(tmp, atoms, format="extxyz")
            if spath.is_file() and spath.read_bytes() != tmp.read_bytes():
                # the explore runner's checkpoint knows walker specs, not structure contents: a checkpoint
                # of an interrupted exploration from the old structure must not be resumed
                for ck in [outdir / CHECKPOINT, *outdir.glob(f"shards/shard.*/{CHECKPOINT}")]:
                    ck.unlink(missing_ok=True)
    walkers = []
    for g in groups:
        walkers += _group_walkers(cfg, it, g, "" if len(groups) == 1 else f"{g['name']}.", len(walkers))
    _random_starts(cfg, walkers, sdir)
    return walkers


def _random_starts(cfg: dict, walkers: list[dict], sdir: pathlib.Path) -> None:
    """Walkers of a system with a ``random`` structure get their own start structure (their own seed,
    from the spec's and the walker's, recorded in the recipe): ``structures/<walker>.extxyz``."""
    import ase.io

    from dpsnake.fsio import atomic_path
    from dpsnake.workflow.generators import recipe
    from dpsnake.workflow.random_structures import walker_seed
    from dpsnake.workflow.structures import build_structure, with_masses

    for w in walkers:
        spec = cfg["systems"][w["system"]]["structure"]
        if "random" not in spec:
            continue
        own = {**spec, "random": {**spec["random"], "seed": walker_seed(spec["random"], w["seed"])}}
        atoms = with_masses(build_structure(own, ".", key=f"systems.{w['system']}.structure"), cfg["masses"])
        with atomic_path(sdir / f"{w['name']}.extxyz", ".extxyz") as tmp:
            ase.io.write(tmp, atoms, format="extxyz")
        w["structure"], w["recipe"] = f"structures/{w['name']}.extxyz", recipe(own)


def _group_walkers(cfg: dict, it: int, g: dict, label: str, first: int) -> list[dict]:
    """The walkers of one group; ``label`` goes into their names (empty for a stage of one group, so the
    flat stage form keeps its names), ``first`` = walkers before them in walkers.json (seeds)."""
    from dpsnake.workflow.generators import recipe

    walkers = []
    relax = g["ensemble"] == "relax"
    npt = g["ensemble"].startswith("npt") or relax and g.get("relax_cell")  # relax_cell: at each pressure
    temperatures = [("0", 0.0, None)] if relax else _conditions(g, "temperatures", "temperature_ramp")
    pressures = _conditions(g, "pressures", "pressure_ramp") if npt else [(None, None, None)]
    for system in g["systems"]:
        for T, t_val, t_ramp in temperatures:
            for P, p_val, p_ramp in pressures:
                for r in range(g["replicas"]):
                    name = f"{system}.{label}" + ("relax" if relax else f"T{T}") + ("" if P is None else f".P{P}")
                    name += f".r{r}"
                    w = {
                        "name": name,
                        "system": system,
                        "structure": f"structures/{system}.extxyz",
                        "recipe": recipe(cfg["systems"][system]["structure"]),
                        "temperature": t_val,
                        "ensemble": g["ensemble"],
                        "nsteps": g["nsteps"],
                        "dt": g["dt"],
                        "trj_freq": g["trj_freq"],
                        "seed": SEEDS_PER_ITERATION * it + first + len(walkers) + 1,
                        "tau_t": g["tau_t"],
                        "min_dist": cfg["select"]["min_dist"] * 0.5,
                    }
                    if t_ramp:
                        w["temperature_ramp"] = t_ramp
                    if relax:  # FIRE: temperature 0, no thermostat or time step
                        del w["dt"], w["tau_t"]
                        w.update(fmax=g.get("fmax", 0.05), relax_cell=bool(g.get("relax_cell", False)))
                    if P is not None:
                        w["pressure"] = p_val
                        if not relax:
                            w["tau_p"] = g["tau_p"]
                        if p_ramp:
                            w["pressure_ramp"] = p_ramp
                    if g.get("bias") is not None:  # every walker of the group: its own bias (history)
                        w["bias"] = g["bias"]
                    if cfg["explore"].get("max_devi_f_cap") is not None:
                        w["max_devi_f_cap"] = cfg["explore"]["max_devi_f_cap"]
                    walkers.append(w)
    return walkers


def _conditions(g: dict, consts: str, ramp: str) -> list[tuple]:
    """(name part, value at step 0, schedule or None) of a group's temperatures or pressures: its
    schedule (normalized over the group's nsteps; named by its knot values, e.g. 300-2500-300) when it
    has one, else each constant (named by its value)."""
    from dpsnake.md import ramps

    if g.get(ramp) is not None:
        r = ramps.normalize(g[ramp], g["nsteps"], ramp, positive=ramp == "temperature_ramp")
        return [(ramps.label(r), r["knots"][0][1], r)]
    return [(f"{v:g}", float(v), None) for v in g[consts]]


def stage_systems(cfg: dict, stage: int) -> list[str]:
    """The systems stage ``stage`` of the exploration plan explores."""
    from dpsnake.workflow.stages import groups_of

    stages = cfg["explore"]["stages"]
    return list(dict.fromkeys(s for g in groups_of(stages[min(stage, len(stages) - 1)]) for s in g["systems"]))


def structure_sources(cfg: dict, stage: int) -> dict:
    """{system: fingerprint} of the start structures of a stage (recorded in plan.json)."""
    from dpsnake.workflow.structures import fingerprint

    return {s: fingerprint(cfg["systems"][s]["structure"], ".") for s in stage_systems(cfg, stage)}


def structure_recipes(cfg: dict, stage: int) -> dict:
    """{system: one-line recipe of its start structure} of a stage (recorded in plan.json)."""
    from dpsnake.workflow.generators import recipe

    return {s: recipe(cfg["systems"][s]["structure"]) for s in stage_systems(cfg, stage)}


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="results/config.json")
    p.add_argument("--iter", type=int, required=True)
    p.add_argument("--prev-stats", default=None, help="stats.json of the previous iteration")
    p.add_argument("--out", required=True, help="walkers.json to write (plan.json goes next to it)")


def run(args) -> int:
    from dpsnake.fsio import write_json_atomic
    from dpsnake.workflow.config import read_resolved
    from dpsnake.workflow.shards import write_shard_plan

    cfg = read_resolved(args.config)
    prev = json.loads(pathlib.Path(args.prev_stats).read_text()) if args.prev_stats else None
    stage, stage_it = iteration_stage(cfg, prev)
    out = pathlib.Path(args.out)
    walkers = make_walkers(cfg, args.iter, stage, out.parent)
    write_json_atomic(
        out.parent / "plan.json",
        {
            "iteration": args.iter,
            "stage": stage,
            "stage_iteration": stage_it,
            "walkers": len(walkers),
            "structures": structure_sources(cfg, stage),
            "recipes": structure_recipes(cfg, stage),
        },
    )
    shards = write_shard_plan(cfg, walkers, out.parent)
    write_json_atomic(out, walkers)
    print(f"iteration {args.iter}: stage {stage} (iteration {stage_it} of the stage), {len(walkers)} walkers")
    if len(shards["shards"]) > 1:
        print(f"{len(shards['shards'])} exploration shards, balance (largest / mean cost) {shards['balance']:.3f}")
    return 0


def main(argv=None) -> int:
    """``python -m dpsnake.workflow.plan ...`` (the same as a ``dpsnake plan`` subcommand would be)."""
    p = argparse.ArgumentParser(prog="python -m dpsnake.workflow.plan", description=__doc__.splitlines()[0])
    add_arguments(p)
    try:
        return run(p.parse_args(argv))
    except UserError as err:
        print(f"plan: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
