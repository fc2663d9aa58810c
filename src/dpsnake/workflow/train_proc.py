"""The DeePMD-kit process behind ``dpsnake train``: the stale files a killed attempt leaves, and the
``dp train`` / ``dp freeze`` / ``dp convert-backend`` run whose failure is reported by its cause.

A failure ends in one ``UserError`` whose message is the cause DeePMD-kit (or TensorFlow / torch)
printed, e.g. ``dp train: RuntimeError: The input frozen model ... does not exist! (in <folder>)``,
found in the process output (``errors.last_error_line``), which still goes to the log unchanged.
"""

from __future__ import annotations

import collections
import concurrent.futures
import pathlib
import shutil
import signal
import subprocess
import sys
import time

from dpsnake.errors import UserError, last_error_line
from dpsnake.workflow import train_server

# what a killed or failed attempt leaves in a model folder: checkpoints (model.ckpt-N.*, TensorFlow's
# `checkpoint` index), files being written (TensorFlow's `*.tmp<hex>` meta graphs and `checkpoint.tmp*`,
# its `*.tempstate<n>` checkpoint shards and `*_temp` shard folders; our own `*.tmp.*` outputs)
STALE = ("model.ckpt*", "checkpoint", "checkpoint.tmp*", "*.tmp*", "*tempstate*", "*_temp")


def remove_stale(out: pathlib.Path) -> list[pathlib.Path]:
    """Delete what an earlier attempt left in ``out`` (never restart from it by accident). One pass over
    the union of the patterns: a file several patterns match (``model.ckpt-N.meta.tmp<hex>``) is deleted
    once, and a file that is gone already (deleted meanwhile) is no error."""
    stale = sorted({p for pattern in STALE for p in out.glob(pattern)})
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


class SerialExecutor:
    """A stand-in for ``concurrent.futures.ThreadPoolExecutor`` that runs each task at ``submit``: the
    same results and exceptions (through a finished ``Future``), no threads."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:  # noqa: BLE001 - handed to the caller through the future, as a pool does
            future.set_exception(err)
        return future

    def shutdown(self, wait: bool = True, **kwargs) -> None:
        pass


def serial_frame_loading() -> bool:
    """Load DeePMD-kit's training frames without a thread pool. DeePMD-kit 3.2's
    ``DeepmdData.get_single_frame`` starts a ``ThreadPoolExecutor`` (one thread per data key) for every
    frame it reads: 5.3-9.1 ms per frame against 0.43-0.89 ms serially (the same arrays; 32-atom frames,
    one core, the 2-core dev machine under load), about a third of a small model's training step there;
    on the H200 host's idle cores no per-step gain was measurable (docs/benchmarks.md). The trained model is
    bit for bit the same (lcurve.out over 200 steps compared). Returns whether DeePMD-kit's module had the
    name to replace (a later DeePMD-kit without it: nothing changed)."""
    import deepmd.utils.data as data

    if not hasattr(data, "ThreadPoolExecutor"):
        return False
    data.ThreadPoolExecutor = SerialExecutor
    return True


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def _step_name(args: list[str]) -> str:
    """ "dp train", "dp freeze", "dp convert-backend": the command without the backend flag."""
    return "dp " + next((a for a in args if not a.startswith("--")), "")


def _script(steps: list[list[str]]) -> str:
    """The training process's program: each step announces itself, so the output says which one failed."""
    return (
        "from dpsnake.workflow.train_proc import serial_frame_loading\n"
        "serial_frame_loading()\n"
        "from deepmd.main import main\n"
    ) + "".join(f"print({'+ dp ' + ' '.join(s)!r}, flush=True)\nmain({s!r})\n" for s in steps)


