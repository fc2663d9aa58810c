"""Fast checks of the report's readers on files written by the real writers (no training)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from dpsnake.cli import main
from dpsnake.errors import UserError
from dpsnake.report import readers


def _devi(n=6, seed=0):
    rng = np.random.default_rng(seed)
    d = np.abs(rng.normal(size=(n, 7))) * 0.1
    d[:, 0] = np.arange(n) * 10
    return d


def test_model_devi_from_deepmd_and_engine_writers(tmp_path):
    """DeePMD-kit's writer (blank '#' line first, devi_e column) and the engine's (plugin format) both
    parse, with columns named from the header and the values as written (7 significant digits)."""
    from deepmd.infer.model_devi import write_model_devi_out

    from dpsnake.engine.model_devi import COLUMNS, write_model_devi

    d = _devi()
    dd = np.column_stack([d, d[:, 4] * 2])  # DeePMD-kit's dp model-devi adds devi_e
    write_model_devi_out(dd, str(tmp_path / "a.out"))
    write_model_devi(tmp_path / "b.out", d[:, 0].astype(int), {n: d[:, i] for i, n in enumerate(COLUMNS) if i})
    a = readers.read_model_devi(tmp_path / "a.out")
    b = readers.read_model_devi(tmp_path / "b.out")
    assert list(b.columns) == COLUMNS and list(a.columns) == COLUMNS + ["devi_e"]
    for t in (a, b):
        np.testing.assert_array_equal(t["step"], d[:, 0].astype(int))
        np.testing.assert_allclose(t["max_devi_f"], d[:, 4], rtol=1e-6)


def test_broken_files_name_the_file(tmp_path):
    (tmp_path / "model_devi.out").write_text("1 2 3\n")
    with pytest.raises(UserError, match="model_devi.out: no '# step"):
        readers.read_model_devi(tmp_path / "model_devi.out")
    (tmp_path / "lcurve.out").write_text("# step rmse_trn lr\n0 1.0\n")
    with pytest.raises(UserError, match="lcurve.out: 2 columns but the header names 3"):
        readers.read_lcurve(tmp_path / "lcurve.out")
    b = tmp_path / "benchmarks" / "iter.000000"
    b.mkdir(parents=True)
    (b / "train.0.tsv").write_text("oops\n")
    with pytest.raises(UserError, match="train.0.tsv: not a Snakemake benchmark table"):
        readers.benchmarks_table(tmp_path / "benchmarks", 0)


def test_status_before_and_without_a_run(tmp_path, capsys):
    assert main(["status", "--results-dir", str(tmp_path / "nothing")]) == 2
    assert "--results-dir" in capsys.readouterr().err
    (tmp_path / "results" / "iter.000000" / "train" / "model.0").mkdir(parents=True)
    assert main(["status", "--results-dir", str(tmp_path / "results")]) == 0
    assert capsys.readouterr().out.strip() == "iteration 0: training (0 models done)"


def test_benchmark_rules_of_a_sharded_exploration(tmp_path):
    b = tmp_path / "iter.000000"
    b.mkdir()
    for stem in ("explore.shard.0", "explore.shard.1", "explore.merge", "train.0", "plan"):
        (b / f"{stem}.tsv").write_text("s\th:m:s\n1.5\t0:00:01\n")
    t = readers.benchmarks_table(tmp_path, 0).set_index("job")
    assert t.loc["explore.shard.1", "rule"] == "explore_shard" and t.loc["explore.merge", "rule"] == "explore_merge"
    assert t.loc["train.0", "rule"] == "train" and t.loc["plan", "rule"] == "plan"


def test_deviations_grouped_by_condition_not_start_temperature(tmp_path):
    from dpsnake.report.iteration import _deviation_summary

    ex = tmp_path / "iter.000000" / "explore"
    ramp = {"schedule": "linear", "knots": [[0, 300.0], [50, 2500.0], [100, 300.0]]}
    walkers = [
        {"name": "a", "system": "Cu", "temperature": 300.0, "ensemble": "nvt"},
        {"name": "b", "system": "Cu", "temperature": 300.0, "ensemble": "nvt", "temperature_ramp": ramp},
        {"name": "c", "system": "Cu", "temperature": 0.0, "ensemble": "relax"},
    ]
    (ex).mkdir(parents=True)
    (ex / "walkers.json").write_text(json.dumps(walkers))
    head = "#       step         max_devi_v         min_devi_v         avg_devi_v         max_devi_f         min_devi_f         avg_devi_f\n"
    for k, w in enumerate(walkers):
        (ex / w["name"]).mkdir()
        rows = "".join(f"{s} 0 0 0 {0.01 * (k + 1) * (s + 1)} 0 0\n" for s in range(3))
        (ex / w["name"] / "model_devi.out").write_text(head + rows)
    wt = readers.walkers_table(tmp_path, 0)
    assert list(wt["condition"]) == ["300 K", "300-2500-300 K", "relax"]
    systems = pd.DataFrame({"system": ["Cu"], "trust_lo": [0.02], "trust_hi": [0.2]})
    summ = _deviation_summary(readers.deviations_table(tmp_path, 0, wt), systems).set_index("condition")
    assert sorted(summ.index) == ["300 K", "300-2500-300 K", "relax"]
    assert summ.at["300-2500-300 K", "devi_f_max"] == pytest.approx(0.06)
    assert summ.at["300 K", "frames"] == 3 and summ.at["300 K", "accurate_ratio"] == pytest.approx(1 / 3)
