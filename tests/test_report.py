"""Reports: numbers equal their source files; DeePMD-kit recomputes the RMSE; Chromium shows the plots.

The results/ tree is built by report_tree.build from real parts (DeePMD-kit models, EMT labels,
dpdata, Snakemake benchmark files); the reports are written once per module by the real CLI.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import tempfile

import numpy as np
import pandas as pd
import pytest
import report_tree as tree

from dpsnake.cli import main

pytestmark = pytest.mark.slow  # trains two tiny models when the cache is cold (~1 min)


@pytest.fixture(scope="module")
def run(dp_model, tmp_path_factory):
    models = [dp_model(None, "CuNi"), dp_model(tree.SEED2, "CuNi")]
    facts = tree.build(tmp_path_factory.mktemp("report") / "proj", models)
    cfg = str(facts["config"])
    assert main(["report", "--config", cfg, "--iter", "0"]) == 0
    assert main(["report", "--config", cfg, "--run"]) == 0  # writes iteration 1 as well
    return facts


def _stats(res, it):
    return json.loads((res / f"iter.{it:06d}" / "select" / "stats.json").read_text())


def test_counts_equal_stats_and_collect(run):
    res = run["results"]
    for it in (0, 1):
        csv = pd.read_csv(res / "reports" / f"iter.{it:06d}.csv").set_index("system")
        stats = _stats(res, it)
        coll = json.loads((res / f"iter.{it:06d}" / "collect" / "summary.json").read_text())
        assert sorted(csv.index) == sorted(stats["systems"])
        for name, s in stats["systems"].items():
            for k in ("accurate", "candidate", "failed", "total", "selected"):
                assert csv.at[name, k] == s[k], (it, name, k)
            for k in ("accurate_ratio", "candidate_ratio", "failed_ratio", "trust_lo", "trust_hi"):
                assert csv.at[name, k] == pytest.approx(s[k], rel=1e-12), (it, name, k)
            assert csv.at[name, "labelled"] == coll["systems"][name]["added"]
            assert csv.at[name, "label_failed"] == coll["systems"][name]["failed"]
            # dataset size: frames in init + iter.0..it, counted from the raw npy arrays
            n = sum(
                np.load(p).shape[0]
                for p in (res / "data").glob(f"*/{name}/set.*/coord.npy")
                if p.parents[2].name == "init" or int(p.parents[2].name.split(".")[1]) <= it
            )
            assert csv.at[name, "data_frames"] == n
        rep = json.loads((res / "reports" / f"iter.{it:06d}.json").read_text())
        assert rep["labelling"]["labelled"] == coll["labelled"] and rep["labelling"]["failed"] == coll["failed"]
        for k in ("converged", "stop", "next_stage", "stage", "stage_iteration"):
            assert rep["decision"][k] == stats[k], (it, k)
        if it == 0:  # CuNi below the threshold: the stage repeats (select's own words are not reused)
            r = stats["systems"]["CuNi"]["accurate_ratio"]
            assert r < 0.3 <= stats["systems"]["Cu"]["accurate_ratio"]
            assert (
                rep["decision"]["reason"] == f"accurate ratio below 0.3: CuNi {r:.3f} (iteration 0); repeating stage 0"
            )
        for name, c in coll["systems"].items():  # new labels by walker, from provenance.csv
            assert sum(r["frames"] for r in rep["new_labels"] if r["system"] == name) == c["added"]
    # walkers stopped early: exactly the failed walker of iteration 0
    rep0 = json.loads((res / "reports" / "iter.000000.json").read_text())
    assert [w["walker"] for w in rep0["stopped_early"]] == ["CuNi.T900"]
    assert rep0["stopped_early"][0]["reason"] == "max_devi_f above max_devi_f_cap"
    csv0 = pd.read_csv(res / "reports" / "iter.000000.csv").set_index("system")
    assert csv0.at["CuNi", "walkers_stopped"] == 1 and csv0.at["Cu", "walkers_stopped"] == 0
    assert csv0.at["CuNi", "walkers"] == len(tree.TEMPS)


def test_deviation_and_learning_curve_tables(run):
    res = run["results"]
    rep = json.loads((res / "reports" / "iter.000000.json").read_text())
    for row in rep["deviations"]:
        f = res / "iter.000000" / "explore" / f"{row['system']}.T{int(row['temperature'])}" / "model_devi.out"
        col = np.loadtxt(f, ndmin=2)[:, 4]  # max_devi_f
        assert row["frames"] == len(col)
        assert row["devi_f_max"] == pytest.approx(col.max(), rel=1e-6)  # file has 7 significant digits
        assert row["devi_f_median"] == pytest.approx(np.median(col), rel=1e-6)
    assert {(r["system"], r["temperature"]) for r in rep["deviations"]} == {
        (s, t) for s in tree.SYSTEMS for t in tree.TEMPS
    }
    for lc in rep["learning_curves"]:
        last = np.loadtxt(res / "iter.000000" / "train" / lc["model"] / "lcurve.out", ndmin=2)[-1]
        assert lc["step"] == last[0] and lc["rmse_f_trn"] == pytest.approx(last[3])
    assert len(rep["learning_curves"]) == 2


def test_rule_times_equal_snakemake_benchmarks(run):
    rep = json.loads((run["results"] / "reports" / "iter.000000.json").read_text())
    times = {r["rule"]: r for r in rep["rule_times"]}
    bench = run["root"] / "benchmarks" / "iter.000000"
    tsv = {f.stem: pd.read_csv(f, sep="\t")["s"].iloc[0] for f in bench.glob("*.tsv")}
    assert times["train"]["jobs"] == 2
    assert times["train"]["wall_s_total"] == pytest.approx(tsv["train.0"] + tsv["train.1"])
    assert times["explore"]["wall_s_total"] == pytest.approx(tsv["explore.0"])
    assert times["train"]["wall_s_total"] >= 0.5  # each job slept 0.3 s


def test_rmse_equals_deepmd_kit(run):
    """The engine-computed RMSE (per model and ensemble mean) recomputed with deepmd.infer.DeepPot."""
    import dpdata
    from deepmd.infer import DeepPot

    res = run["results"]
    dps = [DeepPot(str(m["pb"])) for m in run["models"]]
    tm = dps[0].get_type_map()
    for it in (0, 1):
        rep = json.loads((res / "reports" / f"iter.{it:06d}.json").read_text())
        acc = {(r["set"], r["system"], r["source"], r["model"]): r for r in rep["accuracy"]}
        groups = {
            name: [
                p
                for p in sorted((res / "data").glob(f"*/{name}"))
                if p.parent.name == "init" or int(p.parent.name.split(".")[1]) <= it
            ]
            for name in tree.SYSTEMS
        }
        groups["CuNi_hot"] = [run["root"] / "tests_data" / "CuNi_hot"]
        for name, paths in groups.items():
            e_err, f_err = [[] for _ in range(3)], [[] for _ in range(3)]
            for p in paths:
                s = dpdata.LabeledSystem(str(p), fmt="deepmd/npy")
                at = [tm.index(s["atom_names"][t]) for t in s["atom_types"]]
                n = len(at)
                outs = [dp.eval(s["coords"].reshape(len(s), -1), s["cells"].reshape(len(s), -1), at) for dp in dps]
                preds = [(o[0].reshape(-1), o[1].reshape(len(s), n, 3)) for o in outs]
                preds.append((np.mean([q[0] for q in preds], 0), np.mean([q[1] for q in preds], 0)))
                for k, (e, f) in enumerate(preds):
                    e_err[k].append((e - s["energies"]) / n)
                    f_err[k].append((f - s["forces"]).reshape(-1))
                if len(paths) > 1:  # per-source row (ensemble mean) of this dataset alone
                    row = acc[("labelled", name, p.parent.name, "mean")]
                    assert row["rmse_f"] == pytest.approx(np.sqrt(np.mean(f_err[2][-1] ** 2)), rel=1e-10)
                    assert row["rmse_e_atom"] == pytest.approx(np.sqrt(np.mean(e_err[2][-1] ** 2)), rel=1e-10)
            setname = "test" if name == "CuNi_hot" else "labelled"
            for k, model in enumerate(["model.0", "model.1", "mean"]):
                row = acc[(setname, name, "all", model)]
                ref_e = np.sqrt(np.mean(np.concatenate(e_err[k]) ** 2))
                ref_f = np.sqrt(np.mean(np.concatenate(f_err[k]) ** 2))
                assert row["rmse_e_atom"] == pytest.approx(ref_e, rel=1e-10, abs=1e-12), (it, name, model)
                assert row["rmse_f"] == pytest.approx(ref_f, rel=1e-10, abs=1e-12), (it, name, model)
                assert row["frames"] == sum(len(x) for x in e_err[k])
        csv = pd.read_csv(res / "reports" / f"iter.{it:06d}.csv").set_index("system")
        for name in tree.SYSTEMS:
            assert csv.at[name, "rmse_f"] == pytest.approx(acc[("labelled", name, "all", "mean")]["rmse_f"], rel=1e-12)


def test_run_level_files(run):
    res = run["results"]
    runcsv = pd.read_csv(res / "reports" / "run.csv")
    parts = pd.concat([pd.read_csv(res / "reports" / f"iter.{it:06d}.csv") for it in (0, 1)], ignore_index=True)
    pd.testing.assert_frame_equal(runcsv, parts)
    rj = json.loads((res / "reports" / "run.json").read_text())
    stats1 = _stats(res, 1)
    assert rj["iterations"] == [0, 1]
    latest = {
        n: {"iteration": 1, "stage": 0, "accurate_ratio": s["accurate_ratio"]} for n, s in stats1["systems"].items()
    }
    words = ", ".join(f"{n} {s['accurate_ratio']:.3f} (iteration 1)" for n, s in sorted(stats1["systems"].items()))
    assert rj["decision"] == {
        "iteration": 1,
        "converged": True,
        "threshold": 0.3,
        "stop": True,
        "next_stage": None,
        "stage": 0,
        "stage_iteration": 1,
        "latest": latest,
        "below": [],
        "reason": f"every system's latest accurate ratio >= 0.3: {words}",
    }
    assert rj["stale_data"] == []  # the tree's config names no structure files
    html = (res / "reports" / "index.html").read_text()
    assert 'href="iter.000000.html"' in html and 'href="iter.000001.html"' in html
    assert "converged</span> at iteration 1" in html
    # what each iteration decided, in words after its link, and explained below the list
    assert "iteration 0</a> (stage 0 again)" in html and "iteration 1</a> (converged)" in html
    assert "In brackets: what each iteration decided at its end" in html and "(-)" not in html
    # per system: when it was last explored and with what ratio
    assert "last_explored" in html and "latest accurate ratio reaches the threshold" in html


def test_run_page_while_an_iteration_is_running(run, tmp_path):
    """An unfinished iteration is summarised but not cached; once collected, --run reports it fully."""
    proj = tmp_path / "proj"
    shutil.copytree(run["results"], proj / "results", ignore=shutil.ignore_patterns("reports"))
    cfg = proj / "results" / "config.json"
    cfg.write_text(json.dumps(json.loads(cfg.read_text()) | {"results_dir": str(proj / "results")}))
    summ = proj / "results" / "iter.000001" / "collect" / "summary.json"
    saved = summ.read_text()
    summ.unlink()
    assert main(["report", "--config", str(cfg), "--run"]) == 0
    rep = proj / "results" / "reports"
    assert (rep / "iter.000000.json").is_file() and not (rep / "iter.000001.json").exists()
    rows = pd.read_csv(rep / "run.csv")
    r1 = rows[rows["iteration"] == 1]
    assert len(r1) == 2 and r1["labelled"].isna().all() and r1["rmse_f"].isna().all()
    assert list(r1["accurate"]) == [_stats(run["results"], 1)["systems"][n]["accurate"] for n in r1["system"]]
    summ.write_text(saved)
    assert main(["report", "--config", str(cfg), "--run"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(rep / "run.csv"), pd.read_csv(run["results"] / "reports" / "run.csv"))


def test_status_table(run, capsys):
    res = run["results"]
    assert main(["status", "--results-dir", str(res)]) == 0
    out = capsys.readouterr().out.splitlines()
    head = out[0].split()
    assert head[:5] == ["iter", "system", "accurate", "candidate", "failed"]
    rows = [line.split() for line in out[1:5]]
    for it in (0, 1):
        for name, s in _stats(res, it)["systems"].items():
            row = next(r for r in rows if r[0] == str(it) and r[1] == name)
            assert [int(x) for x in row[2:5]] == [s["accurate"], s["candidate"], s["failed"]]
            assert float(row[5]) == pytest.approx(s["accurate_ratio"], abs=5e-4)
    r0 = _stats(res, 0)["systems"]["CuNi"]["accurate_ratio"]
    assert (
        f"iteration 0: reported; not converged: accurate ratio below 0.3: CuNi {r0:.3f} (iteration 0); repeating stage 0"
        in out
    )
    assert out[-1].startswith("iteration 1: reported; converged")


def test_bad_input_one_line(run, tmp_path, capsys):
    res = run["results"]
    assert main(["report", "--config", str(tmp_path / "nope.json"), "--iter", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--config" in err[0] and "nope.json" in err[0]
    assert main(["report", "--config", str(run["config"]), "--iter", "7"]) == 2
    assert "--iter 7" in capsys.readouterr().err
    cfg = json.loads(run["config"].read_text()) | {"test_data": [str(tmp_path / "missing_set")]}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    before = (res / "reports" / "iter.000000.json").read_text()
    assert main(["report", "--config", str(tmp_path / "c.json"), "--iter", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "test_data[0]" in err[0] and "missing_set" in err[0]
    assert (res / "reports" / "iter.000000.json").read_text() == before  # nothing half-written
    # a broken stats.json is named, not a traceback
    bad = tmp_path / "proj"
    shutil.copytree(run["results"], bad / "results")
    (bad / "results" / "iter.000001" / "select" / "stats.json").write_text("{not json")
    assert main(["status", "--results-dir", str(bad / "results")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stats.json" in err[0]


def _screenshot(html: pathlib.Path, out: pathlib.Path, height: int) -> np.ndarray:
    import matplotlib.image as mpimg

    with tempfile.TemporaryDirectory() as prof:
        p = subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={prof}",
                f"--window-size=1400,{height}",
                f"--screenshot={out}",
                html.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert p.returncode == 0 and out.is_file(), p.stderr[-2000:]
    return (mpimg.imread(out)[:, :, :3] * 255).astype(int)


def _near(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> int:
    return int((np.abs(img - np.array(rgb)).max(axis=2) <= tol).sum())


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_html_renders_with_plots_in_chromium(run, tmp_path):
    rep = run["results"] / "reports"
    img = _screenshot(rep / "iter.000000.html", tmp_path / "iter.png", 3200)
    # matplotlib's colours of the stacked selection bars, histograms and lines: only drawn plots give them
    green, orange, red, blue = (44, 160, 44), (255, 127, 14), (214, 39, 40), (31, 119, 180)
    for c in (green, orange, red, blue):
        assert _near(img, c) > 500, c
    # plots occupy the page: many non-white pixels in the left column, top to bottom
    nonwhite = (img.min(axis=2) < 200).sum(axis=1)
    assert (nonwhite > 50).sum() > 800
    # an <img> that failed to decode renders nothing: all five figures must have been laid out
    assert (rep / "iter.000000.html").read_text().count('<img class="plot"') == 5
    img = _screenshot(rep / "index.html", tmp_path / "index.png", 1400)
    assert _near(img, blue) > 300 and _near(img, orange) > 300  # Cu and CuNi trend lines


# How the workflow's report rules wrap the pages for `snakemake --report` (docs/reports.md shows the
# same); captions are the shipped workflow/report/*.rst.
REPORT_SNAKEFILE = """
report: "workflow/report/workflow.rst"

