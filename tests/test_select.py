"""Selection: classification, adaptive trust level, picking, structure filters and the convergence
decision, on model_devi.out files written by the real exploration (`dpsnake explore`) and the
engine's writer."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from ase.build import bulk

from dpsnake.workflow import candidates as S

ROOT = pathlib.Path(__file__).resolve().parents[1]


from select_helpers import cu_config as _cfg  # noqa: E402
from select_helpers import dpsnake_cli  # noqa: E402


def _select_iter1(tmp_path, ex):
    """``dpsnake select`` of iteration 1 on ``ex`` with the earlier labels (--results), into select1/."""
    return dpsnake_cli(
        tmp_path,
        "select",
        "--config",
        "config.json",
        "--iter",
        "1",
        "--explore",
        str(ex),
        "--outdir",
        "select1",
        "--results",
        "results",
    )


def test_classify_force_and_virial():
    f = np.array([0.01, 0.05, 0.10, 0.20, np.nan])
    v = np.array([0.0, 0.0, 0.5, 0.0, 0.0])
    assert S.classify(f, (0.05, 0.15)).tolist() == [0, 1, 1, 2, 2]  # lo inclusive -> candidate; NaN failed
    assert S.classify(f, (0.05, 0.15), v, (0.1, 0.4)).tolist() == [0, 1, 2, 2, 2]
    # virial above its low level makes an otherwise accurate frame a candidate
    assert S.classify([0.01], (0.05, 0.15), [0.2], (0.1, 0.4)).tolist() == [1]


def test_adaptive_lo_and_pick():
    devi = np.array([0.01, 0.02, 0.03, 0.04, 0.3, 0.5])
    # 3 candidates wanted below hi=0.2: lo drops to the 3rd largest (0.02)
    assert S.adaptive_lo(devi, 0.1, 0.2, numb=3, ratio=0.0) == pytest.approx(0.02)
    assert S.adaptive_lo(devi, 0.1, 0.2, numb=0, ratio=0.5) == pytest.approx(0.02)  # ceil(0.5*6) = 3
    assert S.adaptive_lo(devi, 0.015, 0.2, numb=2, ratio=0.0) == pytest.approx(0.015)  # never above lo
    assert S.adaptive_lo(devi, 0.1, 0.2, numb=3, ratio=0.0, min_lo=0.025) == pytest.approx(0.025)
    idx = np.arange(6)
    assert S.pick(idx, devi, 2, "highest", np.random.default_rng(0)).tolist() == [4, 5]
    r = S.pick(idx, devi, 3, "random", np.random.default_rng(0))
    assert len(r) == 3 and len(set(r.tolist())) == 3 and set(r.tolist()) <= set(idx.tolist())
    assert S.pick(idx[:2], devi, 5, "random", np.random.default_rng(0)).tolist() == [0, 1]


def test_adaptive_hi():
    devi = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, np.nan])
    assert S.adaptive_hi(devi, 0.35, None) == 0.35  # off
    # 10 finite frames, ratio 0.2: at most 2 may be failed -> the level sits just above the 3rd largest
    hi = S.adaptive_hi(devi, 0.35, 0.2)
    assert 0.8 < hi < 0.8 + 1e-12
    assert S.classify(devi, (0.05, hi)).tolist() == [1] * 8 + [2, 2, 2]  # NaN stays failed
    assert S.adaptive_hi(devi, 0.95, 0.2) == 0.95  # only 1 frame above: never lowered
    assert S.adaptive_hi(devi, 0.35, 0.2, max_hi=0.6) == pytest.approx(0.6)  # capped
    assert S.adaptive_hi(devi, 0.35, 0.2, max_hi=0.1) == 0.35  # a cap below hi leaves hi
    assert S.adaptive_hi(devi, 0.35, 1.0) == 0.35  # every frame may fail
    assert S.adaptive_hi([0.5, 0.5, 0.5, 0.5], 0.35, 0.5) > 0.5  # ties: all below the raised level
    assert S.adaptive_hi(devi, 0.35, 0.0) > 1.0  # no frame may fail


def test_proportional_shares():
    from dpsnake.workflow.diversity import proportional

    # 15 labels by weight 38:202:41:140:63: floors 1, 6, 1, 4, 1 + the 2 largest remainders (0.95, 0.34)
    assert proportional([38, 202, 41, 140, 63], [38, 77, 41, 139, 63], 15).tolist() == [1, 6, 1, 5, 2]
    # a group with less room than its share is capped; its excess goes to the others in proportion
    assert proportional([38, 202, 41, 140, 63], [38, 2, 41, 139, 63], 15).tolist() == [2, 2, 2, 6, 3]
    assert proportional([5, 1], [1, 10], 6).tolist() == [1, 5]
    assert proportional([1, 1], [1, 1], 5).tolist() == [1, 1]  # never more than there is
    assert proportional([0, 0, 1], [3, 3, 0], 4).tolist() == [2, 2, 0]  # weighted groups full: evenly
    assert proportional([1, 2], [10, 10], 0).tolist() == [0, 0]
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, a, t = rng.integers(0, 9, 5), rng.integers(0, 9, 5), int(rng.integers(0, 30))
        out = proportional(w, a, t)
        assert out.sum() == min(t, a.sum()) and (out <= a).all() and (out >= 0).all()


def test_structure_filters():
    a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    vpa = a.get_volume() / len(a)
    assert S.structure_problem(a, 1.5, 30, (0.5, 2.0), vpa) is None
    b = a.copy()
    b.positions[1] = b.positions[0] + [0.5, 0, 0]
    assert "apart" in S.structure_problem(b, 1.5, 30, (0.5, 2.0), vpa)
    c = a.copy()
    c.set_cell(c.cell.array * 1.5, scale_atoms=True)
    assert "volume per atom" in S.structure_problem(c, 1.5, 30, (0.5, 2.0), vpa)
    d = a.copy()
    cell = d.cell.array.copy()
    cell[1] = cell[0] + [0, 0.5, 0]  # ~4 deg between a and b
    d.set_cell(cell)
    assert "cell angle" in S.structure_problem(d, 0.0, 30, (0.01, 100), None)


def test_decide_stages():
    ok = {"A": {"accurate_ratio": 0.99}}
    bad = {"A": {"accurate_ratio": 0.5}}
    d = S.decide(ok, 0.95, it=0, stage=0, stage_it=0, nstages=2, stage_max_iterations=3, max_iterations=10)
    assert d["next_stage"] == 1 and not d["stop"] and not d["converged"]
    d = S.decide(ok, 0.95, it=3, stage=1, stage_it=0, nstages=2, stage_max_iterations=3, max_iterations=10)
    assert d["stop"] and d["converged"]
    d = S.decide(bad, 0.95, it=1, stage=0, stage_it=1, nstages=2, stage_max_iterations=3, max_iterations=10)
    assert d["next_stage"] == 0 and not d["stop"] and "A 0.500" in d["reason"]
    d = S.decide(bad, 0.95, it=2, stage=1, stage_it=2, nstages=2, stage_max_iterations=3, max_iterations=10)
    assert d["stop"] and not d["converged"] and "exhausted" in d["reason"]
    d = S.decide(bad, 0.95, it=9, stage=0, stage_it=0, nstages=2, stage_max_iterations=3, max_iterations=10)
    assert d["stop"] and "max_iterations" in d["reason"]


def _write_explore(tmp_path, cfg, devi_f, devi_v=None, close_step=None, repeat_first=(), it=0, stage=0):
    """An explore folder with one walker (the first of iteration ``it``, stage ``stage``): frames from the
    start structure, model_devi.out written by the engine's writer (the LAMMPS plugin format)."""
    import ase.io

    from dpsnake.engine.model_devi import write_model_devi
    from dpsnake.workflow.plan import make_walkers

    ex = tmp_path / "explore"
    walkers = make_walkers(cfg, it, stage, ex)
    w = walkers[0]
    (ex / "walkers.json").write_text(json.dumps(walkers))
    (ex / "plan.json").write_text(json.dumps({"iteration": it, "stage": stage, "stage_iteration": 0}))
    (ex / "summary.json").write_text(
        json.dumps({"walkers": {w["name"]: {"status": "finished", "reason": None, "steps": 40}}})
    )
    n = len(devi_f)
    steps = np.arange(n) * 5
    atoms0 = ase.io.read(ex / w["structure"])
    frames = []
    for k, s in enumerate(steps):
        a = atoms0.copy()
        a.rattle(0.05, seed=0 if k in repeat_first else k)
        if s == close_step:
            a.positions[1] = a.positions[0] + [0.3, 0.0, 0.0]
        a.info["step"] = int(s)
        frames.append(a)
    (ex / w["name"]).mkdir()
    ase.io.write(ex / w["name"] / "traj.extxyz", frames, format="extxyz")
    z = np.zeros(n)
    v = z if devi_v is None else np.asarray(devi_v)
    write_model_devi(
        ex / w["name"] / "model_devi.out",
        steps,
        {
            "max_devi_v": v,
            "min_devi_v": z,
            "avg_devi_v": z,
            "max_devi_f": np.asarray(devi_f),
            "min_devi_f": z,
            "avg_devi_f": z,
        },
    )
    return ex


