"""Issue 19 item 2: every failure of a `dpsnake` command ends with one line naming the cause, and the cause
of a failed child program (DeePMD-kit, pw.x) is that program's own last error line, found in its real
output by ``dpsnake.errors.last_error_line``."""

from __future__ import annotations

import errno
import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

from dpsnake.errors import last_error_line, os_error_message

DP_INPUT = {
    "model": {
        "type_map": ["Cu"],
        "descriptor": {"type": "se_e2_a", "rcut": 4.0, "rcut_smth": 1.0, "sel": [32], "neuron": [4], "axis_neuron": 4},
        "fitting_net": {"neuron": [8]},
    },
    "learning_rate": {"type": "exp", "start_lr": 0.003, "stop_lr": 0.0003, "decay_steps": 20},
    "loss": {"type": "ener"},
    "training": {"training_data": {"systems": ["data/Cu"], "batch_size": 1}, "numb_steps": 10},
}


def _dp(tmp_path, backend: str, inp: dict) -> str:
    """Real `dp --BACKEND train` on ``inp``; returns everything it printed (it must fail)."""
    (tmp_path / "input.json").write_text(json.dumps(inp))
    p = subprocess.run(
        ["dp", f"--{backend}", "train", "input.json"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert p.returncode != 0, p.stdout[-2000:]
    return p.stdout + p.stderr


@pytest.mark.skipif(not shutil.which("dp"), reason="DeePMD-kit's dp is not installed")
def test_cause_of_real_deepmd_failures(tmp_path):
    """A misspelled key and a descriptor type DeePMD-kit does not know: the cause is the argument
    checker's message, not the CUDA stub noise TensorFlow prints after the traceback."""
    inp = json.loads(json.dumps(DP_INPUT))
    inp["model"]["descriptor"]["rcut_smthh"] = inp["model"]["descriptor"].pop("rcut_smth")
    out = _dp(tmp_path, "tf", inp)
    cause = last_error_line(out)
    assert cause.startswith("ArgumentKeyError: ") and "rcut_smthh" in cause, cause
    assert "\n" not in cause and "Traceback" in out
    inp = json.loads(json.dumps(DP_INPUT))
    inp["model"]["descriptor"]["type"] = "se_e9_nope"
    cause = last_error_line(_dp(tmp_path, "tf", inp))
    assert cause.startswith("ArgumentValueError: ") and "se_e9_nope" in cause, cause


@pytest.mark.skipif(not shutil.which("dp"), reason="DeePMD-kit's dp is not installed")
def test_cause_of_a_missing_backend(tmp_path):
    missing = [b for b, mod in (("pd", "paddle"), ("jax", "jax")) if importlib.util.find_spec(mod) is None]
    if not missing:
        pytest.skip("every DeePMD-kit backend is installed here")
    cause = last_error_line(_dp(tmp_path, missing[0], DP_INPUT))
    assert cause.startswith("ModuleNotFoundError: No module named"), cause


@pytest.mark.skipif(not shutil.which("pw.x"), reason="Quantum ESPRESSO's pw.x is not installed")
def test_pw_failure_reason_is_the_codes_error(tmp_path):
    """A failed pw.x run: the label's failure reason is QE's "Error in routine" message (joined with its
    detail), not Open MPI's abort notice that ends stderr."""
    from dpsnake.labelers.filebased import run_command

    (tmp_path / "pw.in").write_text(
        "&control\n calculation='scf'\n/\n&system\n ibrav=0, nat=1, ntyp=1, ecutwfc=20\n/\n&electrons\n/\n"
    )
    out = run_command("pw.x -in {input}", tmp_path, input="pw.in", timeout=120)
    assert out.returncode not in (0, None)
    assert out.reason.startswith("Error in routine"), out.reason
    assert out.reason.endswith(f"(pw.x exited with code {out.returncode})") and "MPI" not in out.reason


def test_last_error_line_without_traceback():
    assert last_error_line("") == ""
    assert last_error_line("step 1\nstep 2\nall done\n") == "all done"
    text = "reading\nERROR: cannot open POTCAR\n--------\nMPI_ABORT was invoked on rank 0\nwith errorcode 1.\n"
    assert last_error_line(text) == "ERROR: cannot open POTCAR"
    # the exception of the LAST traceback (chained: the one raised while handling the first)
    chained = (
        "Traceback (most recent call last):\n  File \"a.py\", line 1, in <module>\nKeyError: 'x'\n\n"
        "During handling of the above exception, another exception occurred:\n\n"
        'Traceback (most recent call last):\n  File "a.py", line 3, in <module>\n'
        "deepmd.utils.errors.GraphTooLargeError: model too large\nimplib-gen: failed to load library\n"
    )
    assert last_error_line(chained) == "GraphTooLargeError: model too large"


def test_os_error_messages(tmp_path):
    missing = tmp_path / "results" / "data" / "iter.000001"
    msg = os_error_message(PermissionError(errno.EACCES, "Permission denied", str(missing)))
    assert msg.startswith(f"{missing}: permission denied (cannot create it); make {tmp_path} writable")
    msg = os_error_message(OSError(errno.ENOSPC, "No space left on device", "results/data/x"))
    assert msg.startswith("results/data/x: no space left on device; free space")
    msg = os_error_message(OSError(errno.EDQUOT, "Disk quota exceeded", "logs/a.log"))
    assert "disk quota exceeded" in msg and msg.startswith("logs/a.log")


def _dpsnake(*args, cwd, pre: str = ""):
    """``dpsnake ARGS`` as the program (console entry point); ``pre``: Python run before it."""
    code = (
        f"import sys\n{pre}\nsys.argv = ['dpsnake', *{list(map(str, args))!r}]\nfrom dpsnake.cli import main\n"
        "sys.exit(main())\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_unexpected_failure_keeps_traceback_and_ends_with_cause(tmp_path):
    """A fault no check foresaw (walkers.json holding an object, not a list): the traceback stays in the
    log for debugging, the last line names the cause, exit 1."""
    ex = tmp_path / "explore"
    ex.mkdir()
    for name, obj in (
        ("walkers.json", {"Cu": 1}),
        ("plan.json", {"stage": 0, "stage_iteration": 0}),
        ("summary.json", {"walkers": {}}),
    ):
        (ex / name).write_text(json.dumps(obj))
    from dpsnake.workflow.config import check, write_if_changed

    raw = {
        "type_map": ["Cu"],
        "systems": {"Cu": {"structure": {"builder": "bulk", "kwargs": {"name": "Cu", "a": 3.61, "cubic": True}}}},
        "explore": {"stages": [{"temperatures": [300.0], "nsteps": 10, "max_iterations": 1}]},
    }
    write_if_changed(check(raw, tmp_path), tmp_path / "config.json")
    p = _dpsnake(
        "select", "--config", "config.json", "--iter", 0, "--explore", "explore", "--outdir", "select", cwd=tmp_path
    )
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and "Traceback" in p.stderr
    assert lines[-1].startswith("dpsnake select: error: TypeError: "), p.stderr


@pytest.mark.skipif(importlib.util.find_spec("deepmd") is None, reason="DeePMD-kit is not installed")
def test_cause_stays_last_after_tensorflow_exit_noise(tmp_path):
    """Once TensorFlow is loaded, its CUDA stub loader prints while the interpreter exits; the cause must
    still be the log's last line."""
    p = _dpsnake(
        "collect",
        "--config",
        "nope.json",
        "--iter",
        0,
        "--stats",
        "s.json",
        "--data-out",
        "d",
        "--summary",
        "s",
        cwd=tmp_path,
        pre="import deepmd.tf",
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("dpsnake collect: error: --config: nope.json"), p.stderr