ITS = ["000000", "000001"]

rule all:
    input: expand("results/reports/iter.{it}.html", it=ITS), "results/reports/index.html"

rule report_iter:
    input: "results/iter.{it}/select/stats.json", "results/iter.{it}/collect/summary.json"
    output:
        html=report("results/reports/iter.{it}.html", caption="workflow/report/iteration.rst",
                    category="Accuracy reports", subcategory="Iterations",
                    labels={"iteration": "{it}", "file": "page"}),
        csv=report("results/reports/iter.{it}.csv", caption="workflow/report/iteration_table.rst",
                   category="Accuracy reports", subcategory="Iterations",
                   labels={"iteration": "{it}", "file": "table"}),
        json="results/reports/iter.{it}.json",
    shell: "dpsnake report --config results/config.json --iter {wildcards.it}"

rule report_run:
    input: expand("results/reports/iter.{it}.json", it=ITS)
    output:
        html=report("results/reports/index.html", caption="workflow/report/run.rst",
                    category="Accuracy reports", subcategory="Run", labels={"iteration": "all", "file": "page"}),
        csv=report("results/reports/run.csv", caption="workflow/report/run_table.rst",
                   category="Accuracy reports", subcategory="Run", labels={"iteration": "all", "file": "table"}),
        json="results/reports/run.json",
    shell: "dpsnake report --config results/config.json --run"
