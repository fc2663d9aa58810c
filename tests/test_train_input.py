"""`train` checked before any job: DeePMD-kit's own argument rules (dargs) on the completed input, what
the chosen backend can train, energy models only, fine-tuning setup (backend, file, type_map, head),
and whether explore.engine can run such models. Each mistake is one line naming the key."""

from __future__ import annotations

import copy
import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml

from dpsnake.errors import UserError
from dpsnake.workflow import config as C

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
SE_ATTEN_V2 = {"type": "se_atten_v2", "rcut": 4.5, "rcut_smth": 1.0, "sel": 48, "neuron": [4, 8]}
DPA3 = {
    "type": "dpa3",
    "repflow": {
        "n_dim": 8,
        "e_dim": 4,
        "a_dim": 4,
        "nlayers": 1,
        "e_rcut": 4.5,
        "e_rcut_smth": 1.0,
        "e_sel": 48,
        "a_rcut": 3.5,
        "a_rcut_smth": 1.0,
        "a_sel": 24,
    },
}


def _model(c):
    return c["train"]["input"]["model"]


def _err(mutate) -> str:
    cfg = copy.deepcopy(DEMO)
    mutate(cfg)
    with pytest.raises(UserError) as e:
        C.check(cfg, ROOT)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda c: _model(c)["descriptor"].update(rcutt=4.0),
            "train.input.model.descriptor.rcutt: unknown key (did you mean rcut?)",
        ),
        (
            lambda c: _model(c)["descriptor"].update(type="se_e2_x"),
            "train.input.model.descriptor.type: unknown choice 'se_e2_x' (did you mean se_e2_r?)",
        ),
        (lambda c: _model(c)["descriptor"].pop("type"), "train.input.model.descriptor.type: required key is missing"),
        (
            lambda c: _model(c)["fitting_net"].update(neuron="big"),
            "train.input.model.fitting_net.neuron: wrong value type",
        ),
        (
            lambda c: c["train"]["input"]["training"].update(numb_stepz=3),
            "train.input.training.numb_stepz: unknown key",
        ),
        (
            lambda c: c["train"]["input"].update(learning_rate={"type": "exp"}),
            "train.input.learning_rate.start_lr: required key is missing",
        ),
        # what the backend cannot train (DeePMD-kit's own "Supported Backend" labels)
        (
            lambda c: _model(c).update(descriptor=DPA3),
            "train.input.model.descriptor.type: 'dpa3' cannot be trained with train.backend: tf (DeePMD-kit supports "
            "it on PyTorch",
        ),
        (
            lambda c: _model(c).update(descriptor={"type": "hybrid", "list": [_model(c)["descriptor"], DPA3]}),
            "train.input.model.descriptor.list[1].type: 'dpa3' cannot be trained with train.backend: tf",
        ),
        (
            lambda c: (
                c["train"].update(backend="pt"),
                _model(c).update(
                    descriptor={
                        "type": "loc_frame",
                        "rcut": 4.0,
                        "sel_a": [4, 4],
                        "sel_r": [4, 4],
                        "axis_rule": [0] * 12,
                    }
                ),
            ),
            "train.input.model.descriptor.type: 'loc_frame' cannot be trained with train.backend: pt (DeePMD-kit "
            "supports it on TensorFlow); use train.backend: tf",
        ),
        # models exploration cannot use
        (
            lambda c: _model(c).update(fitting_net={"type": "dipole", "neuron": [8]}),
            "train.input.model.fitting_net.type: 'dipole' models are not supported",
        ),
        (
            lambda c: _model(c).update(fitting_net={"type": "polar", "neuron": [8]}),
            "train.input.model.fitting_net.type: 'polar' models are not supported",
        ),
        (
            lambda c: _model(c).update(spin={"use_spin": [True, False], "spin_norm": [1.0], "virtual_len": [0.4]}),
            "train.input.model.spin: spin models are not supported",
        ),
        (
            lambda c: c["train"]["input"].update(loss={"type": "dos"}),
            "train.input.loss.type: 'dos' is not an energy loss",
        ),
        (
            lambda c: c["train"]["input"].update(model={"type": "frozen", "model_file": "m.pb"}),
            "train.input.model.type: 'frozen' models cannot be trained",
        ),
        # the exploration engine
        (
            lambda c: (
                c["explore"].update(engine="builtin"),
                c["train"].update(backend="pt"),
                _model(c).update(descriptor=DPA3),
            ),
            "explore.engine: builtin cannot explore train.input.model: descriptor type 'dpa3'",
        ),
        (
            lambda c: (
                c["explore"].update(engine="builtin"),
                c["train"].update(backend="tf"),
                _model(c).update(descriptor=SE_ATTEN_V2),
            ),
            "explore.engine: builtin cannot explore train.input.model: se_atten_v2 models trained by the "
            "TensorFlow backend (train.backend: pt)",
        ),
        # explore.compress on the se_atten path (refused at load, i.e. after training, without this check)
        (
            lambda c: (
                c["explore"].update(compress=2.0),
                c["train"].update(backend="pt"),
                _model(c).update(descriptor={**SE_ATTEN_V2, "type": "se_atten", "tebd_input_mode": "concat"}),
            ),
            "explore.compress: train.input.model.descriptor: se_atten with tebd_input_mode 'concat' cannot be tabulated",
        ),
        (
            lambda c: (
                c["explore"].update(compress=2.0),
                c["train"].update(backend="pt"),
                _model(c).update(descriptor={**SE_ATTEN_V2, "resnet_dt": True}),
            ),
            "explore.compress: train.input.model.descriptor.resnet_dt: true cannot be tabulated",
        ),
        # fine-tuning and the init policies
        (
            lambda c: c["train"].update(finetune={"model": "pre.pt"}),
            "train.finetune: fine-tuning in the loop needs train.backend: pt",
        ),
        (
            lambda c: c["train"].update(backend="pt", finetune={"model": "nowhere/pre.pt"}),
            "train.finetune.model: nowhere/pre.pt: no such file",
        ),
        (
            lambda c: c["train"].update(backend="pt", finetune={"model": "config/config.yaml"}),
            "train.finetune.model: config/config.yaml: expected a DeePMD-kit PyTorch checkpoint (.pt) or frozen model",
        ),
        (lambda c: c["train"].update(backend="pt", finetune={"modle": "pre.pt"}), "train.finetune.modle: unknown key"),
        (lambda c: c["train"].update(init_from_previous="yes:many"), "train.init_from_previous: 'yes:many'"),
    ],
)
def test_bad_train_section_is_one_line(mutate, expected):
    assert expected in _err(mutate)