def test_select_cli_counts_and_candidates(tmp_path):
    from dpsnake.workflow.select import select

    cfg = _cfg(
        tmp_path,
        trust={"force": [0.05, 0.15], "virial": [0.1, 0.3]},
        select={"max_candidates": 3, "pick": "highest", "min_dist": 1.5},
    )
    devi_f = [0.01, 0.02, 0.06, 0.07, 0.08, 0.09, 0.10, 0.2, 0.01]
    devi_v = [0.0, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5]
    ex = _write_explore(tmp_path, cfg, devi_f, devi_v, close_step=30)  # step 30 = frame 6 (devi 0.10)
    stats, tasks = select(cfg, 0, ex)
    s = stats["systems"]["Cu"]
    # frame 1: force accurate, virial candidate; frame 8: virial failed; frame 6 filtered (close atoms)
    assert (s["accurate"], s["candidate"], s["failed"], s["total"]) == (1, 5, 3, 9)
    assert s["filtered"] == 1 and s["selected"] == 3
    assert [t.info["step"] for t in tasks] == [15, 20, 25]  # highest deviations among kept candidates
    assert [t.info["max_devi_f"] for t in tasks] == pytest.approx([0.07, 0.08, 0.09])
    assert stats["tasks"] == ["000000", "000001", "000002"]
    assert stats["converged"] is False and stats["next_stage"] == 0


