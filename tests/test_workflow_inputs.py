"""Real Snakemake runs on a tiny two-stage config (issue 19): an edited structure file reruns unfinished
work only and the reports name the data built from the older file (item 9); the stop decision is honest
when the last stage explores one system (item 11); the reports' words and tables (item 12).

Stage 0 explores Cu and CuNi once, stage 1 Cu only. Cu's trust levels make every frame accurate, CuNi's
make its frames candidates, so CuNi stays below the threshold and the last stage "converges" on Cu alone.
Each test takes about a minute on two free cores (real DeePMD-kit training of two tiny models per
iteration, the real exploration engine, EMT labels).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "edited.yaml"
CONFIG_TEXT = """
type_map: [Cu, Ni]
systems:
  Cu:
    structure: {file: cu.extxyz}
    trust: {force: [100.0, 200.0]}      # every frame accurate
  CuNi:
    structure: {file: cuni.extxyz}
    trust: {force: [1.0e-6, 100.0]}     # thermal frames are candidates: accurate ratio below 0.9
init_data: {scales: [1.0], perturbations: 2, atom_displacement: 0.05, cell_perturbation: 0.01}
train:
  numb_models: 2
  numb_steps: 10
  input:
    model:
      descriptor: {type: se_e2_a, rcut: 4.0, rcut_smth: 1.0, sel: [32, 32], neuron: [2, 4], axis_neuron: 2}
      fitting_net: {neuron: [4], resnet_dt: true}
    training: {training_data: {batch_size: 1}, disp_freq: 10}
explore:
  device: cpu
  threads: 1
  stages:
    - {systems: [Cu, CuNi], temperatures: [300], nsteps: 20, trj_freq: 10, max_iterations: 1}
    - {systems: [Cu], temperatures: [300], nsteps: 20, trj_freq: 10, max_iterations: 1}
