"""The stages of the exploration plan, resolved into groups of walkers (``explore.stages[i].groups``).

A stage may hold ``groups``: each group has its own systems, conditions (temperatures, pressures) and
ensemble, so one iteration can run e.g. NVT at high temperature and NPT at high pressure together.
A stage's own keys are the defaults of its groups; the flat stage form (no ``groups``) is one group.
``resolve_stages`` completes the groups of each stage in the resolved config (idempotent; a flat stage
stays flat), and ``stage.systems`` becomes the union of its groups' systems; ``groups_of`` gives any
stage's groups.
"""

from __future__ import annotations

from dpsnake.errors import UserError

# keys a group takes from its stage when it does not set them
INHERITED = (
    "systems",
    "temperatures",
    "pressures",
    "ensemble",
    "nsteps",
    "dt",
    "trj_freq",
    "replicas",
    "tau_t",
    "tau_p",
)


def resolve_stages(cfg: dict) -> None:
    """Complete the ``groups`` of every stage of ``cfg['explore']`` that has them (stage keys fill what
    a group leaves out) and set the stage's ``systems`` (a flat stage: default all systems; with groups:
    the union of theirs), in place; a flat stage stays flat. A mistake is one UserError line naming
    the key."""
    for i, stage in enumerate(cfg["explore"]["stages"]):
        own = stage.get("groups")
        if not own:
            stage.setdefault("systems", list(cfg["systems"]))
        groups, names = [], set()
        for j, g in enumerate(own or [{}]):
            full = {k: g[k] if k in g else stage[k] for k in INHERITED if k in g or k in stage}
            full["name"] = str(g.get("name") or f"g{j}")
            if full["name"] in names:
                raise UserError(f"{group_key(stage, i, j)}.name: {full['name']!r} names an earlier group of the stage")
            names.add(full["name"])
            _check_group(cfg, full, group_key(stage, i, j))
            groups.append(full)
        if own:
            stage["groups"] = groups
            stage["systems"] = list(dict.fromkeys(s for g in groups for s in g["systems"]))


def group_key(stage: dict, i: int, j: int) -> str:
    """The config key of group ``j`` of stage ``i`` (the stage itself when it is flat)."""
    return f"explore.stages[{i}].groups[{j}]" if stage.get("groups") else f"explore.stages[{i}]"


def _check_group(cfg: dict, group: dict, key: str) -> None:
    for s in group.get("systems") or []:
        if s not in cfg["systems"]:
            raise UserError(f"{key}.systems: unknown system {s!r} (defined: {', '.join(cfg['systems'])})")
    group.setdefault("systems", list(cfg["systems"]))
    if not group.get("temperatures"):
        raise UserError(f"{key}: give temperatures (K), here or in the stage")
    for k in ("systems", "temperatures", "pressures"):
        if len(set(group.get(k) or [])) != len(group.get(k) or []):
            raise UserError(f"{key}.{k}: {group[k]} names a value twice (walker names would repeat)")
    if group["trj_freq"] > group["nsteps"]:
        raise UserError(f"{key}.trj_freq: {group['trj_freq']} is larger than nsteps {group['nsteps']}")


def groups_of(stage: dict) -> list[dict]:
    """The groups of a resolved stage; a stage resolved before groups existed is one group (g0)."""
    if stage.get("groups"):
        return stage["groups"]
    return [{**{k: stage[k] for k in INHERITED if k in stage}, "name": "g0"}]


def condition(walker: dict) -> tuple:
    """A walker's exploration condition (select's ``quota: condition``): (ensemble, temperature K,
    pressure bar, 0 without a barostat); sortable."""
    return (str(walker.get("ensemble", "")), float(walker["temperature"]), float(walker.get("pressure") or 0.0))
