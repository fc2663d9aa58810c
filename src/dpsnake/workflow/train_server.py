"""A local process that keeps DeePMD-kit imported between training jobs (``train.server``).

Every training job pays the import of TensorFlow or torch + DeePMD-kit before its first step: 4-6 s on
the 2-core dev machine, 11-17 s on the H200 machine (docs/benchmarks.md), in each job of each iteration.
The server imports once, then forks one worker per job (a fork costs milliseconds); the worker runs the
``dp`` steps ``train_proc.run_steps`` would run in a new process, in the job's folder and environment,
and its output streams back into the job's log. The result is the same (lcurve.out bit for bit: tested).

Where it is used (``server_choice``): the server's address is derived from everything that is read at
import time (Python, DeePMD-kit, the backend, PYTHONPATH, thread counts, DeePMD-kit's switches), so a job
with another environment gets its own server; never where the training sees a GPU (a CUDA context does not
survive a fork); with ``auto`` not inside a batch system's job (SLURM_JOB_ID, ...: the job ends with its
training). The first job that finds no server starts one for the later jobs and trains the usual way.

Lifetime: a worker dies with its job (the job's end of the socket closes: the worker's process group is
killed); the server exits after ``IDLE_S`` seconds without a job (``DPSNAKE_TRAIN_SERVER_IDLE``).

Protocol (a Unix socket): the job sends one JSON line ``{"steps", "cwd", "env"}``; it receives the
worker's output, a first line ``\\0pid N`` and a last line ``\\0rc N`` (N < 0: killed by signal -N).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import pathlib
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

IDLE_S = float(os.environ.get("DPSNAKE_TRAIN_SERVER_IDLE", "120"))
# how long a job waits for a server that is importing DeePMD-kit (16-20 s on the H200 machine) before it
# trains in a new process
START_WAIT_S = 120.0
# environment read when TensorFlow / torch / DeePMD-kit are imported (prefixes and names)
IMPORT_ENV_PREFIXES = ("DP_", "TF_", "OMP_", "MKL_", "KMP_", "CUDA_", "TORCH", "PYTORCH", "PYTHON", "LD_")
IMPORT_ENV_NAMES = ("DEVICE", "NUM_WORKERS", "SAMPLER_RECORD", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "HOME")
# set inside jobs of batch systems: there a server would end with the job that started it
BATCH_ENV = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID", "FLUX_JOB_ID")
PID, RC = "\0pid ", "\0rc "


def server_choice(setting, env: dict) -> tuple[bool, str]:
    """Whether a job with environment ``env`` trains through the server, and why (for the log).
    ``setting``: the config's ``train.server`` (``auto``, true, false)."""
    if setting is False or os.name != "posix":
        return False, "train.server: false" if setting is False else "no fork on this system"
    if env.get("CUDA_VISIBLE_DEVICES") != "" and os.path.exists("/dev/nvidiactl"):
        return False, "the training sees a GPU (CUDA does not survive a fork)"
    if setting == "auto" and (batch := [k for k in BATCH_ENV if env.get(k)]):
        return False, f"inside a batch job ({batch[0]})"
    return True, "train.server: " + str(setting).lower()


def address(backend: str, env: dict) -> pathlib.Path:
    """The socket of the server for jobs with this backend and import-time environment."""
    import deepmd

    here = pathlib.Path(__file__)
    key = {
        "python": sys.executable,
        "deepmd": [deepmd.__version__, deepmd.__file__],
        "code": [here.stat().st_mtime_ns, here.with_name("train_proc.py").stat().st_mtime_ns],
        "backend": backend,
        "env": sorted((k, v) for k, v in env.items() if k.startswith(IMPORT_ENV_PREFIXES) or k in IMPORT_ENV_NAMES),
    }
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    folder = pathlib.Path(tempfile.gettempdir()) / f"dpsnake-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / f"train-{backend}-{digest}.sock"