select: {max_candidates: 1}
convergence: {accurate_ratio: 0.9, max_iterations: 3}
report: {accuracy: false}
"""


@pytest.fixture
def wd(tmp_path):
    """A copy of the workflow with the tiny config and its two structure files."""
    for name in ("Snakefile", "workflow", "config", "profiles", "envs"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    (tmp_path / CONFIG).write_text(CONFIG_TEXT)
    write_structures(tmp_path, 3.61)
    return tmp_path


def write_structures(wd: pathlib.Path, a: float) -> dict[str, str]:
    """cu.extxyz (fcc Cu, 2x2x2 cubic cells, lattice constant a) and cuni.extxyz (every other atom Ni);
    returns their sha256."""
    import ase.io
    from ase.build import bulk

    from dpsnake.workflow.structures import file_sha256

    cu = bulk("Cu", "fcc", a=a, cubic=True).repeat((2, 2, 2))
    cuni = cu.copy()
    cuni.symbols[::2] = "Ni"
    ase.io.write(wd / "cu.extxyz", cu, format="extxyz")
    ase.io.write(wd / "cuni.extxyz", cuni, format="extxyz")
    return {"Cu": file_sha256(wd / "cu.extxyz"), "CuNi": file_sha256(wd / "cuni.extxyz")}


def smk(wd, *args) -> str:
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--profile",
            "profiles/local",
            "--configfile",
            CONFIG,
            "--cores",
            "2",
            *args,
        ],
        cwd=wd,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    return p.stdout + p.stderr


def jobs(out: str, rule: str) -> list[str]:
    """The `it` (or `system`) wildcard of each job of ``rule`` that Snakemake ran (or would run, -n)."""
    found = []
    for block in re.split(r"\n(?=(?:local)?(?:rule|checkpoint) \w+:)", out):
        if re.match(rf"(?:local)?(?:rule|checkpoint) {rule}:", block.strip()):
            m = re.search(r"wildcards: (?:it|system)=([^,\s]+)", block)
            found.append(m.group(1) if m else "")
    return found


def _json(path):
    return json.loads(pathlib.Path(path).read_text())


def _lattice(path) -> float:
    import ase.io

    return float(ase.io.read(path).cell[0, 0])


def dpsnake(wd, *args) -> str:
    p = subprocess.run([sys.executable, "-m", "dpsnake.cli", *args], cwd=wd, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


@pytest.mark.slow
def test_edited_structure_file_reruns_unfinished_work_only(wd):
    res = wd / "results"
    it0, it1 = res / "iter.000000", res / "iter.000001"
    # 1. the initial data and the plan of iteration 0; then the files change before iteration 0 finished
    smk(wd, "results/data/init/Cu", "results/data/init/CuNi", "results/iter.000000/explore/walkers.json")
    v2 = write_structures(wd, 3.63)
    # 2. the rerun follows the new files: initial data relabelled, iteration 0 replanned (then run to its end)
    out = smk(wd, "results/iter.000000/collect/summary.json", "results/iter.000001/explore/walkers.json")
    assert sorted(jobs(out, "init_data")) == ["Cu", "CuNi"]
    assert sorted(jobs(out, "plan")) == ["000000", "000001"]
    for s in ("Cu", "CuNi"):
        assert _json(res / "data" / "init" / s / "source.json")["structure"]["sha256"] == v2[s]
        assert _json(it0 / "explore" / "plan.json")["structures"][s]["sha256"] == v2[s]
    assert _lattice(it0 / "explore" / "structures" / "Cu.extxyz") == pytest.approx(2 * 3.63)
    plan1 = _json(it1 / "explore" / "plan.json")
    assert plan1["stage"] == 1 and sorted(plan1["structures"]) == ["Cu"]  # stage 1 explores Cu only
    finished = [p for p in [*(res / "data").rglob("*"), *it0.rglob("*")] if p.is_file()]
    assert len(finished) > 20 and it0 / "explore" / "walkers.json" in finished
    before = {p: p.stat().st_mtime_ns for p in finished}

    # 3. the files change again, now that iteration 0 has finished and iteration 1 is only planned
    v3 = write_structures(wd, 3.65)
    dry = smk(wd, "-n")
    assert jobs(dry, "plan") == ["000001"] and not jobs(dry, "init_data")
    assert set(jobs(dry, "train")) == {"000001"} and jobs(dry, "explore") == ["000001"]
    out = smk(wd, "results/iter.000001/explore/walkers.json")
    assert jobs(out, "plan") == ["000001"]
    assert _json(it1 / "explore" / "plan.json")["structures"]["Cu"]["sha256"] == v3["Cu"]
    assert _lattice(it1 / "explore" / "structures" / "Cu.extxyz") == pytest.approx(2 * 3.65)
    assert {p: p.stat().st_mtime_ns for p in finished} == before  # finished work kept
    assert _json(it0 / "explore" / "plan.json")["structures"]["Cu"]["sha256"] == v2["Cu"]

    # 4. the reports name the data built from the older files (and only that data)
    dpsnake(wd, "report", "--config", "results/config.json", "--run", "--no-accuracy")
    stale = _json(res / "reports" / "run.json")["stale_data"]
    assert [r["data"] for r in stale] == ["data/init/Cu", "data/init/CuNi", "data/iter.000000/CuNi"]
    assert all(f"sha256 {v2[r['system']][:12]}, now {v3[r['system']][:12]}" in r["note"] for r in stale)
    assert "older version of cu.extxyz" in stale[0]["note"]
    html = (res / "reports" / "index.html").read_text()
    assert "built from an older version of an input file" in html and "data/iter.000000/CuNi" in html
    status = dpsnake(wd, "status")
    assert (
        f"note: data/init/CuNi: initial data built from an older version of cuni.extxyz (sha256 {v2['CuNi'][:12]}"
        in status
    )


@pytest.mark.slow
def test_last_stage_of_one_system_is_not_converged(wd):
    res = wd / "results"
    smk(wd)
    st0, st1 = (_json(res / f"iter.{k:06d}" / "select" / "stats.json") for k in (0, 1))
    r = st0["systems"]["CuNi"]["accurate_ratio"]
    assert r < 0.9 and sorted(st1["systems"]) == ["Cu"] and st1["systems"]["Cu"]["accurate_ratio"] == 1.0
    assert st1["stop"] and not (res / "iter.000002").exists()
    why = (
        f"exploration plan exhausted: the last stage (stage 1) reached the threshold for Cu only; "
        f"latest accurate ratio below 0.9: CuNi {r:.3f} (iteration 0)"
    )
    # item 11: the run is not converged while CuNi's latest ratio is below the threshold: select says so too
    assert (st1["converged"], st1["reason"], st1["stage_decision"]["converged"]) == (False, why, True)
    assert (wd / "logs" / "iter.000001" / "select.log").read_text().splitlines()[-1] == f"stopped, not converged: {why}"
    final = _json(res / "models" / "final" / "final.json")
    assert final["iteration"] == 1 and final["converged"] is False and final["reason"] == why
    dec = _json(res / "reports" / "run.json")["decision"]
    assert (dec["converged"], dec["stop"], dec["below"], dec["reason"]) == (False, True, ["CuNi"], why)
    assert dec["latest"]["CuNi"] == {"iteration": 0, "stage": 0, "accurate_ratio": r}
    html = (res / "reports" / "index.html").read_text()
    assert '<span class="no">stopped, not converged</span> at iteration 1' in html
    assert 'class="ok"' not in html
    # the run page: when each system was last explored; what each iteration decided after its link
    assert "last_explored" in html and "iteration 0</a> (next: stage 1)" in html
    assert "iteration 1</a> (stopped, not converged)" in html and "In brackets: what each iteration decided" in html
    assert "(-)" not in html
    # item 12: no row for CuNi in iteration 1 (its stage did not explore it), nor a blank row in run.csv
    csv1 = pd.read_csv(res / "reports" / "iter.000001.csv")
    assert list(csv1["system"]) == ["Cu"]
    run = pd.read_csv(res / "reports" / "run.csv")
    assert run["accurate"].notna().all() and list(zip(run["iteration"], run["system"])) == [
        (0, "Cu"),
        (0, "CuNi"),
        (1, "Cu"),
    ]
    rep1 = _json(res / "reports" / "iter.000001.json")
    assert [(o["system"], o["last_explored"], o["accurate_ratio"]) for o in rep1["not_explored"]] == [("CuNi", 0, r)]
    assert rep1["not_explored"][0]["data_frames"] > 0
    assert "Systems not explored in this iteration" in (res / "reports" / "iter.000001.html").read_text()
    # dpsnake status: no line pairs "not converged" with a converged stage
    lines = dpsnake(wd, "status").splitlines()
    assert (
        "iteration 0: reported; not converged: stage 0 used its iterations with accurate ratio below 0.9: "
        f"CuNi {r:.3f} (iteration 0); next: stage 1" in lines
    )
    assert f"iteration 1: reported; stopped, not converged: {why}" in lines
    assert not any("converged" in line.split(": ", 1)[-1].split(": ", 1)[-1] for line in lines if "iteration" in line)
    assert not any(line.startswith("note:") for line in lines)  # nothing edited here