@pytest.mark.parametrize("policy", [True, False, "no", "yes", "yes:100", "old_data_larger_than:10"])
def test_init_policies_are_valid(policy):
    cfg = copy.deepcopy(DEMO)
    cfg["train"]["init_from_previous"] = policy
    assert C.check(cfg, ROOT)["train"]["init_from_previous"] == policy


def test_models_the_backends_train_pass():
    for backend, desc in (("tf", SE_ATTEN_V2), ("pt", SE_ATTEN_V2), ("pt", DPA3)):
        cfg = copy.deepcopy(DEMO)
        cfg["train"]["backend"] = backend
        _model(cfg)["descriptor"] = desc
        assert C.check(cfg, ROOT)["train"]["input"]["model"]["descriptor"] == desc
    # explore.compress with what the se_atten path tabulates (se_atten_v2; se_atten in strip mode)
    for desc in (SE_ATTEN_V2, {**SE_ATTEN_V2, "type": "se_atten", "tebd_input_mode": "strip"}):
        cfg = copy.deepcopy(DEMO)
        cfg["train"]["backend"] = "pt"
        cfg["explore"]["compress"] = 2.0
        _model(cfg)["descriptor"] = desc
        assert C.check(cfg, ROOT)["explore"]["compress"] == 2.0


def test_check_imports_neither_torch_nor_tensorflow():
    code = (
        "import sys; from dpsnake.workflow import config as C; C.load('config/config.yaml');"
        "print(sorted(m for m in ('torch', 'tensorflow', 'jax', 'paddle') if m in sys.modules))"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def pretrained(pt_model):
    return pt_model("se_atten_v2", seed=3, steps=20)


def _ft(cfg, model, **kw):
    cfg["train"].update(backend="pt", finetune=dict({"model": str(model)}, **kw))
    cfg["train"]["input"].pop("model")  # the architecture comes from the pretrained model
    return cfg


def test_finetune_checks_against_the_pretrained_model(pretrained):
    ckpt, pth = pretrained["dir"] / "model.ckpt.pt", pretrained["pth"]
    for model in (ckpt, pth):
        cfg = C.check(_ft(copy.deepcopy(DEMO), model), ROOT)
        assert cfg["train"]["finetune"] == {
            "model": str(model),
            "model_branch": None,
            "numb_steps": None,
            "use_pretrain_script": True,
        }
    bad = _ft(copy.deepcopy(DEMO), ckpt)
    bad["type_map"] = ["Cu", "Ni", "Al"]
    with pytest.raises(
        UserError,
        match=r"^train.finetune.model: .*model.ckpt.pt has type_map \['Cu', 'Ni'\], "
        r"which lacks \['Al'\] of the config's type_map \['Cu', 'Ni', 'Al'\]$",
    ):
        C.check(bad, ROOT)
    with pytest.raises(UserError, match="^train.finetune.model_branch: 'water': .* is a single-task model"):
        C.check(_ft(copy.deepcopy(DEMO), ckpt, model_branch="water"), ROOT)
    # the pretrained model is se_atten_v2 (its descriptor comes from the pretrained script): the built-in
    # engine explores it (engine/attn), so engine builtin passes the check
    builtin = _ft(copy.deepcopy(DEMO), ckpt)
    builtin["explore"]["engine"] = "builtin"
    assert C.check(builtin, ROOT)["explore"]["engine"] == "builtin"
    # without the pretrained script the input must describe the model itself
    with pytest.raises(UserError, match="^train.input.model.descriptor: required key is missing"):
        C.check(_ft(copy.deepcopy(DEMO), ckpt, use_pretrain_script=False), ROOT)
    with pytest.raises(UserError, match="^train.finetune.model: .*: not a DeePMD-kit PyTorch model"):
        broken = pretrained["dir"].parent / "broken.pt"
        broken.write_bytes(b"not a checkpoint")
        C.check(_ft(copy.deepcopy(DEMO), broken), ROOT)


def test_check_config_and_snakemake_stop_with_the_dargs_line(tmp_path):
    cfg = copy.deepcopy(DEMO)
    _model(cfg)["descriptor"]["rcutt"] = 4.0
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    line = "train.input.model.descriptor.rcutt: unknown key (did you mean rcut?)"
    p = subprocess.run(
        [sys.executable, "-m", "dpsnake.cli", "check-config", str(tmp_path / "bad.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2 and line in p.stderr and len(p.stderr.strip().splitlines()) == 1
    for name in ("Snakefile", "workflow", "profiles"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    p = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", "bad.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert p.returncode != 0 and f"config error: {line}" in p.stdout + p.stderr
    assert not (tmp_path / "results").exists()
