"""The run's stop decision across stages (issue 19, item 11): converged only when every system's latest
accurate ratio reaches the threshold; no status line says "not converged: stage N converged".

Stats are made as ``dpsnake select`` makes them (``candidates.decide_from_stats`` on the real config
checker's output), iteration after iteration, with the stage sequence ``dpsnake plan`` derives."""

from __future__ import annotations

import copy
import pathlib

import pytest
import yaml

from dpsnake.report import decision as report_decision
from dpsnake.workflow.candidates import decide_from_stats
from dpsnake.workflow.config import check
from dpsnake.workflow.convergence import latest_ratios, run_decision, verdict
from dpsnake.workflow.plan import iteration_stage

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cfg(tmp_path, stages, threshold=0.95, max_iterations=5):
    raw = copy.deepcopy(yaml.safe_load((ROOT / "tests" / "configs" / "reduced.yaml").read_text()))
    raw["explore"]["stages"] = [{"temperatures": [300], "nsteps": 10, **s} for s in stages]
    raw["convergence"] = {"accurate_ratio": threshold, "max_iterations": max_iterations}
    return check(raw, tmp_path)


def _history(cfg, ratios: list[dict]) -> list[dict]:
    """stats.json of consecutive iterations: ratios[i] = {system: accurate ratio} of the systems the
    stage of iteration i explores (the stage comes from the previous decision, as in `dpsnake plan`)."""
    out = []
    for it, r in enumerate(ratios):
        stage, stage_it = iteration_stage(cfg, out[-1] if out else None)
        explored = cfg["explore"]["stages"][stage]["systems"]
        assert sorted(r) == sorted(explored), (it, stage, explored)
        st = {
            "iteration": it,
            "stage": stage,
            "stage_iteration": stage_it,
            "systems": {n: {"accurate_ratio": v} for n, v in r.items()},
        }
        st.update(decide_from_stats(cfg, st))
        out.append(st)
    return out


def test_last_stage_of_one_system_is_not_converged(tmp_path):
    """The issue's case: stage 1 explores Cu only and reaches the threshold; CuNi's last ratio was 0.435."""
    cfg = _cfg(tmp_path, [{"systems": ["Cu", "CuNi"], "max_iterations": 1}, {"systems": ["Cu"]}])
    hist = _history(cfg, [{"Cu": 0.97, "CuNi": 0.435}, {"Cu": 0.99}])
    assert hist[-1]["converged"] and hist[-1]["stop"]  # select's per-stage verdict
    d = run_decision(hist, 0.95, cfg)
    assert not d["converged"] and d["stop"] and d["below"] == ["CuNi"]
    assert d["latest"] == {
        "Cu": {"iteration": 1, "stage": 1, "accurate_ratio": 0.99},
        "CuNi": {"iteration": 0, "stage": 0, "accurate_ratio": 0.435},
    }
    assert verdict(d) == "stopped, not converged"
    assert "CuNi 0.435 (iteration 0)" in d["reason"] and "stage 1" in d["reason"]
    assert "converged" not in d["reason"]
    # the report's table: when each system was last explored, and with what ratio
    t = report_decision.latest_table(d).set_index("system")
    assert t.at["CuNi", "last_explored"] == 0 and t.at["CuNi", "accurate_ratio"] == 0.435
    assert t.at["CuNi", "reached"] == "no" and t.at["Cu", "reached"] == "yes"


def test_converged_when_every_latest_ratio_reaches_the_threshold(tmp_path):
    cfg = _cfg(tmp_path, [{"systems": ["Cu", "CuNi"], "max_iterations": 2}, {"systems": ["Cu"]}])
    hist = _history(cfg, [{"Cu": 0.5, "CuNi": 0.6}, {"Cu": 0.96, "CuNi": 0.97}, {"Cu": 0.98}])
    d = run_decision(hist, 0.95, cfg)
    assert d["converged"] and d["stop"] and d["below"] == []
    assert (
        d["reason"] == "every system's latest accurate ratio >= 0.95: Cu 0.980 (iteration 2), CuNi 0.970 (iteration 1)"
    )
    assert report_decision.line(d).startswith("converged: ")
    # the earlier iterations, as their reports say them
    d0 = run_decision(hist[:1], 0.95, cfg)
    assert report_decision.line(d0) == (
        "not converged: accurate ratio below 0.95: Cu 0.500 (iteration 0), CuNi 0.600 (iteration 0); repeating stage 0"
    )
    d1 = run_decision(hist[:2], 0.95, cfg)
    assert (
        report_decision.line(d1) == "not converged: stage 0 done (its systems' accurate ratio >= 0.95); next: stage 1"
    )
    assert report_decision.link_word(d0) == "stage 0 again" and report_decision.link_word(d1) == "next: stage 1"


@pytest.mark.parametrize("case", ["max_iterations", "plan_exhausted"])
def test_no_line_says_not_converged_stage_converged(tmp_path, case):
    """select's words 'stopped: max_iterations 2 reached (stage 0 converged)' and 'stage 0 converged ...;
    next: stage 1' become lines that never pair 'not converged' with a stage 'converged'."""
    if case == "max_iterations":
        cfg = _cfg(tmp_path, [{"systems": ["Cu", "CuNi"]}, {"systems": ["Cu"]}], max_iterations=1)
        hist = _history(cfg, [{"Cu": 0.99, "CuNi": 0.98}])
        assert "stage 0 converged" in hist[-1]["reason"]  # what select records
        want = (
            "stopped, not converged: max_iterations 1 reached before the last stage of the plan ran "
            "(every system's latest accurate ratio >= 0.95)"
        )
    else:
        cfg = _cfg(tmp_path, [{"systems": ["Cu", "CuNi"]}, {"systems": ["CuNi"], "max_iterations": 2}])
        hist = _history(cfg, [{"Cu": 0.99, "CuNi": 0.98}, {"CuNi": 0.5}, {"CuNi": 0.6}])
        assert "stage 0 converged" in hist[0]["reason"]
        want = (
            "stopped, not converged: exploration plan exhausted (the last stage, stage 1, used its iterations); "
            "latest accurate ratio below 0.95: CuNi 0.600 (iteration 2)"
        )
    lines = [report_decision.line(run_decision(hist[: k + 1], 0.95, cfg)) for k in range(len(hist))]
    assert lines[-1] == want
    for line in lines:  # after the verdict, the reason never calls anything "converged"
        word, reason = line.split(": ", 1)
        assert word in ("not converged", "stopped, not converged") and "converged" not in reason, line


def test_latest_ratio_without_frames_counts_as_below(tmp_path):
    hist = [
        {
            "iteration": 0,
            "stage": 0,
            "stage_iteration": 0,
            "converged": True,
            "stop": True,
            "next_stage": None,
            "reason": "x",
            "systems": {"Cu": {"accurate_ratio": None}},
        }
    ]
    assert latest_ratios(hist)["Cu"]["iteration"] == 0
    d = run_decision(hist, 0.9)  # no config: the recorded stop / next_stage are used
    assert not d["converged"] and d["below"] == ["Cu"]