def test_select_never_picks_a_frame_twice(tmp_path):
    """Identical structures (e.g. the start structure at step 0 of every walker and iteration) are picked
    once per iteration, and never again once they are in a dataset."""
    import dpdata

    from dpsnake.workflow.select import select

    cfg = _cfg(tmp_path, select={"max_candidates": 10, "pick": "highest"})
    ex = _write_explore(tmp_path, cfg, [0.1] * 5, repeat_first=(0, 2))  # frame 2 = frame 0
    stats, tasks = select(cfg, 0, ex)
    assert stats["systems"]["Cu"]["duplicates"] == 1 and len(tasks) == 4
    assert stats["systems"]["Cu"]["candidate"] == 5  # still counted as a candidate
    # frame 0 already in a dataset: only frames 1, 3, 4 remain
    a = tasks[0].copy()
    from ase.calculators.singlepoint import SinglePointCalculator

    a.calc = SinglePointCalculator(a, energy=0.0, forces=np.zeros((len(a), 3)))
    dpdata.LabeledSystem(a, fmt="ase/structure").to_deepmd_npy(str(tmp_path / "data" / "iter.000000" / "Cu"))
    stats, tasks = select(cfg, 1, ex, tmp_path / "data")
    assert stats["systems"]["Cu"]["duplicates"] == 2 and [t.info["step"] for t in tasks] == [5, 15, 20]


