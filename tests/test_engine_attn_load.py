"""se_atten(_v2) models: what the loader refuses (one line naming the file and the feature), the
dispatching loader and DeePMD-kit-style interfaces, and `explore.engine: auto` picking the built-in
engine for them (DeePMD-kit's provider for what it cannot run)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from engine_helpers import edit_dp, fcc, frame, ref_eval, rel_err
from test_engine_attn import attn_model

from dpsnake.engine.attn.model import AttnModel
from dpsnake.engine.dispatch import load_any, make_ensemble
from dpsnake.engine.model import DPModel
from dpsnake.engine.validate import DamagedModelError
from dpsnake.errors import UserError
from dpsnake.md.engines import builtin_unsupported, choose
from dpsnake.report.iteration import _engine_line


def _desc(key, value):
    def fn(m):
        m["descriptor"][key] = value

    return fn


def _fit(key, value):
    def fn(m):
        m["fitting"][key] = value

    return fn


def _act(m):
    m["descriptor"]["embeddings"]["networks"][0]["layers"][0]["activation_function"] = "swish_x"


def _heads(m):
    m["descriptor"]["attention_layers"]["attention_layers"][0]["attention_layer"]["num_heads"] = 2


def _mode(m):
    m["descriptor"]["type"] = "se_atten"
    m["descriptor"]["tebd_input_mode"] = "mixed"


REFUSED = {
    "lmax": (_desc("lmax", 2), "lmax=2"),
    "spin": (_desc("spin", {"use_spin": [True, False]}), "spin"),
    "fparam": (_fit("numb_fparam", 1), "numb_fparam=1"),
    "econf": (_desc("use_econf_tebd", True), "use_econf_tebd"),
    "activation": (_act, "activation_function 'swish_x'"),
    "heads": (_heads, "num_heads"),
    "mode": (_mode, "tebd_input_mode 'mixed'"),
    "attn_mask": (_desc("attn_mask", True), "attn_mask"),
    "compress": (_desc("compress", {"geo_compress": True}), "compressed"),
    "dim_out": (_fit("dim_out", 2), "dim_out=2"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_features_are_one_line(model_cache, tmp_path, case):
    fn, what = REFUSED[case]
    dst = edit_dp(attn_model(model_cache, "v2_l2")["dp"], tmp_path / f"{case}.dp", fn)
    with pytest.raises(UserError) as err:
        load_any(dst)
    msg = str(err.value)
    assert not isinstance(err.value, DamagedModelError), msg
    assert msg.startswith(dst) and what in msg and "\n" not in msg, msg


def test_tensorflow_written_se_atten_is_refused(model_cache, tmp_path):
    import h5py

    dst = tmp_path / "tf.dp"
    dst.write_bytes(attn_model(model_cache, "v2_l0")["dp"].read_bytes())
    with h5py.File(dst, "r+") as f:
        d = json.loads(f.attrs["json"])
        d["backend"] = "TensorFlow"
        f.attrs["json"] = json.dumps(d)
    with pytest.raises(UserError, match="TensorFlow"):
        load_any(dst)


def test_dispatch_and_interfaces(model_cache, cu_model):
    """load_any / make_ensemble pick the path by descriptor; DeepPot and the ASE calculator run
    se_atten_v2 .dp files (= DeePMD-kit); se_e2_a and se_atten models together: one line."""
    from dpsnake import DP, DeepPot

    m = attn_model(model_cache, "v2_l2")
    assert isinstance(load_any(m["dp"]), AttnModel) and isinstance(load_any(cu_model["dp"]), DPModel)
    with pytest.raises(UserError, match="cannot form one ensemble"):
        make_ensemble([m["dp"], cu_model["dp"]])
    dp = DeepPot(str(m["dp"]))
    assert dp.get_type_map() == ["Cu", "Ni"]
    at = fcc(rep=(2, 2, 2), seed=4, ni_frac=0.5)
    c, cl, t = frame(at, dp.get_type_map())
    e, f, v = dp.eval(c, cl, t)
    re, rf, rv, _, _ = ref_eval(m["pth"], c, cl, t)
    assert rel_err(e, re) < 1e-10 and rel_err(f, rf) < 1e-10 and rel_err(v, rv) < 1e-10
    at.calc = DP(model=str(m["dp"]))
    assert abs(at.get_potential_energy() - re[0, 0]) < 1e-10 * abs(re[0, 0])
    assert rel_err(at.get_forces(), rf[0]) < 1e-10


def test_engine_choice(model_cache, tmp_path):
    """auto: builtin for se_atten_v2 / se_atten, the reason naming the descriptor; a model the path
    cannot run goes to DeePMD-kit with the loader's line as the reason; builtin with it: that line."""
    v2, concat = (str(attn_model(model_cache, n)["dp"]) for n in ("v2_l2", "concat_l2"))
    engine, why, loaded = choose("auto", [v2, v2])
    assert engine == "builtin" and "se_atten_v2" in why and len(loaded) == 2
    engine, why, _ = choose("auto", [concat])
    assert engine == "builtin" and "se_atten" in why
    bad = edit_dp(v2, tmp_path / "lmax.dp", _desc("lmax", 2))
    engine, why, loaded = choose("auto", [v2, bad])
    assert engine == "deepmd" and loaded is None and bad in why and "lmax=2" in why, why
    with pytest.raises(UserError, match="lmax=2"):
        choose("builtin", [bad])
    # what the workflow's check-time test says of a training input
    assert builtin_unsupported({"descriptor": {"type": "se_atten_v2", "sel": 48}}) is None
    assert builtin_unsupported({"descriptor": {"type": "se_atten", "tebd_input_mode": "strip"}}) is None
    assert "lmax=2" in builtin_unsupported({"descriptor": {"type": "se_atten_v2", "lmax": 2}})
    assert "dpa2" in builtin_unsupported({"descriptor": {"type": "dpa2"}})