class _ServerJob:
    """The output lines of a job run by the training server, and its exit code (None: the server's
    handler ended without one)."""

    def __init__(self, sock):
        self.sock, self.rc, self.pid = sock, None, None

    def __iter__(self):
        with self.sock, self.sock.makefile("r", errors="replace", newline="\n") as f:
            for line in f:
                if line.startswith(train_server.PID):
                    self.pid = int(line[len(train_server.PID) :])
                    yield f"train: worker pid {self.pid}\n"
                elif line.startswith(train_server.RC):
                    self.rc = int(line[len(train_server.RC) :])
                else:
                    yield line


def _backend(steps: list[list[str]]) -> str:
    """tf or pt: the backend flag of the first step (``--pt train ...``)."""
    return next(a for a in steps[0] if a.startswith("--"))[2:]


def _to_server(steps, cwd, env, server) -> tuple:
    """(the job's socket on the training server or None, why: for the log line)."""
    if server is None:
        return None, "no training server asked for"
    use, why = train_server.server_choice(server, env)
    if not use:
        return None, why
    backend = _backend(steps)
    try:
        path = train_server.address(backend, env)
        no = train_server.unusable(path)  # before connecting: another user's folder is not ours to trust
    except OSError as err:
        no = f"{type(err).__name__}: {err}"
    if no:
        return None, f"no training server here: {no}"
    t0 = time.monotonic()
    if (sock := train_server.connect(path, steps, cwd, env)) is None:
        # the first job starts one; it and the jobs started meanwhile wait for its import (one import
        # instead of one per job)
        if not train_server.starting_or_running(path):
            train_server.start(path, backend, env)
        sock = train_server.wait_for(path, steps, cwd, env)
        why += f"; waited {time.monotonic() - t0:.1f} s for it to start"
    if sock is not None:
        return sock, f"the training server {path.name} ({why})"
    no = train_server.unusable(path)
    return None, f"no training server here: {no}" if no else f"no training server (its log: {path.with_suffix('.log')})"


def _launch(steps, cwd, env, server) -> tuple:
    """(output lines, a function giving the exit code, a log line saying where DeePMD-kit runs)."""
    sock, why = _to_server(steps, cwd, env, server)
    if sock is not None:
        job = _ServerJob(sock)
        return job, lambda: job.rc, f"train: DeePMD-kit in a worker of {why}"
    p = subprocess.Popen(
        [sys.executable, "-c", _script(steps)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
    )

    def lines():
        with p:
            yield from p.stdout

    return lines(), p.wait, f"train: DeePMD-kit in a new process ({why})"


def run_steps(steps: list[list[str]], cwd: pathlib.Path, env: dict, server=None) -> None:
    """Run the ``dp`` command lines ``steps`` (arguments after ``dp``, the backend flag first) in one
    Python process (the start-up of TensorFlow or torch + DeePMD-kit, 4-6 s on a CPU, is paid once): a
    worker of the training server (``server``: the config's ``train.server``; train_server.py) or a new
    process. The output goes to our stdout line by line (the job's log); a failure raises UserError naming
    the step and its cause."""
    lines, finish, where = _launch(steps, cwd, env, server)
    print(where, flush=True)
    # the output since the running step started, enough for TensorFlow's long graph tracebacks
    tail: collections.deque[str] = collections.deque(maxlen=5000)
    current = _step_name(steps[0])
    for line in lines:
        sys.stdout.write(line)
        sys.stdout.flush()
        if line.startswith("+ dp "):
            current = _step_name(line.split()[2:])
            tail.clear()
        tail.append(line)
    rc = finish()
    if rc == 0:
        return
    if rc is None:
        cause = (
            "the training server's worker ended without an exit code (its log: "
            + str(train_server.address(_backend(steps), env).with_suffix(".log"))
            + ")"
        )
    elif rc < 0:  # killed: no traceback, and the last lines are ordinary training output
        cause = f"killed by {_signal_name(rc)}" + (" (out of memory?)" if rc == -9 else "")
    else:
        cause = last_error_line("".join(tail)) or f"exit code {rc}, no output"
    raise UserError(f"{current}: {cause} (in {cwd})")
