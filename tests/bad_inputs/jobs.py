"""Faults inside the workflow's jobs (issue 19 items 2 and 6): file system faults in collect and label
(permission denied, a file in the way, a damaged label or stats file) are one line naming the path and
what to do; a job that fails inside Snakemake ends its log with ``dpsnake <cmd>: error: <cause>``, and
Snakemake's error output shows that line too.

Permission faults are real: as root (who may write anywhere) the command runs under ``setpriv`` without
the capabilities that override file modes, so a ``chmod 555`` folder refuses writes as it does for users.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pathlib
import shutil
import subprocess
import sys

import yaml

from bad_inputs import ROOT, Probe, dpsnake

REDUCED = ROOT / "tests" / "configs" / "reduced.yaml"
IT0 = pathlib.Path("results") / "iter.000000"


def _unprivileged() -> list[str]:
    """Command prefix under which file modes bind (root overrides them)."""
    if os.geteuid() != 0:
        return []
    import pytest

    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: a folder cannot refuse a write")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def _run(*args, cwd, prefix=(), timeout=600) -> tuple[int, str]:
    """``dpsnake ARGS`` (under ``prefix``); returns (exit code, stderr)."""
    p = subprocess.run(
        [*prefix, sys.executable, "-m", "dpsnake.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return p.returncode, p.stderr


@contextlib.contextmanager
def _read_only(folder: pathlib.Path):
    """``folder`` made read-only (chmod 555) for the block; writable again afterwards (cleanup)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    try:
        yield folder
    finally:
        if folder.exists():
            folder.chmod(0o755)


def _iteration(tmp: pathlib.Path, n: int = 2, label: bool = True) -> list[str]:
    """results/config.json, an iteration 0 selection of ``n`` Cu frames (as `dpsnake select` writes them:
    candidates + stats.json) and, with ``label``, their real EMT labels. Returns collect's arguments."""
    import ase.io
    from ase.build import bulk

    from dpsnake.workflow.config import check, write_if_changed

    raw = copy.deepcopy(yaml.safe_load(REDUCED.read_text()))
    write_if_changed(check(raw, tmp), tmp / "results" / "config.json")
    sel = tmp / IT0 / "select"
    (sel / "candidates").mkdir(parents=True)
    tasks = [f"{k:06d}" for k in range(n)]
    for k, t in enumerate(tasks):
        a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
        a.rattle(0.03 * k, seed=k)
        a.info = {"iteration": 0, "system": "Cu", "walker": "Cu.T300.r0", "step": 10 * k, "max_devi_f": 0.1, "task": t}
        ase.io.write(sel / "candidates" / f"task.{t}.extxyz", a, format="extxyz")
    stats = {
        "iteration": 0,
        "stage": 0,
        "stage_iteration": 0,
        "tasks": tasks,
        "converged": False,
        "stop": False,
        "next_stage": 0,
        "reason": "not converged",
        "walkers": {},
        "systems": {"Cu": {"selected": n, "accurate_ratio": 0.5}, "CuNi": {"selected": 0, "accurate_ratio": 0.5}},
    }
    (sel / "stats.json").write_text(json.dumps(stats))
    cands = [IT0 / "select" / "candidates" / f"task.{t}.extxyz" for t in tasks]
    labels = [IT0 / "label" / f"task.{t}.extxyz" for t in tasks]
    if label:
        rc, err = _run("label", "--config", "results/config.json", "--input", *cands, "--output", *labels, cwd=tmp)
        assert rc == 0, err
    return [
        "collect",
        "--config",
        "results/config.json",
        "--iter",
        0,
        "--stats",
        IT0 / "select" / "stats.json",
        "--labels",
        *labels,
        "--data-out",
        "results/data/iter.000000",
        "--summary",
        IT0 / "collect" / "summary.json",
    ]


def collect_data_not_writable(tmp):
    args = _iteration(tmp)
    with _read_only(tmp / "results" / "data"):
        return _run(*args, cwd=tmp, prefix=_unprivileged())


def label_folder_not_writable(tmp):
    _iteration(tmp, n=1, label=False)
    cand = IT0 / "select" / "candidates" / "task.000000.extxyz"
    with _read_only(tmp / IT0 / "label"):
        return _run(
            "label",
            "--config",
            "results/config.json",
            "--input",
            cand,
            "--output",
            IT0 / "label" / "task.000000.extxyz",
            cwd=tmp,
            prefix=_unprivileged(),
        )


def collect_summary_under_a_file(tmp):
    args = _iteration(tmp)
    (tmp / IT0 / "collect").write_text("a file where the collect folder belongs\n")
    return dpsnake(*args, cwd=tmp)


