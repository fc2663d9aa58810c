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
    "temperature_ramp",
    "pressure_ramp",
    "fmax",
    "relax_cell",
    "bias",
)
# a schedule replaces the list of constant conditions it is set beside (the group's own key wins)
RAMPS = {"temperature_ramp": "temperatures", "pressure_ramp": "pressures"}


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
            if own:  # a stage's schedule is a default: groups whose ensemble cannot follow it do without
                ens = str(full.get("ensemble", ""))
                if "pressure_ramp" not in g and "pressure_ramp" in full and not ens.startswith("npt"):
                    del full["pressure_ramp"]
                if "temperature_ramp" not in g and "temperature_ramp" in full and ens in ("nve", "relax"):
                    del full["temperature_ramp"]
            for ramp, consts in RAMPS.items():
                _one_of(full, g if own else stage, stage, ramp, consts, group_key(stage, i, j), f"explore.stages[{i}]")
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
    if group.get("ensemble") == "relax":  # FIRE: no temperature (the walkers' temperature is 0)
        group.pop("temperatures", None)
        if group.get("temperature_ramp") is not None:
            raise UserError(f"{key}.temperature_ramp: needs a thermostat, the ensemble is relax")
    elif not group.get("temperatures") and not group.get("temperature_ramp"):
        where = ", here or in the stage" if ".groups[" in key else ""
        raise UserError(f"{key}: give temperatures (K) or temperature_ramp{where}")
    for k in ("systems", "temperatures", "pressures"):
        if len(set(group.get(k) or [])) != len(group.get(k) or []):
            raise UserError(f"{key}.{k}: {group[k]} names a value twice (walker names would repeat)")
    if group["trj_freq"] > group["nsteps"]:
        raise UserError(f"{key}.trj_freq: {group['trj_freq']} is larger than nsteps {group['nsteps']}")
    from dpsnake.md.ramps import normalize

    if group.get("temperature_ramp") is not None:
        if group["ensemble"] == "nve":
            raise UserError(f"{key}.temperature_ramp: needs a thermostat, the ensemble is nve")
        normalize(group["temperature_ramp"], group["nsteps"], f"{key}.temperature_ramp", positive=True)
    if group.get("pressure_ramp") is not None:
        if not group["ensemble"].startswith("npt"):
            raise UserError(
                f"{key}.pressure_ramp: needs a barostat (npt, npt-aniso, npt-tri), the ensemble is {group['ensemble']}"
            )
        normalize(group["pressure_ramp"], group["nsteps"], f"{key}.pressure_ramp", positive=False)
    if group.get("bias") is not None:
        from dpsnake.md import bias

        bias.normalize(group["bias"], group["nsteps"], f"{key}.bias")
        if bias.needs_npt(group["bias"]) and not group["ensemble"].startswith("npt"):
            raise UserError(f"{key}.bias.cv.type: volume needs a barostat (npt*), the ensemble is {group['ensemble']}")


def _one_of(full: dict, g: dict, stage: dict, ramp: str, consts: str, key: str, stage_key: str) -> None:
    """Keep either the schedule ``ramp`` or the constant conditions ``consts`` in the group ``full``
    (``g``: what the group sets itself; the stage itself for a flat stage): the group's own key wins
    over the stage's; both set in one place is a mistake (but for the stage's default pressures)."""
    if ramp not in full or consts not in full:
        return
    if g is not stage:
        if ramp in g and consts in g:
            raise UserError(f"{key}.{ramp}: give {consts} or {ramp}, not both")
        if ramp in g or consts in g:
            del full[consts if ramp in g else ramp]
            return
    if consts == "pressures" and stage.get("pressures") == [0.0]:  # the schema's default
        del full[consts]
        return
    raise UserError(f"{stage_key}.{ramp}: give {consts} or {ramp}, not both")


def groups_of(stage: dict) -> list[dict]:
    """The groups of a resolved stage; a stage resolved before groups existed is one group (g0)."""
    if stage.get("groups"):
        return stage["groups"]
    return [{**{k: stage[k] for k in INHERITED if k in stage}, "name": "g0"}]


def condition(walker: dict) -> tuple:
    """A walker's exploration condition (select's ``quota: condition``): (ensemble, temperature K,
    pressure bar (0 without a barostat), the schedules as text ("" without)); sortable."""
    import json

    ramps = json.dumps([walker.get("temperature_ramp"), walker.get("pressure_ramp")], sort_keys=True)
    return (
        str(walker.get("ensemble", "")),
        float(walker["temperature"]),
        float(walker.get("pressure") or 0.0),
        "" if ramps == "[null, null]" else ramps,
    )
