"""The training server (``train.server``, issue 17: a training job's start): real `dpsnake train` jobs with
real DeePMD-kit training (tiny models, a few steps), once in a new process and once in a worker forked from
a server that imported DeePMD-kit before; the same lcurve.out and model, DeePMD-kit's failures reported
the same way, a killed job takes its worker with it, and an idle server exits.

Each test gives its jobs a private ``TMPDIR`` (the server's socket folder), so servers of other tests and
sessions are never reached.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from dpmodels import emt_dataset
from test_train_continue import _cfg

from dpsnake.workflow.train_server import server_choice


@pytest.fixture
def sockdir():
    d = pathlib.Path(tempfile.mkdtemp(prefix="dps", dir="/tmp"))  # short: Unix socket paths <= 107 bytes
    yield d
    for log in d.rglob("*.log"):  # the servers this test started
        for pid in re.findall(r"train server pid (\d+)", log.read_text()):
            try:
                os.kill(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass
    shutil.rmtree(d, ignore_errors=True)


def _with_server(tmp: pathlib.Path, backend: str, server) -> pathlib.Path:
    cfg = _cfg(tmp, backend)
    raw = json.loads(cfg.read_text())
    raw["train"]["server"] = server
    path = tmp / f"config.{backend}.{server}.json"
    path.write_text(json.dumps(raw))
    return path


def _cmd(cfg, it: int, outdir: pathlib.Path, data: list, init_from=None) -> list:
    cmd = [sys.executable, "-m", "dpsnake.cli", "train", "--config", str(cfg), "--iter", str(it)]
    cmd += ["--model", "0", "--outdir", str(outdir), "--threads", "1", "--data", *map(str, data)]
    return cmd + (["--init-from", str(init_from)] if init_from else [])


def _env(sockdir: pathlib.Path, idle: float = 60) -> dict:
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", TMPDIR=str(sockdir), DPSNAKE_TRAIN_SERVER_IDLE=str(idle))


def _run(cfg, it, outdir, data, sockdir, ok=True, init_from=None, idle=60, cwd=None):
    cmd = _cmd(cfg, it, outdir, data, init_from)
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(sockdir, idle), cwd=cwd)
    if ok:
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p


def _wait_server(sockdir: pathlib.Path, timeout: float = 120) -> pathlib.Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if socks := list(sockdir.rglob("*.sock")):
            return socks[0]
        time.sleep(0.2)
    logs = "".join(p.read_text() for p in sockdir.rglob("*.log"))
    raise AssertionError(f"no training server within {timeout} s; its log: {logs[-2000:]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("backend", ["tf", "pt"])
def test_a_worker_trains_the_same_model_as_a_new_process(tmp_path, model_cache, sockdir, backend):
    data = [emt_dataset(model_cache, "Cu")]
    alone = tmp_path / "alone"
    p = _run(_with_server(tmp_path, backend, False), 0, alone, data, sockdir)
    assert "DeePMD-kit in a new process (train.server: false)" in p.stdout
    assert not list(sockdir.rglob("*.sock"))

    on = _with_server(tmp_path, backend, True)
    first = _run(on, 0, tmp_path / "first", data, sockdir)  # starts the server and waits for its import
    sock = _wait_server(sockdir)
    assert f"DeePMD-kit in a worker of the training server {sock.name} (train.server: true; waited " in first.stdout
    served = tmp_path / "served"
    p = _run(on, 0, "served", data, sockdir, cwd=tmp_path)  # relative, as the rules give it
    assert f"DeePMD-kit in a worker of the training server {sock.name}" in p.stdout, p.stdout[-3000:]
    worker = int(re.search(r"train: worker pid (\d+)", p.stdout)[1])
    server = int(re.search(r"train server pid (\d+)", sock.with_suffix(".log").read_text())[1])
    assert worker != server and _alive(server) and not _alive(worker)
    assert "+ dp convert-backend" in p.stdout and "train: wrote" in p.stdout
    # bit for bit: the loss and learning rate of every step (disp_freq 1), and the model's numbers
    lcurve = (alone / "lcurve.out").read_text()
    assert len([r for r in lcurve.splitlines() if not r.startswith("#")]) >= 6  # disp_freq 1, 6 steps
    assert (served / "lcurve.out").read_text() == lcurve == (tmp_path / "first" / "lcurve.out").read_text()
    from deepmd.dpmodel.utils.serialization import load_dp_model

    a, b = load_dp_model(str(alone / "model.dp")), load_dp_model(str(served / "model.dp"))
    assert json.dumps(a["model"], default=repr, sort_keys=True) == json.dumps(b["model"], default=repr, sort_keys=True)


def test_a_deepmd_failure_in_a_worker_ends_with_its_cause(tmp_path, model_cache, sockdir):
    """As test_train_rerun's new-process case: the last line names DeePMD-kit's exception."""
    data = [emt_dataset(model_cache, "Cu")]
    on = _with_server(tmp_path, "tf", True)
    _run(on, 0, tmp_path / "first", data, sockdir)
    _wait_server(sockdir)
    prev = tmp_path / "prev"
    prev.mkdir()
    (prev / "input.json").write_text(json.dumps({"training": {"numb_steps": 6}}))  # no frozen model in it
    p = _run(on, 1, tmp_path / "model.0", data, sockdir, ok=False, init_from=prev)
    assert p.returncode != 0 and "worker of the training server" in p.stdout
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("dpsnake train: error: dp train: RuntimeError: The input frozen model "), last
    assert "does not exist" in last and "frozen_model.pb" in last


# the server's idle time there: longer than the first job takes on a loaded machine (the server, started
# by it, must still be there when it ends), short enough to wait for its exit
IDLE = 30


def test_a_killed_job_takes_its_worker_and_an_idle_server_exits(tmp_path, model_cache, sockdir):
    data = [emt_dataset(model_cache, "Cu")]
    on = _with_server(tmp_path, "pt", True)
    _run(on, 0, tmp_path / "first", data, sockdir, idle=IDLE)
    sock = _wait_server(sockdir)
    raw = json.loads(on.read_text())
    raw["train"]["numb_steps"] = 10**7  # runs until killed
    long_cfg = tmp_path / "long.json"
    long_cfg.write_text(json.dumps(raw))
    log = tmp_path / "long.log"
    with open(log, "w") as out:
        job = subprocess.Popen(
            _cmd(long_cfg, 0, tmp_path / "long", data), stdout=out, stderr=subprocess.STDOUT, env=_env(sockdir, IDLE)
        )
    deadline = time.monotonic() + 120
    lcurve = tmp_path / "long" / "lcurve.out"  # written from the first step on (disp_freq 1)
    while not (lcurve.exists() and lcurve.stat().st_size > 200) and time.monotonic() < deadline:
        assert job.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    text = log.read_text()
    assert "worker of the training server" in text, text[-3000:]
    worker = int(re.search(r"train: worker pid (\d+)", text)[1])
    assert _alive(worker)
    job.send_signal(signal.SIGKILL)  # as a job is killed: no chance to clean up itself
    job.wait()
    assert _wait_gone(worker, 15), "the worker outlived its job"
    server = int(re.search(r"train server pid (\d+)", sock.with_suffix(".log").read_text())[1])
    assert _alive(server)
    assert _wait_gone(server, IDLE + 30), "the server did not exit after its idle time"
    assert not sock.exists() and "exits" in sock.with_suffix(".log").read_text()


def test_server_choice():
    hidden = {"CUDA_VISIBLE_DEVICES": ""}
    assert server_choice("auto", hidden) == (True, "train.server: auto")
    assert server_choice(True, hidden)[0] and not server_choice(False, hidden)[0]
    for batch in ("SLURM_JOB_ID", "PBS_JOBID"):
        use, why = server_choice("auto", dict(hidden, **{batch: "17"}))
        assert not use and batch in why
        assert server_choice(True, dict(hidden, **{batch: "17"}))[0]  # asked for explicitly
    gpu = os.path.exists("/dev/nvidiactl")
    assert server_choice("auto", {})[0] is not gpu  # a visible GPU: never (CUDA does not survive a fork)


def test_a_server_with_threads_after_the_import_refuses(tmp_path, model_cache, sockdir):
    """A fork copies only the calling thread: a server whose import left another thread running (here a
    sitecustomize starts one, as the CUDA driver did on a GPU machine before PYTORCH_NVML_BASED_CUDA_CHECK)
    serves no job, says why, and no job starts another one."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(600,), daemon=True, name='extra').start()\n"
    )
    data = [emt_dataset(model_cache, "Cu")]
    on = _with_server(tmp_path, "tf", True)
    env = dict(_env(sockdir), PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))

    def run(out):
        p = subprocess.run(_cmd(on, 0, tmp_path / out, data), capture_output=True, text=True, env=env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        return p.stdout

    for out in (run("first"), run("second")):  # the first waits for the server it started, then goes alone
        assert "DeePMD-kit in a new process (no training server here: threads ['main', " in out, out[:2000]
    refused = list(sockdir.rglob("*.refused"))
    assert refused and "a fork is not safe" in refused[0].read_text() and not list(sockdir.rglob("*.sock"))
    assert (
        len(list(sockdir.rglob("*.log"))) == 1
        and len(re.findall("train server pid", refused[0].with_suffix(".log").read_text())) == 1
    )


def test_no_server_where_its_socket_path_would_be_too_long(tmp_path, model_cache):
    long_tmp = tmp_path / ("x" * 60) / ("y" * 60)
    long_tmp.mkdir(parents=True)
    data = [emt_dataset(model_cache, "Cu")]
    p = _run(_with_server(tmp_path, "tf", True), 0, tmp_path / "m", data, long_tmp)
    assert "DeePMD-kit in a new process (no training server here: the socket path is longer than" in p.stdout
    assert not list(long_tmp.rglob("*.log"))  # none started
