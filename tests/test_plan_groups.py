"""Several groups of walkers per stage (issue 20 item 6): each group has its own systems, conditions and
ensemble; all go into the iteration's one walkers.json; select's condition quota tells them apart."""

from __future__ import annotations

import json

import numpy as np
import pytest
from select_helpers import cu_config

from dpsnake.errors import UserError
from dpsnake.md.walkers import parse_walkers
from dpsnake.workflow.plan import make_walkers, stage_systems

NI = {"Ni": {"structure": {"builder": "bulk", "kwargs": {"name": "Ni", "cubic": True}, "repeat": [2, 2, 2]}}}


def _systems():
    cfg = cu_config(".")
    return {**cfg["systems"], **NI}


def _stage(**kw):
    return {"explore": {"stages": [{"nsteps": 40, "trj_freq": 5, **kw}]}, "type_map": ["Cu", "Ni"]}


def test_groups_make_one_walker_list_with_own_ensembles(tmp_path):
    groups = [
        {"name": "hot", "systems": ["Cu"], "temperatures": [900.0], "replicas": 2, "ensemble": "nvt-langevin"},
        {"temperatures": [300.0], "pressures": [0.0, 1e4], "ensemble": "npt", "tau_p": 0.3},
        {"systems": ["Ni"], "temperatures": [300.0], "nsteps": 20},
    ]
    cfg = cu_config(tmp_path, systems=_systems(), **_stage(groups=groups, ensemble="nvt"))
    st = cfg["explore"]["stages"][0]
    # stage keys fill what a group leaves out; the stage explores the union of its groups' systems
    assert [g["name"] for g in st["groups"]] == ["hot", "g1", "g2"]
    assert st["groups"][2]["ensemble"] == "nvt" and st["groups"][2]["nsteps"] == 20
    assert st["groups"][1]["systems"] == ["Cu", "Ni"] and st["groups"][0]["nsteps"] == 40
    assert stage_systems(cfg, 0) == ["Cu", "Ni"]
    ws = make_walkers(cfg, 1, 0, tmp_path / "ex")
    names = [w["name"] for w in ws]
    assert names == [
        "Cu.hot.T900.r0",
        "Cu.hot.T900.r1",
        "Cu.g1.T300.P0.r0",
        "Cu.g1.T300.P10000.r0",
        "Ni.g1.T300.P0.r0",
        "Ni.g1.T300.P10000.r0",
        "Ni.g2.T300.r0",
    ]
    assert [w["ensemble"] for w in ws] == ["nvt-langevin"] * 2 + ["npt"] * 4 + ["nvt"]
    assert [w["nsteps"] for w in ws] == [40] * 6 + [20]
    assert all(w["tau_p"] == 0.3 for w in ws[2:6]) and "pressure" not in ws[0]
    assert len({w["seed"] for w in ws}) == len(ws)
    parsed = parse_walkers(ws, base=tmp_path / "ex")  # the explore runner takes the mixed batch
    assert [w.barostat for w in parsed] == [None, None, "iso", "iso", "iso", "iso", None]
    # resolving the resolved config again changes nothing (results/config.json is read back as is)
    from dpsnake.workflow.stages import resolve_stages

    again = json.loads(json.dumps(cfg))
    resolve_stages(again)
    assert again == cfg


def test_stage_schedules_are_defaults_only_where_a_group_can_follow_them(tmp_path):
    ramp = {"start": 0.0, "stop": 2e4}
    groups = [{"ensemble": "nvt"}, {"ensemble": "npt"}, {"ensemble": "nvt", "pressure_ramp": ramp}]
    stage = _stage(groups=groups[:2], temperatures=[300.0], pressure_ramp=ramp)
    st = cu_config(tmp_path, systems=_systems(), **stage)["explore"]["stages"][0]
    assert "pressure_ramp" not in st["groups"][0] and st["groups"][1]["pressure_ramp"] == ramp
    # a group that sets a schedule its ensemble cannot follow is still one line naming it
    with pytest.raises(UserError, match=r"explore.stages\[0\].groups\[2\].pressure_ramp: needs a barostat"):
        cu_config(tmp_path, systems=_systems(), **_stage(groups=groups, temperatures=[300.0], pressure_ramp=ramp))


def test_flat_stage_is_one_group_with_the_old_names(tmp_path):
    cfg = cu_config(tmp_path, **_stage(temperatures=[300.0, 600.0], replicas=2))
    assert "groups" not in cfg["explore"]["stages"][0]  # stays as written
    names = [w["name"] for w in make_walkers(cfg, 0, 0, tmp_path / "ex")]
    assert names == ["Cu.T300.r0", "Cu.T300.r1", "Cu.T600.r0", "Cu.T600.r1"]