def unusable(sock_path: pathlib.Path) -> str | None:
    """Why no server can listen at ``sock_path`` (None: it can)."""
    if sock_path.parent.stat().st_uid != os.getuid():
        return f"{sock_path.parent} belongs to another user"
    if len(os.fsencode(sock_path)) > 107:  # sun_path: 108 bytes with the terminating zero
        return f"the socket path is longer than a Unix socket's 107 bytes (TMPDIR={tempfile.gettempdir()})"
    if refused(sock_path).exists():
        return refused(sock_path).read_text()
    return None


def refused(sock_path: pathlib.Path) -> pathlib.Path:
    """The file a server leaves when it cannot serve (its reason inside): no more servers are started
    for this address."""
    return sock_path.with_suffix(".refused")


def connect(sock_path: pathlib.Path, steps: list[list[str]], cwd: pathlib.Path, env: dict):
    """Hand the job to the server at ``sock_path``; the open socket, or None when no server answers."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(sock_path))
        req = {"steps": steps, "cwd": str(pathlib.Path(cwd).resolve()), "env": env}  # the server has its own cwd
        s.sendall((json.dumps(req) + "\n").encode())
    except OSError:
        s.close()
        return None
    return s


def starting_or_running(sock_path: pathlib.Path) -> bool:
    """Whether a server holds the lock of this address (it is importing DeePMD-kit, or serving)."""
    with open(sock_path.with_suffix(".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
        return False


def wait_for(sock_path: pathlib.Path, steps, cwd, env, timeout: float = START_WAIT_S):
    """Hand the job to a server that is starting: the open socket once it listens, or None when it gives
    up (``.refused``), is gone, or is not there within ``timeout`` seconds."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if (sock := connect(sock_path, steps, cwd, env)) is not None:
            return sock
        # a server just started may not hold its lock yet: give it a few seconds
        if refused(sock_path).exists() or (time.monotonic() - t0 > 10 and not starting_or_running(sock_path)):
            return None
        time.sleep(0.2)
    return None


def start(sock_path: pathlib.Path, backend: str, env: dict) -> None:
    """Start a server for later jobs in the background (its own session, output to ``<socket>.log``); a
    second one started meanwhile by a concurrent job finds the lock taken and exits at once."""
    with open(sock_path.with_suffix(".log"), "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "dpsnake.workflow.train_server", str(sock_path), "--backend", backend],
            env=env,
            cwd=sock_path.parent,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


# ---------------------------------------------------------------------------------------------- server


def _preload(backend: str) -> None:
    from dpsnake.workflow.train_proc import serial_frame_loading

    serial_frame_loading()
    import deepmd.main  # noqa: F401 - the point: imported once, inherited by every worker

    if backend == "pt":
        import deepmd.pt.entrypoints.main  # noqa: F401
    else:
        import deepmd.tf.entrypoints.main  # noqa: F401


def _work(conn: socket.socket, req: dict) -> None:
    """The worker (a fork of the server with DeePMD-kit imported): the job's steps; never returns."""
    rc = 1
    try:
        os.setpgid(0, 0)  # its own group: a job that goes takes the worker's children too
        for fd in (1, 2):
            os.dup2(conn.fileno(), fd)
        sys.stdout.reconfigure(line_buffering=True)
        os.write(1, f"{PID}{os.getpid()}\n".encode())
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        # a new process would draw fresh global seeds; forks of one server would all share its state
        import random

        import numpy as np

        random.seed()
        np.random.seed()
        from deepmd.main import main

        sys.argv = ["dp"]
        for step in req["steps"]:
            print("+ dp " + " ".join(step), flush=True)
            main(step)
        rc = 0
    except SystemExit as err:
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr)
        rc = err.code if isinstance(err.code, int) else int(err.code is not None)
    except BaseException:  # noqa: BLE001 - reported as a new process would: traceback, exit code 1
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def _handle(conn: socket.socket) -> None:
    """One job (a fork of the server): read the request, fork the worker, watch it and the job's end of
    the socket, send the exit code; never returns."""
    try:
        line = conn.makefile("rb").readline()
        req = json.loads(line)
        worker = os.fork()
        if worker == 0:
            _work(conn, req)
        try:  # the worker's own group, set here too: a kill right after the fork must reach it
            os.setpgid(worker, worker)
        except OSError:
            pass
        while True:
            pid, status = os.waitpid(worker, os.WNOHANG)
            if pid:
                break
            # the job sends nothing after its request: readable = its end closed (killed or gone)
            if select.select([conn], [], [], 0.2)[0]:
                status = _kill_group(worker)
                break
        rc = os.waitstatus_to_exitcode(status)
        conn.sendall(f"{RC}{rc}\n".encode())
    except BaseException:  # noqa: BLE001 - logged in the server's log; the job sees no rc line
        traceback.print_exc()
    finally:
        os._exit(0)


