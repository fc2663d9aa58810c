"""The SLURM profile against a real single-node SLURM on localhost (scripts/slurm-local.sh).

Needs root and Debian's slurmctld, slurmd, slurm-client and munge (tests/run.sh installs them); skipped
with the reason otherwise. The cluster is started once per session and stopped at the end (only the
daemons the script started).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm-local.sh"
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "munged")

# Settings for the one-node test cluster on top of profiles/slurm (command-line options override the
# profile's top-level keys only; the profile's resources, retries and groups are used as shipped):
# 2 CPUs cap threads and the width of a grouped job; no slurmdbd, so job status comes from squeue;
# a short first status check keeps the test fast; no account exists.
TEST_SITE_ARGS = [
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "3",
    "--slurm-no-account",
    "--slurm-keep-successful-logs",
]

# The plugin polls squeue at growing intervals (the initial one, then 10 s longer after every check that
# saw no job end, up to 180 s): right for a cluster, but most of the wall time of a test whose jobs take
# seconds (a 3 s job was seen as done after 33 s). The workflow tests run Snakemake with the interval
# capped at POLL_S (squeue on the local controller is cheap); everything else is the plugin as shipped.
POLL_S = 2
SNAKEMAKE = [
    sys.executable,
    "-c",
    "import sys\n"
    "from snakemake_executor_plugin_slurm import Executor\n"
    "p = Executor.next_seconds_between_status_checks\n"
    f"Executor.next_seconds_between_status_checks = property(lambda e: min(p.fget(e), {POLL_S}), p.fset)\n"
    "from snakemake.cli import main\n"
    "main()\n",
]


def _missing() -> str | None:
    if os.name != "posix" or os.geteuid() != 0:
        return "the local SLURM needs root (daemons, /etc/slurm, /etc/munge)"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (
            f"missing {' '.join(missing)}: apt-get install -y slurmctld slurmd slurm-client munge "
            "(tests/run.sh does it)"
        )
    return None


def _sh(*args, check=True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, **kw)


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start the local SLURM for the session; yield sinfo's view of the node; stop it afterwards."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    was_running = "slurmctld: running (pid" in _sh("bash", str(SCRIPT), "status", check=False).stdout
    start = _sh("bash", str(SCRIPT), "start", check=False)
    if start.returncode != 0:
        pytest.fail(f"scripts/slurm-local.sh start failed:\n{start.stdout}\n{start.stderr}")
    node = _sh("scontrol", "show", "node", "localhost").stdout
    yield {"node": node}
    if not was_running:  # leave a cluster someone started before the tests alone
        stop = _sh("bash", str(SCRIPT), "stop", check=False)
        assert stop.returncode == 0, stop.stderr


def squeue_jobs() -> list[dict]:
    """All jobs the controller still knows (MinJobAge keeps finished ones): id, name, state, cpus,
    memory, GRES, time limit, comment (the plugin puts the rule or group name there)."""
    out = _sh("squeue", "--states=all", "--noheader", "--format=%i|%j|%T|%C|%m|%b|%l|%k").stdout
    keys = ("id", "name", "state", "cpus", "mem", "gres", "limit", "comment")
    return [dict(zip(keys, line.split("|"))) for line in out.splitlines() if line.strip()]


@pytest.mark.slurm
def test_local_cluster_schedules_cpus_memory_and_gpus(slurm_cluster, tmp_path):
    node = slurm_cluster["node"]
    # the machine's CPUs, ~80% of its memory, two GPUs as GRES, one idle node
    assert f"CPUTot={os.cpu_count()}" in node
    mem_total_mb = int(re.search(r"MemTotal:\s+(\d+)", pathlib.Path("/proc/meminfo").read_text())[1]) / 1024
    real = int(re.search(r"RealMemory=(\d+)", node)[1])
    assert 0.75 * mem_total_mb < real < 0.85 * mem_total_mb
    assert "Gres=gpu:2" in node
    cfg = _sh("scontrol", "show", "config").stdout
    assert re.search(r"MinJobAge\s*=\s*3600", cfg)  # >= 3x the plugin's status delay: squeue status works

    # a GPU job is scheduled on the GPU-less node and sees its device, as on a cluster
    out = tmp_path / "gpu.out"
    _sh(
        "sbatch",
        "--wait",
        "--gres=gpu:1",
        "--cpus-per-task=1",
        "--mem=100",
        "-o",
        str(out),
        "--wrap",
        "echo CVD=$CUDA_VISIBLE_DEVICES SLURM_CPUS=$SLURM_CPUS_PER_TASK",
        timeout=120,
    )
    assert out.read_text().split() == ["CVD=0", "SLURM_CPUS=1"]
    out2 = tmp_path / "gpus.out"
    _sh(
        "sbatch",
        "--wait",
        "--gpus=2",
        "--mem=100",
        "-o",
        str(out2),
        "--wrap",
        "echo $CUDA_VISIBLE_DEVICES",
        timeout=120,
    )
    assert out2.read_text().strip() == "0,1"

    # requests beyond the node are refused at submission, not left pending forever
    for too_much in (["--cpus-per-task", str(os.cpu_count() + 1)], ["--gres=gpu:3"], ["--mem", str(real + 1)]):
        r = _sh("sbatch", *too_much, "--wrap", "true", check=False)
        assert r.returncode != 0 and "submission failed" in r.stderr, (too_much, r.stderr)

    # a failing job ends FAILED with its exit code and stays visible to squeue (the plugin's status source)
    r = _sh(
        "sbatch", "--parsable", "--wait", "--mem=100", "-o", "/dev/null", "--wrap", "exit 3", check=False, timeout=120
    )
    jobid = r.stdout.strip().split(";")[0]
    assert r.returncode == 3
    states = {j["id"]: j["state"] for j in squeue_jobs()}
    assert states[jobid] == "FAILED"


# --- the workflow on SLURM ---------------------------------------------------------------------------

# A labeler whose process dies once, as a DFT code or a node does: the first `dpsnake label` process to
# reach it claims a marker file and exits with code 42 (os._exit: nothing can catch it, so the SLURM
# job fails); every later call is plain EMT. The workflow must report that job and retry it.
CRASH_ONCE = """
import json
import os
import sys