def test_select_skips_frames_whose_label_failed(tmp_path):
    """Issue 19 item 5: a frame whose label failed is never picked again in a later iteration (its key is in
    task.N.failed.json; a record without one takes it from the failed label's frame), and is counted as
    failed_before. Real EMT labels via `dpsnake label`; the sanity cap fails the two hardest frames."""
    import ase.io
    from ase.calculators.emt import EMT

    from dpsnake.workflow.config import write_if_changed
    from dpsnake.workflow.select import select

    cfg = _cfg(tmp_path, select={"max_candidates": 10, "pick": "highest"})
    ex = _write_explore(tmp_path, cfg, [0.1, 0.11, 0.12, 0.13])
    stats0, tasks = select(cfg, 0, ex)
    assert len(tasks) == 4 and stats0["systems"]["Cu"]["failed_before"] == 0
    fmax = []
    for a in tasks:
        b = a.copy()
        b.calc = EMT()
        fmax.append(float(np.linalg.norm(b.get_forces(), axis=1).max()))  # as label.max_force
    cap = float(np.mean(sorted(fmax)[1:3]))  # between the 2nd and 3rd largest force: two labels fail
    cfg["label"]["max_force"] = cap
    write_if_changed(cfg, tmp_path / "config.json")
    it0 = tmp_path / "results" / "iter.000000"
    (it0 / "select" / "candidates").mkdir(parents=True)
    cands, outs = [], []
    for a in tasks:
        cands.append(it0 / "select" / "candidates" / f"task.{a.info['task']}.extxyz")
        outs.append(it0 / "label" / cands[-1].name)
        ase.io.write(cands[-1], a, format="extxyz")
    p = dpsnake_cli(tmp_path, "label", "--config", "config.json", "--input", *cands, "--output", *outs)
    assert p.returncode == 0, p.stderr
    records = sorted((it0 / "label").glob("task.*.failed.json"))
    bad_steps = sorted(json.loads(r.read_text())["step"] for r in records)
    assert len(records) == 2 and all(json.loads(r.read_text())["key"] for r in records)
    assert bad_steps == sorted(a.info["step"] for a, f in zip(tasks, fmax) if f > cap)

    stats1, tasks1 = select(cfg, 1, ex, results=tmp_path / "results")
    assert stats1["systems"]["Cu"]["failed_before"] == 2 and stats1["systems"]["Cu"]["selected"] == 2
    assert sorted(a.info["step"] for a in tasks1) == sorted(set(a.info["step"] for a in tasks) - set(bad_steps))
    # rerunning iteration 0's selection ignores what its own (or later) labels did: the same frames
    again, tasks0 = select(cfg, 0, ex, results=tmp_path / "results")
    assert again["systems"]["Cu"]["failed_before"] == 0 and [a.info["step"] for a in tasks0] == [0, 5, 10, 15]
    # an older record without a key: the key comes from the failed label's frame
    rec = json.loads(records[0].read_text())
    del rec["key"]
    records[0].write_text(json.dumps(rec))
    assert select(cfg, 1, ex, results=tmp_path / "results")[0]["systems"]["Cu"]["failed_before"] == 2
    # the command line: --results, and one line per system saying how many and why
    p = _select_iter1(tmp_path, ex)
    assert p.returncode == 0, p.stderr
    assert "Cu: 2 candidate(s) not picked again, their label failed in an earlier iteration" in p.stderr
    assert "failed.json" in p.stderr and "above the sanity cap" in p.stderr
    assert json.loads((tmp_path / "select1" / "stats.json").read_text())["systems"]["Cu"]["failed_before"] == 2


def test_select_decision_is_the_reports_when_the_last_stage_explores_one_system(tmp_path):
    """Issue 19 item 11 in select itself: stage 1 (the last) explores Cu only and every Cu frame is accurate,
    while Cu2's accurate ratio in iteration 0 was 0.435. stats.json and select's log say "stopped, not
    converged" with the reason of the reports (workflow.convergence); the workflow's per-stage decision
    (stop, next_stage, stage_decision) is unchanged."""
    from dpsnake.report.decision import for_iteration
    from dpsnake.workflow.candidates import decide_from_stats
    from dpsnake.workflow.select import select, table

    cu = _cfg(tmp_path)["systems"]["Cu"]
    cfg = _cfg(
        tmp_path,
        systems={"Cu": cu, "Cu2": cu},
        convergence={"accurate_ratio": 0.95, "max_iterations": 5},
        explore={
            "stages": [
                {"systems": ["Cu", "Cu2"], "temperatures": [300.0], "nsteps": 40, "trj_freq": 5, "max_iterations": 1},
                {"systems": ["Cu"], "temperatures": [300.0], "nsteps": 40, "trj_freq": 5},
            ]
        },
    )
    res = tmp_path / "results"
    st0 = {
        "iteration": 0,
        "stage": 0,
        "stage_iteration": 0,
        "tasks": [],
        "walkers": {},
        "systems": {"Cu": {"accurate_ratio": 0.97}, "Cu2": {"accurate_ratio": 0.435}},
    }
    st0.update(decide_from_stats(cfg, st0))
    assert st0["next_stage"] == 1
    (res / "iter.000000" / "select").mkdir(parents=True)
    (res / "iter.000000" / "select" / "stats.json").write_text(json.dumps(st0))
    ex = _write_explore(tmp_path, cfg, [0.01] * 6, it=1, stage=1)
    why = (
        "exploration plan exhausted: the last stage (stage 1) reached the threshold for Cu only; "
        "latest accurate ratio below 0.95: Cu2 0.435 (iteration 0)"
    )
    stats, tasks = select(cfg, 1, ex, results=res)
    assert not tasks and stats["systems"]["Cu"]["accurate_ratio"] == 1.0
    assert (stats["converged"], stats["stop"], stats["next_stage"], stats["reason"]) == (False, True, None, why)
    assert stats["stage_decision"]["converged"] and stats["stage_decision"]["stop"]  # the stage is done
    assert table(stats).splitlines()[-1] == f"stopped, not converged: {why}"
    # what the reports (and status, finalize) say, from the stats.json files, with and without the config
    (res / "iter.000001" / "select").mkdir(parents=True)
    (res / "iter.000001" / "select" / "stats.json").write_text(json.dumps(stats))
    for conf in (cfg, None):
        d = for_iteration(res, 1, stats, 0.95, conf)
        assert (d["converged"], d["stop"], d["reason"]) == (False, True, why), conf
    # without the earlier iterations (no --results) only this stage's systems are known: converged
    alone, _ = select(cfg, 1, ex)
    assert alone["converged"] and alone["reason"].startswith("every system's latest accurate ratio >= 0.95: Cu 1.000")
    # the command line: the same words in select's log
    from dpsnake.workflow.config import write_if_changed

    write_if_changed(cfg, tmp_path / "config.json")
    p = _select_iter1(tmp_path, ex)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == f"stopped, not converged: {why}"
    written = json.loads((tmp_path / "select1" / "stats.json").read_text())
    assert (written["converged"], written["reason"]) == (False, why)


