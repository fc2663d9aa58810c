"""Selection beyond random / highest deviation through `select` and `dpsnake select`: diverse picks,
deduplication, per-condition quotas, fill-ins from above trust hi (issue 18 item 3), on explore folders
written from hand-made frames and deviations."""

from __future__ import annotations

import json

import numpy as np
import pytest
from select_helpers import cu_config as _cfg
from select_helpers import dpsnake_cli


def _write_conditions(tmp_path, cfg, per_walker):
    """An explore folder with a walker per temperature of ``cfg``; ``per_walker``: per walker a list of
    (rattle amplitude, seed, deviation) frames from the start structure (a seed repeated with a tiny extra
    displacement is a near-copy)."""
    import ase.io

    from dpsnake.engine.model_devi import write_model_devi
    from dpsnake.workflow.plan import make_walkers

    ex = tmp_path / "explore"
    walkers = make_walkers(cfg, 0, 0, ex)
    (ex / "walkers.json").write_text(json.dumps(walkers))
    (ex / "plan.json").write_text(json.dumps({"iteration": 0, "stage": 0, "stage_iteration": 0}))
    (ex / "summary.json").write_text(
        json.dumps({"walkers": {w["name"]: {"status": "finished", "reason": None} for w in walkers}})
    )
    for w, spec in zip(walkers, per_walker):
        atoms0 = ase.io.read(ex / w["structure"])
        frames = []
        for k, (amp, seed, _) in enumerate(spec):
            a = atoms0.copy()
            a.rattle(amp, seed=seed)
            a.positions[0] += 1e-4 * k  # a near-copy, not an exact one
            a.info["step"] = 5 * k
            frames.append(a)
        (ex / w["name"]).mkdir()
        ase.io.write(ex / w["name"] / "traj.extxyz", frames, format="extxyz")
        z = np.zeros(len(spec))
        write_model_devi(
            ex / w["name"] / "model_devi.out",
            5 * np.arange(len(spec)),
            {
                "max_devi_v": z,
                "min_devi_v": z,
                "avg_devi_v": z,
                "max_devi_f": np.asarray([s[2] for s in spec]),
                "min_devi_f": z,
                "avg_devi_f": z,
            },
        )
    return ex, walkers