from ase.calculators.emt import EMT


class CrashOnceEMT(EMT):
    def __init__(self, marker, **kwargs):
        super().__init__(**kwargs)
        self.marker = marker

    def calculate(self, *args, **kwargs):
        if len(sys.argv) > 1 and sys.argv[1] == "label":
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                print("CrashOnceEMT: dying on purpose", file=sys.stderr, flush=True)
                os._exit(42)
        super().calculate(*args, **kwargs)
"""

COPY = ("Snakefile", "workflow", "config", "envs", "profiles", "tests/configs")


def _workflow_copy(dest: pathlib.Path) -> pathlib.Path:
    """The workflow as a user checks it out (no results, no .snakemake) in a temporary folder."""
    for rel in COPY:
        src = REPO / rel
        if src.is_dir():
            shutil.copytree(src, dest / rel, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _minutes(limit: str) -> int:
    """squeue's time limit ([D-]H:MM:SS or M:SS) in minutes."""
    days, _, hms = limit.rpartition("-")
    parts = [int(x) for x in hms.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * 1440 + parts[0] * 60 + parts[1] + (parts[2] > 0)


def _log_blocks(log: str) -> list[tuple[str, str, str]]:
    """(kind, rule, wildcards) of every job the main Snakemake process started: kind is 'rule' or
    'checkpoint' (handed to the executor, alone or in a group) or 'localrule' (run in the process).
    Logs of failed jobs that Snakemake prints (show-failed-logs) are left out."""
    log = re.sub(r"^ *Logfile .*:\n *={20,}\n.*?^ *={20,}\n", "", log, flags=re.M | re.S)
    blocks = []
    for m in re.finditer(r"^( *)(localrule|rule|checkpoint) (\w+):\n((?:\1    .*\n)+)", log, re.M):
        wc = re.search(r"^ +wildcards: (.*)$", m[4], re.M)
        blocks.append((m[2], m[3], wc[1] if wc else ""))
    return blocks


@pytest.mark.slurm
@pytest.mark.slow
def test_reduced_workflow_through_sbatch(slurm_cluster, tmp_path):
    """The reduced config through `snakemake --profile profiles/slurm`: every job is an sbatch job, GPU
    rules get GPUs, label jobs are grouped, a crashing label job is reported and retried, and the
    results are those of a complete run (two iterations, datasets, reports, final models).

    Then, in the same folder (its trained models and data), iteration 0 is explored again with
    explore.shards: 2: one sbatch job per shard, each asking for one GPU (GRES), joined in the Snakemake
    process. One shard's job is cancelled while it runs (scancel: SIGTERM, as for a node going away or a
    time limit): Snakemake resubmits that shard alone and it resumes from its checkpoint. The walkers
    equal the unsharded exploration's, walker by walker."""
    import yaml

    wf = _workflow_copy(tmp_path / "wf")
    (tmp_path / "py").mkdir()
    (tmp_path / "py" / "crashonce.py").write_text(CRASH_ONCE)
    marker = tmp_path / "crashed.marker"
    cfg = yaml.safe_load((wf / "tests/configs/reduced.yaml").read_text())
    cfg["label"] = {**cfg["label"], "calculator": "crashonce.CrashOnceEMT", "kwargs": {"marker": str(marker)}}
    (wf / "slurm-test.yaml").write_text(yaml.safe_dump(cfg))

    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path / "py"), os.environ.get("PYTHONPATH")]))
    )
    cmd = [*SNAKEMAKE, "--profile", "profiles/slurm", "--configfile", "slurm-test.yaml", *TEST_SITE_ARGS]
    cmd[cmd.index("--slurm-init-seconds-before-status-checks") + 1] = "1"
    t0 = time.monotonic()
    run = subprocess.run(cmd, cwd=wf, env=env, capture_output=True, text=True, timeout=1200)
    wall = time.monotonic() - t0
    log = run.stderr
    (tmp_path / "snakemake.log").write_text(log)
    assert run.returncode == 0, f"snakemake failed after {wall:.0f} s:\n{log[-6000:]}"
    print(f"reduced workflow on SLURM: {wall:.0f} s")

    # --- every job went through sbatch --------------------------------------------------------------
    blocks = _log_blocks(log)
    local = {rule for kind, rule, _ in blocks if kind == "localrule"}
    assert local == {"all"}, f"jobs run outside SLURM: {local}"
    submitted = set(re.findall(r"has been submitted with SLURM jobid (\d+)", log))
    jobs = [j for j in squeue_jobs() if j["id"] in submitted]
    assert len(jobs) == len(submitted) > 0
    assert all(j["name"] == jobs[0]["name"] for j in jobs)  # the run's UUID: one Snakemake run
    rules_run = {rule for kind, rule, _ in blocks if kind != "localrule"}
    assert {
        "init_data",
        "train",
        "plan",
        "explore",
        "select",
        "label",
        "collect",
        "report_iteration",
        "finalize",
        "report_run",
    } <= rules_run
    by_comment: dict[str, list[dict]] = {}
    for j in jobs:
        by_comment.setdefault(j["comment"].split("_wildcards")[0], []).append(j)
    # one SLURM job per non-label job, and at least one for each label group
    non_label = [b for b in blocks if b[0] != "localrule" and b[1] != "label"]
    assert sum(len(v) for k, v in by_comment.items() if k != "rule_label_label") == len(non_label)

    # --- per-rule resources from the profile ----------------------------------------------------------
    for j in by_comment["rule_train"] + by_comment["rule_explore"]:
        assert j["gres"] == "gres:gpu:1", j
        assert j["cpus"] == "1" and j["mem"] == "8000M", j
    for j in by_comment["rule_select"] + by_comment["rule_collect"]:
        assert j["gres"] == "N/A" and j["mem"] == "2000M", j

    # --- grouping: several label jobs per sbatch job ------------------------------------------------------
    label_jobs = {wc for kind, rule, wc in blocks if rule == "label" and wc}  # error listings: no wc
    groups = by_comment["rule_label_label"]
    ok_groups = [g for g in groups if g["state"] == "COMPLETED"]
    assert len(label_jobs) >= 4 and len(ok_groups) < len(label_jobs)
    n_grouped = 0
    for g in ok_groups:
        glog = next((wf / ".snakemake/slurm_logs").glob(f"group_label_*/{g['id']}.log")).read_text()
        n = len(re.findall(r"^rule label:", glog, re.M))
        assert n >= 2, glog[-2000:]
        n_grouped += n
        # the plugin runs a group's jobs one after another: 1 CPU, the sum of the label runtimes (30 min)
        assert g["cpus"] == "1" and _minutes(g["limit"]) == 30 * n, g
    assert n_grouped == len(label_jobs)

    # --- the crashing label job: reported, retried, nothing lost ------------------------------------------
    assert marker.exists(), "the crashing labeler never ran"
    failed = [j for j in jobs if j["state"] == "FAILED"]
    assert [j["comment"] for j in failed] == ["rule_label_label"], failed
    assert re.search(rf"Error in group label\n\s+log: \S+/{failed[0]['id']}\.log", log), "failure not reported"
    assert "Trying to restart job" in log
    # retried (profile: retries 2) once, with the memory of attempt 2 ("2000 * attempt" per label)
    assert failed[0]["mem"] == "2000M" and sum(g["mem"] == "4000M" for g in ok_groups) == 1
    flog = next((wf / ".snakemake/slurm_logs").glob(f"group_label_*/{failed[0]['id']}.log")).read_text()
    assert "CrashOnceEMT" in flog or "exit status 42" in flog, flog[-2000:]

    _check_results(wf)

    _sharded_exploration_with_a_cancelled_shard(wf, cmd, env)


