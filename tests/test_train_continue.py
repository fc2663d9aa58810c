"""`dpsnake train` continuing from the previous iteration's model (issue 18 item 1) and rerun after a
killed checkpoint write (issue 19 item 1), with real DeePMD-kit training of tiny models (TensorFlow and
PyTorch backends, a few steps each).

The lcurve of every iteration is read back: a continued model trains exactly ``init_numb_steps`` steps,
with ``init_lr_schedule: continue`` at the steps and learning rates of one training over all steps so far
(DeePMD-kit's own schedule), with ``reset`` from step 0 at ``start_lr`` again.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from dpmodels import emt_dataset

LR = {"type": "exp", "start_lr": 1e-3, "stop_lr": 1e-5, "decay_steps": 1}
MODEL = {
    "descriptor": {"type": "se_e2_a", "rcut": 4.0, "rcut_smth": 1.0, "sel": "auto", "neuron": [4, 8], "axis_neuron": 4},
    "fitting_net": {"neuron": [8, 8], "resnet_dt": True},
}


def _cfg(tmp: pathlib.Path, backend: str, **train) -> pathlib.Path:
    """A resolved config (what the workflow writes to results/config.json) for `dpsnake train`."""
    from dpsnake.workflow.config import validate_schema

    raw = {
        "type_map": ["Cu"],
        "systems": {"Cu": {"structure": {"builder": "bulk", "kwargs": {"name": "Cu", "cubic": True}}}},
        "explore": {"stages": [{"temperatures": [300]}]},
        "train": dict(
            {
                "backend": backend,
                "numb_steps": 6,
                "init_numb_steps": 4,
                "threads": 2,
                "init_from_previous": True,
                "input": {
                    "model": MODEL,
                    "learning_rate": LR,
                    "training": {"training_data": {"batch_size": 1}, "disp_freq": 1},
                },
            },
            **train,
        ),
    }
    path = tmp / f"config.{backend}.{'.'.join(f'{k}-{v}' for k, v in sorted(train.items())) or 'default'}.json"
    path.write_text(json.dumps(validate_schema(raw)))
    return path


def _train(cfg, it: int, outdir: pathlib.Path, data: list, init_from=None, ok: bool = True):
    cmd = [
        sys.executable,
        "-m",
        "dpsnake.cli",
        "train",
        "--config",
        str(cfg),
        "--iter",
        str(it),
        "--model",
        "0",
        "--outdir",
        str(outdir),
        "--threads",
        "2",
        "--data",
        *map(str, data),
    ]
    if init_from:
        cmd += ["--init-from", str(init_from)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    if ok:
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        assert (outdir / "model.dp").is_file()
    return p


def _lcurve(folder: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """(steps, learning rates) of the lcurve.out lines (disp_freq 1: one per trained step)."""
    rows = np.loadtxt(folder / "lcurve.out", ndmin=2)
    return rows[:, 0].astype(int), rows[:, -1]


def _lr(step, total: int, **warmup) -> np.ndarray:
    """DeePMD-kit's learning rate at ``step`` of a training of ``total`` steps (``warmup``: its warm-up
    arguments)."""
    from deepmd.dpmodel.utils.learning_rate import BaseLR

    return np.asarray(BaseLR(**dict(LR, num_steps=total, **warmup)).value(np.asarray(step)), dtype=float)


@pytest.mark.parametrize("backend", ["tf", "pt"])
def test_continued_training_steps_and_learning_rates(tmp_path, model_cache, backend):
    data = [emt_dataset(model_cache, "Cu")]
    cont = _cfg(tmp_path, backend, init_lr_schedule="continue")
    reset = _cfg(tmp_path, backend)  # the default
    # DeePMD-kit's lcurve: TensorFlow writes a line for the state before the first step (the step
    # counter it starts at) and then step n after n steps; PyTorch one line per step, step index + 1
    shift = 0 if backend == "tf" else 1
    it0 = tmp_path / "it0"
    _train(cont, 0, it0, data)
    if backend == "pt":  # given to DeePMD-kit (saves its mendeleev look-up at the start)
        assert json.loads((it0 / "input.json").read_text())["model"]["info"]["observed_type"] == ["Cu"]
    steps, lrs = _lcurve(it0)
    assert list(steps) == list(range(shift, 7))
    assert np.allclose(lrs, _lr(steps - shift, 6), rtol=0.06)

    # continue: exactly init_numb_steps more each time, on DeePMD-kit's schedule of one training over
    # all steps so far (step counter and learning rate go on; the PyTorch checkpoint holds the index of
    # its last step, 5, and `--restart` starts there)
    prev, start = it0, 6 - shift
    for it in (1, 2):
        out = tmp_path / f"it{it}"
        log = _train(cont, it, out, data, init_from=prev).stdout
        assert "--restart" in log and "learning rate: continue" in log
        total = json.loads((out / "input.json").read_text())["training"]["numb_steps"]
        assert total == start + 4
        steps, lrs = _lcurve(out)
        assert list(steps) == list(range(start + shift, start + 5)), steps  # 4 steps trained
        assert np.allclose(lrs, _lr(steps - shift, total), rtol=0.06), (steps, lrs, total)
        assert lrs[0] < LR["start_lr"] / 10  # no warm restart
        # the network trained is the previous model's (sel: auto resolved on its data)
        sel = json.loads((prev / "out.json").read_text())["model"]["descriptor"]["sel"]
        assert json.loads((out / "input.json").read_text())["model"]["descriptor"]["sel"] == sel
        prev, start = out, total - shift

    # reset: a new schedule from start_lr over init_numb_steps, the step counter at 0
    out = tmp_path / "reset1"
    log = _train(reset, 1, out, data, init_from=it0).stdout
    assert ("--init-frz-model" if backend == "tf" else "--init-model") in log
    steps, lrs = _lcurve(out)
    assert list(steps) == list(range(shift, 5))
    assert np.allclose(lrs, _lr(steps - shift, 4), rtol=0.06) and lrs[0] == pytest.approx(LR["start_lr"])
    assert "warm-up" not in log  # the default 0.1 of 4 steps is no step

    # reset with train.init_lr_warmup: the rate climbs from 0 over that fraction of the steps, then decays
    # (DeePMD-kit's learning_rate.warmup_ratio); iteration 0 has none
    warm = _cfg(tmp_path, backend, init_lr_warmup=0.5)
    out = tmp_path / "warm1"
    log = _train(warm, 1, out, data, init_from=it0).stdout
    assert "after a warm-up over 0.5 of the steps" in log
    assert json.loads((out / "input.json").read_text())["learning_rate"]["warmup_ratio"] == 0.5
    assert "warmup_ratio" not in json.loads((it0 / "input.json").read_text())["learning_rate"]
    steps, lrs = _lcurve(out)
    assert list(steps) == list(range(shift, 5))
    expect = _lr(steps - shift, 4, warmup_ratio=0.5)
    assert np.allclose(lrs, expect, rtol=0.06, atol=1e-12), (lrs, expect)
    assert lrs[0] < LR["start_lr"] / 2 and lrs.max() == pytest.approx(LR["start_lr"], rel=0.06)


def test_init_warmup_keeps_the_users_own_warm_up():
    """train.init_lr_warmup adds learning_rate.warmup_ratio to a reset continuation's input only where the
    input has no warm-up of its own (which DeePMD-kit applies to every run, iteration 0 too) and the
    warm-up is at least one step."""
    from dpsnake.workflow.train import init_warmup

    cfg = {"train": {"init_lr_warmup": 0.2}}
    lr = dict(LR)
    assert init_warmup(cfg, lr, 100) is None and lr["warmup_ratio"] == 0.2
    for own in ({"warmup_steps": 10}, {"warmup_ratio": 0.3}):
        lr = dict(LR, **own)
        assert "its own warm-up" in init_warmup(cfg, lr, 100) and lr == dict(LR, **own)
    for ratio, steps in ((0.0, 100), (0.2, 4)):  # none asked, or less than one step
        lr = dict(LR)
        assert init_warmup({"train": {"init_lr_warmup": ratio}}, lr, steps) is None and lr == LR