def test_select_diverse_dedup_and_condition_quota(tmp_path, cu_model):
    """Issue 18 item 3 through `select` and `dpsnake select`: the 900 K walker has the highest deviations
    but near-copies of one structure plus one outlier; the 300 K walker distinct small rattles.
    highest takes the 900 K near-copies; diverse with dedup_tol takes the outlier and drops the copies;
    quota: condition gives each condition half of the labels."""
    from dpsnake.workflow.config import write_if_changed
    from dpsnake.workflow.select import select

    st = {"temperatures": [300.0, 900.0], "ensemble": "nvt", "nsteps": 40, "trj_freq": 5, "max_iterations": 2}
    cold = [(0.03, 10 + k, 0.06 + 0.001 * k) for k in range(6)]
    hot = [(0.05, 1, 0.12 + 0.001 * k) for k in range(5)] + [(0.25, 2, 0.10)]  # 5 near-copies, 1 outlier
    base = {"trust": {"force": [0.05, 0.15]}, "explore": {"stages": [st]}}
    cfg = _cfg(tmp_path, **base, select={"max_candidates": 4, "pick": "highest", "min_dist": 0.5})
    ex, _ = _write_conditions(tmp_path, cfg, [cold, hot])
    _, tasks = select(cfg, 0, ex)
    assert [t.info["temperature"] for t in tasks] == [900.0] * 4
    cfg = _cfg(tmp_path, **base, select={"max_candidates": 4, "pick": "diverse", "dedup_tol": 0.02, "min_dist": 0.5})
    stats, tasks = select(cfg, 0, ex, model=cu_model["dp"])
    hot_steps = sorted(t.info["step"] for t in tasks if t.info["temperature"] == 900.0)
    # the highest deviation (900 K step 20), the outlier (step 25), then the 300 K frames farthest away
    assert hot_steps == [20, 25]
    assert sorted(t.info["step"] for t in tasks if t.info["temperature"] == 300.0) == [10, 20]
    s = stats["systems"]["Cu"]
    assert s["near_duplicates"] == 4 and s["duplicates"] == 4 and s["selected"] == len(tasks) == 4
    cfg = _cfg(tmp_path, **base, select={"max_candidates": 4, "pick": "highest", "quota": "condition", "min_dist": 0.5})
    _, tasks = select(cfg, 0, ex)
    assert sorted(t.info["temperature"] for t in tasks) == [300.0, 300.0, 900.0, 900.0]
    assert sorted((t.info["temperature"], t.info["step"]) for t in tasks) == [
        (300.0, 20),
        (300.0, 25),
        (900.0, 15),
        (900.0, 20),
    ]  # each condition's highest two
    # the command line, with the model next to the explore folder (the iteration's layout); the log says
    # which features were used
    cfg = _cfg(
        tmp_path,
        **base,
        select={"max_candidates": 4, "pick": "diverse", "dedup_tol": 0.02, "quota": "condition", "min_dist": 0.5},
    )
    write_if_changed(cfg, tmp_path / "config.json")
    (tmp_path / "train" / "model.0").mkdir(parents=True)
    (tmp_path / "train" / "model.0" / "model.dp").symlink_to(cu_model["dp"])
    p = dpsnake_cli(
        tmp_path, "select", "--config", "config.json", "--iter", "0", "--explore", "explore", "--outdir", "select"
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "features of pick diverse / dedup_tol: se_e2_a descriptor of" in p.stderr
    assert "(numpy)" in p.stderr  # a small pool: NumPy, whatever the machine (feature_xp)
    assert "candidate(s) within dedup_tol 0.02 of a picked frame dropped" in p.stderr
    out = json.loads((tmp_path / "select" / "stats.json").read_text())
    import ase.io

    temps = sorted(
        ase.io.read(f, format="extxyz").info["temperature"]
        for f in (tmp_path / "select" / "candidates").glob("*.extxyz")
    )
    assert temps == [300.0, 300.0, 900.0, 900.0] and out["systems"]["Cu"]["selected"] == 4


@pytest.mark.parametrize("pick", ["diverse", "kmeanspp"])
def test_select_diverse_keeps_away_from_training_frames(tmp_path, cu_model, pick):
    """pick diverse / kmeanspp with --data: a near-copy of the outlier is already in the training data, so
    the outlier is not picked; the frames come from the system's datasets (training_frames, capped).
    kmeanspp draws the outlier too here: its squared distance to the highest-deviation pick is ~100x the
    others'."""
    import dpdata
    from ase.calculators.singlepoint import SinglePointCalculator

    from dpsnake.workflow.select import select, training_frames

    st = {"temperatures": [300.0], "ensemble": "nvt", "nsteps": 40, "trj_freq": 5, "max_iterations": 2}
    spec = [(0.03, 10 + k, 0.12 - 0.001 * k) for k in range(6)] + [(0.25, 2, 0.10)]  # frame 6: the outlier
    cfg = _cfg(
        tmp_path,
        trust={"force": [0.05, 0.15]},
        explore={"stages": [st]},
        select={"max_candidates": 2, "pick": pick, "min_dist": 0.5},
    )
    ex, _ = _write_conditions(tmp_path, cfg, [spec])
    stats, tasks = select(cfg, 0, ex, model=cu_model["dp"])
    assert sorted(t.info["step"] for t in tasks) == [0, 30]  # the highest deviation, then the outlier
    a = [t for t in tasks if t.info["step"] == 30][0].copy()
    a.positions[3] += 0.01  # not the same frame: still a candidate
    a.calc = SinglePointCalculator(a, energy=0.0, forces=np.zeros((len(a), 3)))
    dpdata.LabeledSystem(a, fmt="ase/structure").to_deepmd_npy(str(tmp_path / "data" / "iter.000000" / "Cu"))
    known = training_frames(tmp_path / "data", "Cu")
    assert len(known) == 1 and np.allclose(known[0].positions, a.positions, atol=1e-6)
    assert known[0].get_chemical_symbols() == a.get_chemical_symbols() and known[0].pbc.all()
    stats, tasks = select(cfg, 0, ex, tmp_path / "data", model=cu_model["dp"])
    assert 30 not in [t.info["step"] for t in tasks] and len(tasks) == 2
    assert training_frames(tmp_path / "data", "Cu2") == []


def test_select_fill_from_failed_fills_the_hot_conditions_share(tmp_path):
    """The 900 K walker has every frame above trust hi (one squeezed too close: structure check), the
    300 K walker candidates. Without fill_from_failed all labels come from 300 K; with it and quota
    condition the 900 K share is filled by its sane frames above hi, the lowest deviation first."""
    from dpsnake.workflow.select import select

    st = {"temperatures": [300.0, 900.0], "ensemble": "nvt", "nsteps": 40, "trj_freq": 5, "max_iterations": 2}
    cold = [(0.03, 10 + k, 0.06 + 0.001 * k) for k in range(6)]
    hot = [(0.05, 20 + k, 0.30 + 0.01 * k) for k in range(5)] + [(0.9, 3, 0.2)]  # last: atoms too close
    base = {"trust": {"force": [0.05, 0.15]}, "explore": {"stages": [st]}}
    sel = {"max_candidates": 4, "pick": "highest", "quota": "condition", "min_dist": 1.5}
    cfg = _cfg(tmp_path, **base, select=sel)
    ex, _ = _write_conditions(tmp_path, cfg, [cold, hot])
    stats, tasks = select(cfg, 0, ex)
    assert [t.info["temperature"] for t in tasks] == [300.0] * 4
    assert stats["systems"]["Cu"]["filled_from_failed"] == 0
    cfg = _cfg(tmp_path, **base, select={**sel, "fill_from_failed": True})
    stats, tasks = select(cfg, 0, ex)
    s = stats["systems"]["Cu"]
    hot_picked = sorted(t.info["max_devi_f"] for t in tasks if t.info["temperature"] == 900.0)
    assert hot_picked == pytest.approx([0.30, 0.31]) and s["filled_from_failed"] == 2 and s["selected"] == 4
    assert all(t.info["above_trust_hi"] == (t.info["temperature"] == 900.0) for t in tasks)
    assert s["failed"] == 6 and s["candidate"] == 6  # the classification itself is unchanged


def test_select_adaptive_hi_raises_the_hot_conditions_window(tmp_path):
    """select.adaptive_hi: the 900 K walker's frames are all above trust hi 0.15; with ratio 0.25 of 12
    frames at most 3 stay failed, so hi rises to just above the 4th largest deviation (0.31) and the
    900 K share is picked from 0.30 / 0.31 (highest first); the squeezed frame is filtered, not picked."""
    from dpsnake.workflow.select import select

    st = {"temperatures": [300.0, 900.0], "ensemble": "nvt", "nsteps": 40, "trj_freq": 5, "max_iterations": 2}
    cold = [(0.03, 10 + k, 0.06 + 0.001 * k) for k in range(6)]
    hot = [(0.05, 20 + k, 0.30 + 0.01 * k) for k in range(5)] + [(0.9, 3, 0.2)]  # last: atoms too close
    base = {"trust": {"force": [0.05, 0.15]}, "explore": {"stages": [st]}}
    sel = {"max_candidates": 4, "pick": "highest", "quota": "condition", "min_dist": 1.5}
    cfg = _cfg(tmp_path, **base, select={**sel, "adaptive_hi": {"ratio": 0.25}})
    ex, _ = _write_conditions(tmp_path, cfg, [cold, hot])
    stats, tasks = select(cfg, 0, ex)
    s = stats["systems"]["Cu"]
    assert 0.31 < s["trust_hi"] < 0.31 + 1e-9
    assert s["failed"] == 4 and s["filtered"] == 1 and s["candidate"] == 8  # 0.32-0.34 + the squeezed one
    hot_picked = sorted(t.info["max_devi_f"] for t in tasks if t.info["temperature"] == 900.0)
    assert hot_picked == pytest.approx([0.30, 0.31]) and s["selected"] == 4
    assert not any(t.info["above_trust_hi"] for t in tasks)
    # capped: max_hi 0.15 (= hi) changes nothing: every 900 K frame stays failed
    cfg = _cfg(tmp_path, **base, select={**sel, "adaptive_hi": {"ratio": 0.25, "max_hi": 0.15}})
    stats, tasks = select(cfg, 0, ex)
    assert stats["systems"]["Cu"]["trust_hi"] == 0.15
    assert [t.info["temperature"] for t in tasks] == [300.0] * 4


def test_select_budget_shares_labels_by_uncertain_frames(tmp_path):
    """select.budget: 5 labels over two systems, Cu with 2 frames in the trust window (4 accurate) and
    Cu2 with 8: shares 1 and 4 (in proportion 2:8); without a budget each takes up to max_candidates; a
    share a system cannot use (its candidates fail the structure filter) goes to the other."""
    from dpsnake.workflow.select import select

    st = {"temperatures": [300.0], "ensemble": "nvt", "nsteps": 40, "trj_freq": 5, "max_iterations": 2}
    cu = {
        "builder": "bulk",
        "repeat": [2, 2, 2],
        "kwargs": {"name": "Cu", "crystalstructure": "fcc", "a": 3.61, "cubic": True},
    }
    systems = {"Cu": {"structure": cu}, "Cu2": {"structure": cu}}
    calm = [(0.03, 10 + k, 0.01) for k in range(4)] + [(0.03, 20 + k, 0.07 + 0.01 * k) for k in range(2)]
    busy = [(0.03, 30 + k, 0.06 + 0.01 * k) for k in range(8)]
    base = {"systems": systems, "trust": {"force": [0.05, 0.15]}, "explore": {"stages": [st]}}
    sel = {"max_candidates": 4, "pick": "highest", "min_dist": 1.5}
    cfg = _cfg(tmp_path, **base, select=sel)
    ex, walkers = _write_conditions(tmp_path, cfg, [calm, busy])
    assert [w["system"] for w in walkers] == ["Cu", "Cu2"]
    stats, tasks = select(cfg, 0, ex)
    assert {k: v["selected"] for k, v in stats["systems"].items()} == {"Cu": 2, "Cu2": 4}
    cfg = _cfg(tmp_path, **base, select={**sel, "budget": 5})
    stats, tasks = select(cfg, 0, ex)
    assert {k: (v["share"], v["selected"]) for k, v in stats["systems"].items()} == {"Cu": (1, 1), "Cu2": (4, 4)}
    cu2 = sorted(t.info["max_devi_f"] for t in tasks if t.info["system"] == "Cu2")
    assert cu2 == pytest.approx([0.10, 0.11, 0.12, 0.13])  # highest first within the share
    assert [t.info["max_devi_f"] for t in tasks if t.info["system"] == "Cu"] == pytest.approx([0.08])
    # 6 of Cu2's 8 candidates fail the structure filter (rattled 0.8 A: atoms closer than min_dist): the
    # shares count what each system can label, so Cu gets the labels Cu2 cannot use (2 + 2, not 1 + 2)
    squeezed = [(0.8, 40 + k, 0.06 + 0.01 * k) for k in range(6)] + busy[6:]
    (tmp_path / "squeezed").mkdir()
    ex, _ = _write_conditions(tmp_path / "squeezed", cfg, [calm, squeezed])
    stats, tasks = select(cfg, 0, ex)
    s = stats["systems"]
    assert s["Cu2"]["filtered"] == 6 and s["Cu2"]["candidate"] == 2 and s["Cu2"]["failed"] == 6
    assert {k: (v["share"], v["selected"]) for k, v in s.items()} == {"Cu": (2, 2), "Cu2": (2, 2)}
    assert sorted(t.info["max_devi_f"] for t in tasks if t.info["system"] == "Cu2") == pytest.approx([0.12, 0.13])


def test_feature_xp_numpy_for_small_pools():
    """Features of a pool under SMALL_POOL_ATOMS atoms, or with explore.device cpu, are computed with NumPy
    and CuPy is never started (nothing kept in notes); a larger pool gets what explore's device pick
    gives (CuPy where it sees a GPU, else NumPy), started once per select run."""
    from dpsnake.md.explore import pick_xp
    from dpsnake.workflow.select import SMALL_POOL_ATOMS, feature_xp

    notes: dict = {}
    assert feature_xp({"explore": {"device": "auto"}}, SMALL_POOL_ATOMS - 1, notes) is np and notes == {}
    assert feature_xp({"explore": {"device": "cpu"}}, 10 * SMALL_POOL_ATOMS, notes) is np and notes == {}
    big = feature_xp({"explore": {"device": "auto"}}, SMALL_POOL_ATOMS, notes)
    assert big is pick_xp("auto") and notes == {"xp": big}
    assert feature_xp({"explore": {"device": "auto"}}, 2 * SMALL_POOL_ATOMS, notes) is big
