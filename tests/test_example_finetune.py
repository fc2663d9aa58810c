"""config/examples/finetune-se_atten_v2.yaml end to end, shrunk: the example's own setup script trains
the "pretrained" se_atten_v2 model on other EMT data (Al, Ni3Al, Cu-Al, Ni), then the whole loop runs
(fine-tuning at iteration 0, continuing from the fine-tuned models at iteration 1, exploration with
DeePMD-kit's models chosen by explore.engine auto, EMT labels, report) on the CPU."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml
from test_workflow import smk

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "examples" / "finetune-se_atten_v2.yaml"

pytestmark = pytest.mark.slow


def test_finetune_example_runs_the_loop(tmp_path):
    for name in ("Snakefile", "workflow", "config", "profiles", "envs"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    p = subprocess.run(
        [sys.executable, "config/examples/make_pretrained.py", "--out", "pretrained", "--steps", "10", "--frames", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert (tmp_path / "pretrained" / "model.pt").is_file()

    cfg = yaml.safe_load(EXAMPLE.read_text())
    assert cfg["train"]["finetune"]["model"] == "pretrained/model.pt" and "model" not in cfg["train"]["input"]
    # tiny: 2 models, a few steps, 2 walkers per iteration, 2 iterations (never converged before)
    cfg["init_data"].update(scales=[1.0], perturbations=2)
    cfg["train"].update(numb_models=2, numb_steps=6, init_numb_steps=4)
    cfg["train"]["finetune"]["numb_steps"] = 6
    cfg["train"]["input"]["training"]["disp_freq"] = 2
    cfg["explore"].update(threads=2, device="cpu")
    cfg["explore"]["stages"] = [dict(cfg["explore"]["stages"][0], temperatures=[300], nsteps=20, trj_freq=10)]
    # models fine-tuned for a few steps from the same weights barely differ (force deviation ~1e-3 eV/A):
    # a low theta_low keeps iteration 0 from converging
    cfg["trust"]["force"] = [0.0005, 0.5]
    cfg["select"]["max_candidates"] = 2
    cfg["label"]["max_failed_fraction"] = 0.5
    cfg["convergence"].update(accurate_ratio=0.999, max_iterations=2)
    (tmp_path / "reduced.yaml").write_text(yaml.safe_dump(cfg))  # smk() passes --configfile reduced.yaml
    smk(tmp_path)

    res = tmp_path / "results"
    assert sorted(p.parent.parent.name for p in res.glob("iter.*/select/stats.json")) == ["iter.000000", "iter.000001"]
    pretrained = str(tmp_path / "pretrained" / "model.pt")
    for k in range(2):
        m0, m1 = res / "iter.000000" / "train" / f"model.{k}", res / "iter.000001" / "train" / f"model.{k}"
        # iteration 0 fine-tuned the pretrained model: DeePMD-kit took its se_atten_v2 architecture and
        # mapped [Cu, Ni] onto its [Al, Cu, Ni]
        assert json.loads((m0 / "init.json").read_text())["mode"] == "finetune"
        log = (tmp_path / "logs" / "iter.000000" / f"train.{k}.log").read_text()
        assert f"--finetune {pretrained} --use-pretrain-script" in log
        out = json.loads((m0 / "out.json").read_text())
        assert out["model"]["descriptor"]["type"] == "se_atten_v2" and out["model"]["type_map"] == ["Cu", "Ni"]
        assert json.loads((m0 / "input.json").read_text())["training"]["numb_steps"] == 6
        assert len([ln for ln in (m0 / "lcurve.out").read_text().splitlines() if not ln.startswith("#")]) >= 3
        # iteration 1 continued from iteration 0's fine-tuned model
        assert json.loads((m1 / "init.json").read_text())["mode"] == "init"
        log = (tmp_path / "logs" / "iter.000001" / f"train.{k}.log").read_text()
        assert f"--init-model {m0.resolve()}/model.ckpt.pt --use-pretrain-script" in log
    # exploration ran the built-in engine (auto: it runs se_atten_v2, dpsnake.engine.attn)
    engine = json.loads((res / "iter.000000" / "explore" / "engine.json").read_text())
    assert engine["engine"] == "builtin" and "se_atten_v2" in engine["reason"], engine
    summary = json.loads((res / "iter.000000" / "explore" / "summary.json").read_text())
    assert len(summary["walkers"]) == 2
    assert (res / "reports" / "index.html").is_file() and (res / "reports" / "iter.000001.html").is_file()
    assert sorted(p.name for p in (res / "models" / "final").glob("*.dp")) == ["model.0.dp", "model.1.dp"]