def _check_results(wf: pathlib.Path) -> None:
    """The local end-to-end test's checks (tests/test_workflow.py: iterations, stats, labels, datasets
    without duplicates, provenance, final models, reports), plus: every label, the crashed-and-retried
    one included, is EMT's answer."""
    import numpy as np
    from ase.calculators.emt import EMT
    from test_workflow import _cfg, check_results

    from dpsnake.labelers.io import read_labeled

    stats = check_results(wf, _cfg())
    assert sorted(stats) == [0, 1]
    labels = sorted((wf / "results").glob("iter.*/label/task.*.extxyz"))
    assert len(labels) == sum(len(st["tasks"]) for st in stats.values()) > 0
    for path in labels:
        atoms, ok, reason = read_labeled(path)
        assert ok, (path, reason)
        ref = atoms.copy()
        ref.calc = EMT()
        assert abs(atoms.get_potential_energy() - ref.get_potential_energy()) < 1e-6
        assert np.abs(atoms.get_forces() - ref.get_forces()).max() < 1e-6


def _sharded_exploration_with_a_cancelled_shard(wf: pathlib.Path, cmd: list[str], env: dict) -> None:
    """Iteration 0's exploration again, in the finished run's folder (its models, its initial data),
    with explore.shards: 2 and a longer run (600 steps, so that a shard can be cancelled while it runs):
    plan (new shards.json), two explore_shard jobs, one cancelled and resubmitted, explore_merge."""
    from test_workflow_shards import assert_same_as_unsharded, sharded_config

    shutil.copy(wf / "slurm-test.yaml", wf / "reduced.yaml")  # sharded_config edits reduced.yaml
    sharded_config(wf, shards=2, nsteps=600)
    ex = wf / "results/iter.000000/explore"
    shutil.rmtree(ex)  # walkers, shards.json (one shard), frames: planned and explored again
    target = str(ex.relative_to(wf) / "summary.json")
    cmd = [*cmd[: cmd.index("slurm-test.yaml")], "reduced.yaml", *cmd[cmd.index("slurm-test.yaml") + 1 :]]
    with open(wf.parent / "sharded.log", "w+") as err:
        p = subprocess.Popen([*cmd, target], cwd=wf, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        cancelled = None
        t0 = time.monotonic()
        try:
            while cancelled is None:  # cancel the first shard job seen running, once it has written frames
                assert p.poll() is None and time.monotonic() - t0 < 900, "no shard job to cancel"
                for j in squeue_jobs():
                    k = re.fullmatch(r"rule_explore_shard_wildcards_\d+_(\d+)", j["comment"])
                    if j["state"] == "RUNNING" and k and (ex / "shards.json").is_file():
                        first = json.loads((ex / "shards.json").read_text())["shards"][int(k[1])]["walkers"][0]
                        part = ex / first / "model_devi.out.part"
                        if part.is_file() and part.read_text().count("\n") > 15:
                            _sh("scancel", j["id"])
                            cancelled = (j["id"], int(k[1]))
                            break
                time.sleep(0.2)
            p.wait(timeout=900)
        finally:
            if p.poll() is None:
                p.kill()
        err.seek(0)
        log = err.read()
    assert p.returncode == 0, log[-6000:]
    blocks = _log_blocks(log)
    shard_runs = sorted(wc for _, rule, wc in blocks if rule == "explore_shard")
    assert {rule for kind, rule, _ in blocks if kind == "localrule"} == {"explore_merge"}
    assert {rule for kind, rule, _ in blocks if kind != "localrule"} == {"plan", "explore_shard"}
    submitted = set(re.findall(r"has been submitted with SLURM jobid (\d+)", log))
    jobs = [j for j in squeue_jobs() if j["id"] in submitted and j["comment"].startswith("rule_explore_shard")]
    # three shard jobs, each with one GPU: the two shards, and the cancelled one again
    assert len(jobs) == 3 and len(shard_runs) >= 2, (jobs, shard_runs)
    assert all(j["gres"] == "gres:gpu:1" and j["cpus"] == "1" for j in jobs), jobs
    states = sorted(j["state"] for j in jobs)
    assert states == ["CANCELLED", "COMPLETED", "COMPLETED"], jobs
    assert [j["comment"] for j in jobs if j["state"] == "CANCELLED"][0].endswith(f"_{cancelled[1]}")
    again = wf / f"logs/iter.000000/explore.shard.{cancelled[1]}.log"
    step = int(re.search(r"resumed from \S+ at step (\d+)", again.read_text())[1])
    assert 0 < step < 600
    assert_same_as_unsharded(wf, 2)