def _nvt_npt_select(tmp_path, quota: str, devis) -> tuple[list[str], list[str]]:
    """An NVT and an NPT group at 300 K (NPT at 0 bar), one walker each with 6 frames of max_devi_f
    ``devis[k]`` (6 values per walker); select with max_candidates 4 and ``quota``: the walker of each
    picked frame, and the names of the two walkers (NVT, NPT)."""
    import ase.io

    from dpsnake.engine.model_devi import write_model_devi
    from dpsnake.workflow.select import select

    groups = [{"ensemble": "nvt"}, {"ensemble": "npt", "pressures": [0.0]}]
    sel = {"max_candidates": 4, "pick": "highest", "quota": quota, "min_dist": 0.5}
    cfg = cu_config(tmp_path, **_stage(groups=groups, temperatures=[300.0]), select=sel)
    ex = tmp_path / "explore"
    walkers = make_walkers(cfg, 0, 0, ex)
    (ex / "walkers.json").write_text(json.dumps(walkers))
    (ex / "plan.json").write_text(json.dumps({"iteration": 0, "stage": 0, "stage_iteration": 0}))
    (ex / "summary.json").write_text(json.dumps({"walkers": {w["name"]: {"status": "finished"} for w in walkers}}))
    for j, (w, devi) in enumerate(zip(walkers, devis)):
        frames = []
        for k in range(6):
            a = ase.io.read(ex / w["structure"])
            a.rattle(0.03, seed=10 * k + 100 * j)
            a.info["step"] = 5 * k
            frames.append(a)
        (ex / w["name"]).mkdir()
        ase.io.write(ex / w["name"] / "traj.extxyz", frames, format="extxyz")
        z = np.zeros(6)
        cols = {k: z for k in ("max_devi_v", "min_devi_v", "avg_devi_v", "min_devi_f", "avg_devi_f")}
        write_model_devi(ex / w["name"] / "model_devi.out", 5 * np.arange(6), {**cols, "max_devi_f": np.asarray(devi)})
    _, tasks = select(cfg, 0, ex)
    return sorted(t.info["walker"] for t in tasks), [w["name"] for w in walkers]


def test_condition_quota_tells_groups_apart(tmp_path):
    """An NVT and an NPT group at the same temperature (NPT at 0 bar) are two conditions: each gets
    half of max_candidates, though the NVT walker has the higher deviations."""
    picked, (nvt, npt) = _nvt_npt_select(tmp_path, "condition", [[0.101] * 6, [0.061] * 6])
    assert picked == sorted([nvt] * 2 + [npt] * 2)


def test_weighted_condition_quota_follows_the_uncertain_frames(tmp_path):
    """quota condition_weighted: the NVT walker has 6 frames in the trust window (0.05-0.15), the NPT
    walker 2 (its other 4 are accurate, below 0.05): shares 4 * 6/8 = 3 and 1; the even quota gives 2 and 2."""
    devis = [[0.101, 0.102, 0.103, 0.104, 0.105, 0.106], [0.061, 0.062, 0.01, 0.01, 0.01, 0.01]]
    picked, (nvt, npt) = _nvt_npt_select(tmp_path / "w", "condition_weighted", devis)
    assert picked == sorted([nvt] * 3 + [npt])
    picked, _ = _nvt_npt_select(tmp_path / "e", "condition", devis)
    assert picked == sorted([nvt] * 2 + [npt] * 2)


@pytest.mark.parametrize(
    "stage, message",
    [
        (
            {"groups": [{"name": "a", "temperatures": [300]}, {"name": "a", "temperatures": [600]}]},
            "explore.stages[0].groups[1].name: 'a' names an earlier group of the stage",
        ),
        (
            {"groups": [{"temperatures": [300]}, {"systems": ["Fe"], "temperatures": [300]}]},
            "explore.stages[0].groups[1].systems: unknown system 'Fe'",
        ),
        ({"groups": [{"ensemble": "nvt"}]}, "explore.stages[0].groups[0]: give temperatures (K)"),
        ({"groups": [{"temperatures": [300], "ensemble": "npx"}]}, "explore.stages[0].groups[0].ensemble"),
        ({"groups": [{"temperatures": [300], "nsteps": 4}]}, "explore.stages[0].groups[0].trj_freq: 5 is larger"),
        ({"temperatures": [300, 300]}, "explore.stages[0].temperatures: [300, 300] names a value twice"),
        ({"groups": [{"temperatures": [300], "max_iterations": 2}]}, "groups[0].max_iterations: unknown key"),
    ],
)
def test_bad_groups_are_one_line_naming_the_key(tmp_path, stage, message):
    with pytest.raises(UserError) as err:
        cu_config(tmp_path, **_stage(**stage))
    assert message in str(err.value) and "\n" not in str(err.value)