def _kill_group(pid: int) -> int:
    """SIGTERM the process group of ``pid``, SIGKILL after 5 s; the wait status of ``pid``."""
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.killpg(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def _threads() -> list[str]:
    """The process's threads: ["main"] when there is only the one that runs this."""
    tasks = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [str(os.getpid())]
    return [
        "main" if int(t) == os.getpid() else pathlib.Path(f"/proc/self/task/{t}/comm").read_text().strip()
        for t in tasks
    ]


class _Unsafe(RuntimeError):
    pass


def _listen(sock_path: pathlib.Path, backend: str) -> socket.socket:
    """Import DeePMD-kit, check that forking this process is safe, listen at ``sock_path``."""
    # torch.cuda.is_available() (DeePMD-kit calls it on import) initialises the CUDA driver, which starts a
    # thread, even with CUDA_VISIBLE_DEVICES empty (seen on the H200 machine); NVML's device count does not
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    _preload(backend)
    if (threads := _threads()) != ["main"]:
        # a fork copies only the calling thread: a lock another one holds would never be released
        raise _Unsafe(f"threads {threads} after the import of DeePMD-kit: a fork is not safe")
    sock_path.unlink(missing_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(sock_path))
    srv.listen(16)
    return srv


def serve(sock_path: pathlib.Path, backend: str, idle: float = IDLE_S) -> int:
    lock = open(sock_path.with_suffix(".lock"), "w")  # noqa: SIM115 - held for the server's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another server for this address is starting or running
    t0 = time.monotonic()
    try:
        srv = _listen(sock_path, backend)
    except Exception as err:  # noqa: BLE001 - any failure to start: said once, no more servers for this address
        why = str(err) if isinstance(err, _Unsafe) else f"the server failed to start: {type(err).__name__}: {err}"
        print(f"train server pid {os.getpid()}: {why}; the jobs train in new processes", flush=True)
        refused(sock_path).write_text(why)
        return 1
    srv.settimeout(0.5)
    print(
        f"[{time.strftime('%H:%M:%S')}] train server pid {os.getpid()}: DeePMD-kit ({backend}) imported "
        f"in {time.monotonic() - t0:.1f} s, listening on {sock_path}",
        flush=True,
    )
    handlers: set[int] = set()
    last = time.monotonic()
    try:
        while True:
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                conn = None
            while handlers and (pid := os.waitpid(-1, os.WNOHANG)[0]):
                handlers.discard(pid)
            if conn is not None:
                conn.settimeout(None)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    srv.close()
                    _handle(conn)
                handlers.add(pid)
                conn.close()
            if handlers or conn is not None:
                last = time.monotonic()
            elif time.monotonic() - last > idle or not sock_path.exists():
                break
    finally:
        if sock_path.exists():
            sock_path.unlink(missing_ok=True)
        print(f"[{time.strftime('%H:%M:%S')}] train server pid {os.getpid()}: idle {idle:.0f} s, exits", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("socket", type=pathlib.Path)
    parser.add_argument("--backend", choices=("tf", "pt"), required=True)
    parser.add_argument("--idle", type=float, default=IDLE_S)
    args = parser.parse_args(argv)
    return serve(args.socket, args.backend, args.idle)


if __name__ == "__main__":
    sys.exit(main())
