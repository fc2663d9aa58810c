"""`dpsnake train` with the PyTorch backend: fine-tuning a pretrained model (.pt checkpoint and frozen
.pth), continuing from the previous iteration's fine-tuned model, and the init_from_previous policies
(no / yes / yes:N). Real DeePMD-kit training of tiny models on EMT data; weights are compared through
DeePMD-kit's own DeepPot on the frozen models."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from dpmodels import emt_dataset

ROOT = pathlib.Path(__file__).resolve().parents[1]

# a learning rate so small that a few steps leave the weights as they started: the fine-tuned model's
# forces then equal the model it started from (the energy bias is re-fitted to the new data, forces
# do not depend on it), while a model from random weights is far off
FROZEN_LR = {"type": "exp", "start_lr": 1e-12, "stop_lr": 1e-13, "decay_steps": 1}


def _cfg(tmp: pathlib.Path, **train) -> pathlib.Path:
    """A resolved config (what the workflow writes to results/config.json) for `dpsnake train`."""
    from dpsnake.workflow.config import validate_schema

    raw = {
        "type_map": ["Cu", "Ni"],
        "systems": {"CuNi": {"structure": {"builder": "bulk", "kwargs": {"name": "Cu", "cubic": True}}}},
        "explore": {"stages": [{"temperatures": [300]}]},
        "train": dict(
            {
                "backend": "pt",
                "numb_models": 2,
                "numb_steps": 2,
                "threads": 2,
                "input": {
                    "learning_rate": FROZEN_LR,
                    "loss": {"type": "ener"},
                    "training": {"training_data": {"batch_size": 1}, "disp_freq": 1},
                },
            },
            **train,
        ),
    }
    path = tmp / "config.json"
    path.write_text(json.dumps(validate_schema(raw)))
    return path


def _train(cfg: pathlib.Path, it: int, outdir: pathlib.Path, data: list, init_from=None) -> dict:
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
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert (outdir / "model.dp").is_file() and (outdir / "frozen_model.pth").is_file()
    return json.loads((outdir / "init.json").read_text())


def _forces(model: pathlib.Path, data: pathlib.Path) -> np.ndarray:
    from deepmd.infer import DeepPot

    dp = DeepPot(str(model))
    coord = np.load(data / "set.000" / "coord.npy")[:2]
    box = np.load(data / "set.000" / "box.npy")[:2]
    names = (data / "type_map.raw").read_text().split()
    atype = [dp.get_type_map().index(names[t]) for t in np.loadtxt(data / "type.raw", dtype=int)]
    return dp.eval(coord, box, atype)[1]


@pytest.fixture(scope="module")
def pretrained(pt_model):
    """A se_atten_v2 model trained by DeePMD-kit on CuNi EMT data (the "pretrained" model)."""
    return pt_model("se_atten_v2", seed=3, steps=20)


def test_finetune_pt_checkpoint_then_continue_from_previous(tmp_path, pretrained, model_cache):
    data = emt_dataset(model_cache, "CuNi")
    ckpt = pretrained["dir"] / "model.ckpt.pt"
    cfg = _cfg(
        tmp_path,
        finetune={"model": str(ckpt), "numb_steps": 2},
        init_from_previous=True,
        input={"learning_rate": FROZEN_LR, "training": {"training_data": {"batch_size": 1}}},
    )
    it0 = tmp_path / "iter.000000" / "model.0"
    start = _train(cfg, 0, it0, [data])
    assert start["mode"] == "finetune" and start["from"] == str(ckpt)
    log_input = json.loads((it0 / "input.json").read_text())
    assert "descriptor" not in log_input["model"]  # the architecture comes from the pretrained model
    out = json.loads((it0 / "out.json").read_text())  # what DeePMD-kit trained
    assert out["model"]["descriptor"]["type"] == "se_atten_v2"
    ref = _forces(pretrained["pth"], data)
    f0 = _forces(it0 / "frozen_model.pth", data)
    assert np.abs(f0 - ref).max() < 1e-6 * max(1.0, np.abs(ref).max())

    # iteration 1 continues from iteration 0's fine-tuned checkpoint (its own model section)
    it1 = tmp_path / "iter.000001" / "model.0"
    start = _train(cfg, 1, it1, [data, tmp_path / "iter.000000"], init_from=it0)
    assert start["mode"] == "init" and start["from"] == str(it0)
    assert np.abs(_forces(it1 / "frozen_model.pth", data) - f0).max() < 1e-6 * max(1.0, np.abs(f0).max())

    # a model from random weights is nowhere near: the comparisons above can fail
    scratch = tmp_path / "scratch"
    cfg_s = _cfg(
        tmp_path, input={"model": pretrained["input"]["model"] | {"type_map": ["Cu", "Ni"]}, "learning_rate": FROZEN_LR}
    )
    assert _train(cfg_s, 0, scratch, [data])["mode"] == "scratch"
    assert np.abs(_forces(scratch / "frozen_model.pth", data) - ref).max() > 1e-3


def test_finetune_from_frozen_pth(tmp_path, pretrained, model_cache):
    data = emt_dataset(model_cache, "CuNi")
    cfg = _cfg(tmp_path, finetune={"model": str(pretrained["pth"])})
    out = tmp_path / "model.0"
    assert _train(cfg, 0, out, [data])["mode"] == "finetune"
    assert (out / "pretrained.pt").is_file()  # the .pth as a checkpoint DeePMD-kit can fine-tune from
    ref = _forces(pretrained["pth"], data)
    assert np.abs(_forces(out / "frozen_model.pth", data) - ref).max() < 1e-6 * max(1.0, np.abs(ref).max())


def test_init_policies_decide_from_the_previous_training_data(tmp_path, model_cache):
    from dpsnake.workflow.train import start_point
    from dpsnake.workflow.train_input import count_frames, init_policy

    data = emt_dataset(model_cache, "CuNi")
    n = count_frames([data])
    assert n == 6
    assert [init_policy(v) for v in (False, "no", True, "yes", "yes:5", "old_data_larger_than:7")] == [
        None,
        None,
        -1,
        -1,
        5,
        7,
    ]
    new = tmp_path / "iter.000000"  # iteration 0's new data: not what the previous models saw
    new.mkdir()
    cfg = {"train": {"init_from_previous": "yes:5", "finetune": {"model": "pre.pt"}}}
    assert start_point(cfg, 1, [str(data), str(new)], "prev")["mode"] == "init"  # 6 > 5
    cfg["train"]["init_from_previous"] = "yes:6"
    s = start_point(cfg, 1, [str(data), str(new)], "prev")
    assert s == {"mode": "finetune", "from": "pre.pt", "reason": "previous training data 6 <= 6 frames"}
    cfg["train"]["finetune"] = None
    assert start_point(cfg, 1, [str(data), str(new)], "prev")["mode"] == "scratch"
    cfg["train"]["init_from_previous"] = "no"
    assert start_point(cfg, 1, [str(data)], "prev")["mode"] == "scratch"
    cfg["train"]["init_from_previous"] = True
    assert start_point(cfg, 0, [str(data)], None)["mode"] == "scratch"  # iteration 0: nothing before
