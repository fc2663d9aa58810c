"""``dpsnake status`` on a small hand-made results tree (no models): the per-iteration lines, with the
candidates left out because their label failed before (``failed_before`` of stats.json, issue 19 item 5)."""

from __future__ import annotations

import json

from dpsnake.cli import main


def _stats(it: int, failed_before: dict[str, int]) -> dict:
    """stats.json as `dpsnake select` writes it (the fields status reads)."""
    systems = {
        n: {
            "accurate": 8,
            "candidate": 2,
            "failed": 0,
            "total": 10,
            "accurate_ratio": 0.8,
            "candidate_ratio": 0.2,
            "failed_ratio": 0.0,
            "trust_lo": 0.05,
            "trust_hi": 0.15,
            "filtered": 0,
            "duplicates": 0,
            "failed_before": k,
            "selected": 2 - k,
        }
        for n, k in failed_before.items()
    }
    return {
        "iteration": it,
        "stage": 0,
        "stage_iteration": it,
        "systems": systems,
        "walkers": {},
        "converged": False,
        "stop": False,
        "next_stage": 0,
        "tasks": [],
        "reason": "accurate ratio below 0.95: Cu 0.800; repeating stage 0",
    }


def test_status_counts_failed_before_per_iteration(tmp_path, capsys):
    res = tmp_path / "results"
    for it, fb in enumerate([{"Cu": 0, "CuNi": 0}, {"Cu": 2, "CuNi": 1}]):
        d = res / f"iter.{it:06d}" / "select"
        d.mkdir(parents=True)
        (d / "stats.json").write_text(json.dumps(_stats(it, fb)))
    assert main(["status", "--results-dir", str(res)]) == 0
    lines = capsys.readouterr().out.splitlines()
    it0 = next(ln for ln in lines if ln.startswith("iteration 0: "))
    it1 = next(ln for ln in lines if ln.startswith("iteration 1: "))
    assert "failed_before" not in it0  # nothing left out: no words
    assert it1.startswith("iteration 1: selected; not converged: ")
    assert it1.endswith("; failed_before 3 (candidates not picked again: their label failed in an earlier iteration)")