def collect_label_cut_short(tmp):
    args = _iteration(tmp)
    label = tmp / IT0 / "label" / "task.000001.extxyz"
    label.write_text(label.read_text()[:200])  # a copy that stopped half-way
    return dpsnake(*args, cwd=tmp)


def collect_stats_damaged(tmp):
    args = _iteration(tmp)
    (tmp / IT0 / "select" / "stats.json").write_text('{"iteration": 0, "tasks": [')
    return dpsnake(*args, cwd=tmp)


def _workflow(tmp):
    """A copy of the workflow (the package is installed) and the reduced config in ``tmp``."""
    for name in ("Snakefile", "workflow", "config", "profiles", "envs"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp / name)
    shutil.copy(REDUCED, tmp / "reduced.yaml")


def snakemake_results_not_writable(tmp):
    """results/ refuses the resolved config Snakemake writes before the first job: one last line."""
    _workflow(tmp)
    with _read_only(tmp / "results"):
        p = subprocess.run(
            [
                *_unprivileged(),
                sys.executable,
                "-m",
                "snakemake",
                "--profile",
                "profiles/local",
                "--configfile",
                "reduced.yaml",
                "--cores",
                "1",
            ],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert "Traceback" not in p.stderr and "PermissionError in file" not in p.stderr, p.stderr[-3000:]
    return p.returncode, p.stderr


def _snakemake_job_fails(tmp, rules: list[str], target, read_only: str, log: str) -> tuple[int, str]:
    """Snakemake makes ``target`` with only ``rules`` while the folder ``read_only`` refuses writes: the
    failed job's log ends with ``dpsnake <cmd>: error: <cause>``, and Snakemake's own error output (what the
    user sees) shows that line too, printed by the rule's failure tail (``|| { tail -n 1 {log} >&2 ...}``)
    and in Snakemake's copy of the log. Returns (exit code, the job's log)."""
    with _read_only(tmp / read_only):
        p = subprocess.run(
            [
                *_unprivileged(),
                sys.executable,
                "-m",
                "snakemake",
                "--profile",
                "profiles/local",
                "--configfile",
                "reduced.yaml",
                "--cores",
                "2",
                "--allowed-rules",
                *rules,
                "--",
                str(target),
            ],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=600,
        )
    text = (tmp / log).read_text()
    cause = [ln for ln in text.splitlines() if ln.strip()][-1]
    assert cause.startswith("dpsnake ") and ": error: " in cause, text
    shown = p.stdout + p.stderr
    assert shown.count(cause) >= 2, shown[-3000:]
    return p.returncode, text


def snakemake_collect_job_fails(tmp):
    """The collect job of a real Snakemake run cannot write results/data."""
    _workflow(tmp)
    _iteration(tmp, label=False)  # the select checkpoint's outputs; Snakemake runs the label jobs itself
    return _snakemake_job_fails(
        tmp, ["label", "collect"], IT0 / "collect" / "summary.json", "results/data", "logs/iter.000000/collect.log"
    )


def snakemake_plan_job_fails(tmp):
    """The plan job cannot write the iteration's explore folder."""
    _workflow(tmp)
    return _snakemake_job_fails(
        tmp, ["plan"], IT0 / "explore" / "walkers.json", IT0 / "explore", "logs/iter.000000/plan.log"
    )


def snakemake_init_data_job_fails(tmp):
    """The init_data job cannot write results/data/init."""
    _workflow(tmp)
    return _snakemake_job_fails(
        tmp, ["init_data"], "results/data/init/Cu", "results/data/init", "logs/init/init_data.Cu.log"
    )


PROBES = [
    Probe("job-collect-data-folder-not-writable", collect_data_not_writable, "chmod u+rwx results/data"),
    Probe("job-label-folder-not-writable", label_folder_not_writable, "results/iter.000000/label"),
    Probe("job-collect-folder-is-a-file", collect_summary_under_a_file, "results/iter.000000/collect"),
    Probe("job-collect-label-cut-short", collect_label_cut_short, "task.000001.extxyz"),
    Probe("job-collect-stats-damaged", collect_stats_damaged, "stats.json"),
    Probe(
        "job-snakemake-results-not-writable",
        snakemake_results_not_writable,
        "chmod u+rwx results",
        rc=None,
        one_line=False,
    ),
    Probe("job-snakemake-collect-fails", snakemake_collect_job_fails, "results/data", rc=None, one_line=False),
    Probe(
        "job-snakemake-plan-fails",
        snakemake_plan_job_fails,
        "chmod u+rwx results/iter.000000/explore",
        rc=None,
        one_line=False,
    ),
    Probe(
        "job-snakemake-init-data-fails",
        snakemake_init_data_job_fails,
        "chmod u+rwx results/data/init",
        rc=None,
        one_line=False,
    ),
]