@pytest.mark.slow
def test_select_on_real_exploration(tmp_path, dp_model):
    """Two real DeePMD-kit models, a real `dpsnake explore` run, then `dpsnake select`: the counts equal
    a recount from model_devi.out, and every candidate is the trajectory frame of its step."""
    import ase.io

    from dpsnake.workflow.config import write_if_changed
    from dpsnake.workflow.plan import make_walkers

    m0 = dp_model()["dp"]
    m1 = dp_model({"model": {"descriptor": {"seed": 2}, "fitting_net": {"seed": 2}}})["dp"]
    cfg = _cfg(tmp_path, trust={"force": [0.02, 0.5]}, select={"max_candidates": 4, "pick": "random"})
    write_if_changed(cfg, tmp_path / "config.json")
    ex = tmp_path / "explore"
    walkers = make_walkers(cfg, 0, 0, ex)
    (ex / "walkers.json").write_text(json.dumps(walkers))
    (ex / "plan.json").write_text(json.dumps({"iteration": 0, "stage": 0, "stage_iteration": 0}))
    p = dpsnake_cli(
        tmp_path,
        "explore",
        "--models",
        str(m0),
        str(m1),
        "--walkers",
        str(ex / "walkers.json"),
        "--outdir",
        str(ex),
        "--device",
        "cpu",
        "--no-progress",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    p = dpsnake_cli(
        tmp_path, "select", "--config", "config.json", "--iter", "0", "--explore", "explore", "--outdir", "select"
    )
    assert p.returncode == 0, p.stderr[-2000:]
    stats = json.loads((tmp_path / "select" / "stats.json").read_text())
    md = S.read_model_devi(ex / walkers[0]["name"] / "model_devi.out")
    f = md["max_devi_f"]
    s = stats["systems"]["Cu"]
    assert s["total"] == len(f) == 40 // 5 + 1
    assert s["accurate"] == int(np.sum(f < 0.02))
    assert s["failed"] - s["filtered"] == int(np.sum(f >= 0.5))
    assert s["candidate"] + s["filtered"] == int(np.sum((f >= 0.02) & (f < 0.5)))
    assert s["selected"] == min(4, s["candidate"]) == len(stats["tasks"])
    frames = {a.info["step"]: a for a in ase.io.read(ex / walkers[0]["name"] / "traj.extxyz", ":")}
    for t in stats["tasks"]:
        c = ase.io.read(tmp_path / "select" / "candidates" / f"task.{t}.extxyz")
        step = int(c.info["step"])
        assert np.allclose(c.positions, frames[step].positions)
        assert c.info["max_devi_f"] == pytest.approx(f[md["step"] == step][0], rel=1e-6)
        assert 0.02 <= c.info["max_devi_f"] < 0.5
    assert "per-system model deviation classes" in p.stdout and "Cu" in p.stdout
