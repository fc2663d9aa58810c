"""The run report's learning curve (issue 18 item 4) equals an independent computation.

The results/ tree is report_tree.build's (real DeePMD-kit models, EMT labels, dpdata); the run
report is written by the real CLI. The test evaluates the iteration's models itself with DeePMD-kit's
DeepPot on each iteration's new labels and on the test set, and counts the training frames from the
raw npy arrays.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import report_tree as tree

from dpsnake.cli import main
from dpsnake.report import learning

pytestmark = pytest.mark.slow  # trains two tiny models when the cache is cold (~1 min)


@pytest.fixture(scope="module")
def run(dp_model, tmp_path_factory):
    models = [dp_model(None, "CuNi"), dp_model(tree.SEED2, "CuNi")]
    facts = tree.build(tmp_path_factory.mktemp("lcurve") / "proj", models)
    assert main(["report", "--config", str(facts["config"]), "--run"]) == 0
    return facts


def _frames(path) -> int:
    return sum(np.load(p).shape[0] for p in path.glob("set.*/coord.npy"))


def _mean_rmse(dps, path) -> tuple[float, float, int]:
    """Ensemble-mean energy/atom and force RMSE of the models on one deepmd/npy folder, by DeePMD-kit."""
    import dpdata

    s = dpdata.LabeledSystem(str(path), fmt="deepmd/npy")
    tm = dps[0].get_type_map()
    at = [tm.index(s["atom_names"][t]) for t in s["atom_types"]]
    nf, n = len(s), len(at)
    outs = [dp.eval(s["coords"].reshape(nf, -1), s["cells"].reshape(nf, -1), at) for dp in dps]
    e = np.mean([o[0].reshape(nf) for o in outs], 0)
    f = np.mean([o[1].reshape(nf, n, 3) for o in outs], 0)
    return (
        float(np.sqrt(np.mean(((e - s["energies"]) / n) ** 2))),
        float(np.sqrt(np.mean((f - s["forces"]) ** 2))),
        nf,
    )


def test_learning_curve_equals_deepmd_kit(run):
    from deepmd.infer import DeepPot

    res, rep = run["results"], run["results"] / "reports"
    rj = json.loads((rep / "run.json").read_text())
    lc = {(r["set"], r["system"], r["iteration"]): r for r in rj["learning_curve"]}
    csv = pd.read_csv(rep / "learning_curve.csv")
    assert list(csv.columns) == learning.COLUMNS and len(csv) == len(lc)
    for r in csv.to_dict(orient="records"):  # the CSV holds the JSON's numbers
        j = lc[(r["set"], r["system"], r["iteration"])]
        for k in ("labels_total", "frames", "rmse_e_atom", "rmse_f"):
            assert r[k] == pytest.approx(j[k], rel=1e-12), k
    expected = set()
    for it in (0, 1):
        # the models of iteration `it`: its train/model.K/model.dp are the fixture's models (frozen as .pb)
        for k, m in enumerate(run["models"]):
            dp_file = res / f"iter.{it:06d}" / "train" / f"model.{k}" / "model.dp"
            assert dp_file.read_bytes() == (m["dir"] / "model.dp").read_bytes()
        dps = [DeepPot(str(m["pb"])) for m in run["models"]]
        trained = {
            name: _frames(res / "data" / "init" / name)
            + sum(
                _frames(res / "data" / f"iter.{k:06d}" / name)
                for k in range(it)
                if (res / "data" / f"iter.{k:06d}" / name).is_dir()
            )
            for name in tree.SYSTEMS
        }
        total = sum(trained.values())
        for name in tree.SYSTEMS:
            new = res / "data" / f"iter.{it:06d}" / name
            if not new.is_dir():
                continue
            expected.add(("next", name, it))
            row = lc[("next", name, it)]
            e, f, nf = _mean_rmse(dps, new)
            assert row["frames"] == nf == _frames(new)
            assert row["labels_system"] == trained[name] and row["labels_total"] == total
            assert row["rmse_f"] == pytest.approx(f, rel=1e-8)
            assert row["rmse_e_atom"] == pytest.approx(e, rel=1e-8)
        e, f, nf = _mean_rmse(dps, run["root"] / "tests_data" / "CuNi_hot")
        expected.add(("test", "CuNi_hot", it))
        row = lc[("test", "CuNi_hot", it)]
        assert row["labels_system"] is None and row["labels_total"] == total and row["frames"] == nf
        assert row["rmse_f"] == pytest.approx(f, rel=1e-8)
        assert row["rmse_e_atom"] == pytest.approx(e, rel=1e-8)
    assert set(lc) == expected  # both iterations labelled frames for both systems
    assert {k[1] for k in expected if k[0] == "next"} == set(tree.SYSTEMS)
    html = (rep / "index.html").read_text()
    assert (
        'id="labels"' in html
        and 'alt="learning curve"' in html
        and "next-iteration error" in html
        and "&lt;NA&gt;" not in html
    )


def _content(it, datasets, acc):
    return {
        "iteration": it,
        "datasets": [{"system": s, "source": src, "frames": n} for s, src, n in datasets],
        "accuracy": [
            {"set": st, "system": s, "source": src, "model": "mean", "frames": n, "rmse_e_atom": e, "rmse_f": f}
            for st, s, src, n, e, f in acc
        ],
    }


def test_rows_edge_cases():
    # a system whose only dataset is this iteration's new labels: its "all" row is the new labels alone
    c = _content(
        2,
        [("A", "init", 5), ("A", "iter.000000", 2), ("A", "iter.000002", 3), ("B", "iter.000002", 4)],
        [
            ("labelled", "A", "all", 10, 0.1, 0.2),
            ("labelled", "A", "iter.000002", 3, 0.3, 0.4),
            ("labelled", "B", "all", 4, 0.5, 0.6),
            ("labelled", "A", "init", 5, 0.0, 0.1),
        ],
    )
    rows = {r["system"]: r for r in learning.rows(c)}
    assert rows["A"] == {
        "iteration": 2,
        "set": "next",
        "system": "A",
        "labels_system": 7,
        "labels_total": 7,
        "frames": 3,
        "rmse_e_atom": 0.3,
        "rmse_f": 0.4,
    }
    assert rows["B"]["labels_system"] == 0 and rows["B"]["frames"] == 4 and rows["B"]["rmse_f"] == 0.6
    # an iteration that labelled nothing has no next-iteration row; no evaluation (--no-accuracy): no rows
    c = _content(3, [("A", "init", 5)], [("labelled", "A", "all", 5, 0.1, 0.2), ("test", "T", "all", 2, 0.3, 0.4)])
    assert [(r["set"], r["system"], r["labels_total"]) for r in learning.rows(c)] == [("test", "T", 5)]
    assert learning.rows(_content(3, [("A", "init", 5), ("A", "iter.000003", 1)], [])) == []
    t = learning.table([c])
    assert learning.records(t) == [
        {
            "iteration": 3,
            "set": "test",
            "system": "T",
            "labels_system": None,
            "labels_total": 5,
            "frames": 2,
            "rmse_e_atom": 0.3,
            "rmse_f": 0.4,
        }
    ]