def _explore(tmp_path, models, engine, outdir, extra=()):
    return subprocess.run(
        [sys.executable, "-m", "dpsnake.cli", "explore", "--models", *models, "--walkers", str(tmp_path / "w.json")]
        + ["--outdir", str(tmp_path / outdir), "--device", "cpu", "--engine", engine, "--no-progress", *extra],
        capture_output=True,
        text=True,
    )


def test_explore_auto_picks_builtin(model_cache, tmp_path):
    """`dpsnake explore --engine auto` with two se_atten_v2 .dp files runs the built-in engine (the
    reason says se_atten_v2) and writes the model deviations DeePMD-kit's provider writes; engine.json says the
    precision each explored in (``--tf32`` on a CPU: one line, ignored)."""
    at = fcc(rep=(1, 1, 1), seed=2, ni_frac=0.5)
    at.write(tmp_path / "s.extxyz", format="extxyz")
    walker = dict(name="w", structure=str(tmp_path / "s.extxyz"), ensemble="nve", temperature=300.0)
    walker.update(nsteps=10, dt=0.002, trj_freq=5, seed=1)
    (tmp_path / "w.json").write_text(json.dumps([walker]))
    models = [str(attn_model(model_cache, n)["dp"]) for n in ("v2_l2", "excl")]
    p = _explore(tmp_path, models, "auto", "a", ["--tf32"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "--tf32: TF32 needs --precision mixed on a GPU; ignored here" in p.stdout, p.stdout
    info = json.loads((tmp_path / "a" / "engine.json").read_text())
    assert info["engine"] == "builtin" and "se_atten_v2" in info["reason"], info
    assert info["precision"] == "double", info
    assert "on the cpu, precision double (" in _engine_line(info)  # the iteration report's line
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["walkers"]["w"]["status"] == "finished"
    ours = np.loadtxt(tmp_path / "a" / "w" / "model_devi.out")
    p = _explore(tmp_path, models, "deepmd", "b")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "b" / "engine.json").read_text())["precision"] == "as trained"
    ref = np.loadtxt(tmp_path / "b" / "w" / "model_devi.out")
    assert ours.shape == ref.shape and len(ours) == 3
    assert np.allclose(ours, ref, rtol=1e-5, atol=1e-9) and ours[:, 4].min() > 0