"""


def test_snakemake_report_zip_includes_pages(run, tmp_path):
    import sys
    import zipfile

    wf = tmp_path / "wf"
    shutil.copytree(run["root"], wf, ignore=shutil.ignore_patterns(".snakemake", "Snakefile", "reports"))
    cfg = json.loads((wf / "results" / "config.json").read_text()) | {"results_dir": "results"}
    (wf / "results" / "config.json").write_text(json.dumps(cfg))
    shutil.copytree(pathlib.Path(__file__).parents[1] / "workflow" / "report", wf / "workflow" / "report")
    (wf / "Snakefile").write_text(REPORT_SNAKEFILE)
    for cmd in (["--cores", "2", "--quiet"], ["--report", "report.zip"]):
        p = subprocess.run([sys.executable, "-m", "snakemake", *cmd], cwd=wf, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
    with zipfile.ZipFile(wf / "report.zip") as z:
        names = {pathlib.Path(n).name: n for n in z.namelist()}
        for f in ("iter.000000.html", "iter.000001.html", "iter.000000.csv", "index.html", "run.csv"):
            assert z.read(names[f]) == (wf / "results" / "reports" / f).read_bytes(), f
        main_html = z.read(names["report.html"]).decode()
    assert "Accuracy report of iteration 000001" in main_html  # caption rendered with the wildcard
    # the pages written under Snakemake hold the same numbers as those of the fixture
    a = pd.read_csv(wf / "results" / "reports" / "run.csv")
    b = pd.read_csv(run["results"] / "reports" / "run.csv")
    pd.testing.assert_frame_equal(a, b)
