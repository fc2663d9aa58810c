"""The SLURM profile against a real single-node SLURM on localhost (scripts/slurm-local.sh).

Needs root and Debian's slurmctld, slurmd, slurm-client and munge (tests/run.sh installs them); skipped
with the reason otherwise. The cluster is started once per session and stopped at the end (only the
daemons the script started).
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm-local.sh"
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "munged")

# Settings for the one-node test cluster on top of profiles/slurm (command-line options override the
# profile's top-level keys only; the profile's resources, retries and groups are used as shipped):
# 2 CPUs cap threads and the width of a grouped job; no slurmdbd, so job status comes from squeue;
# a short first status check keeps the test fast; no account exists.
TEST_SITE_ARGS = [
    "--slurm-status-command", "squeue",
    "--slurm-init-seconds-before-status-checks", "3",
    "--slurm-no-account",
    "--slurm-keep-successful-logs",
]


def _missing() -> str | None:
    if os.name != "posix" or os.geteuid() != 0:
        return "the local SLURM needs root (daemons, /etc/slurm, /etc/munge)"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (f"missing {' '.join(missing)}: apt-get install -y slurmctld slurmd slurm-client munge "
                "(tests/run.sh does it)")
    return None


def _sh(*args, check=True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, **kw)


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start the local SLURM for the session; yield sinfo's view of the node; stop it afterwards."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    start = _sh("bash", str(SCRIPT), "start", check=False)
    if start.returncode != 0:
        pytest.fail(f"scripts/slurm-local.sh start failed:\n{start.stdout}\n{start.stderr}")
    node = _sh("scontrol", "show", "node", "localhost").stdout
    yield {"node": node}
    stop = _sh("bash", str(SCRIPT), "stop", check=False)
    assert stop.returncode == 0, stop.stderr


def squeue_jobs() -> list[dict]:
    """All jobs the controller still knows (MinJobAge keeps finished ones): id, name, state, cpus,
    memory, GRES, comment (the plugin puts the rule or group name there)."""
    out = _sh("squeue", "--states=all", "--noheader", "--format=%i|%j|%T|%C|%m|%b|%k").stdout
    keys = ("id", "name", "state", "cpus", "mem", "gres", "comment")
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
    _sh("sbatch", "--wait", "--gres=gpu:1", "--cpus-per-task=1", "--mem=100", "-o", str(out),
        "--wrap", "echo CVD=$CUDA_VISIBLE_DEVICES SLURM_CPUS=$SLURM_CPUS_PER_TASK", timeout=120)
    assert out.read_text().split() == ["CVD=0", "SLURM_CPUS=1"]
    out2 = tmp_path / "gpus.out"
    _sh("sbatch", "--wait", "--gpus=2", "--mem=100", "-o", str(out2), "--wrap", "echo $CUDA_VISIBLE_DEVICES",
        timeout=120)
    assert out2.read_text().strip() == "0,1"

    # requests beyond the node are refused at submission, not left pending forever
    for too_much in (["--cpus-per-task", str(os.cpu_count() + 1)], ["--gres=gpu:3"], ["--mem", str(real + 1)]):
        r = _sh("sbatch", *too_much, "--wrap", "true", check=False)
        assert r.returncode != 0 and "submission failed" in r.stderr, (too_much, r.stderr)

    # a failing job ends FAILED with its exit code and stays visible to squeue (the plugin's status source)
    r = _sh("sbatch", "--parsable", "--wait", "--mem=100", "-o", "/dev/null", "--wrap", "exit 3", check=False,
            timeout=120)
    jobid = r.stdout.strip().split(";")[0]
    assert r.returncode == 3
    states = {j["id"]: j["state"] for j in squeue_jobs()}
    assert states[jobid] == "FAILED"
