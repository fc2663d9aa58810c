"""Tiny DeePMD-kit models trained for real (TensorFlow backend, CPU) on EMT-labelled data, for tests.

`train_model` caches by the hash of the training input, so one pytest session trains each variant once;
set DPSNAKE_TEST_CACHE to a folder to keep them between sessions while developing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

# type_map of each emt_dataset kind
PT_TYPE_MAPS = {"Cu": ["Cu"], "CuNi": ["Cu", "Ni"], "CuNiAl": ["Cu", "Ni", "Al"]}

# overrides of the default test model: a second member of an ensemble (other seeds)
SEED2 = {"model": {"descriptor": {"seed": 2}, "fitting_net": {"seed": 2}}, "training": {"seed": 2}}


def emt_dataset(outdir: pathlib.Path, kind: str = "Cu", nframes: int = 6, seed: int = 0) -> pathlib.Path:
    """Rattled fcc cells labelled with ASE's EMT, written as deepmd/npy. kind: 'Cu', 'CuNi' or 'CuNiAl'."""
    import dpdata
    from ase.build import bulk
    from ase.calculators.emt import EMT

    out = pathlib.Path(outdir) / f"data_{kind}"
    if (out / "type.raw").exists():
        return out
    rng = np.random.default_rng(seed)
    ms = None
    for _k in range(nframes):
        a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
        if kind == "CuNi":
            a.symbols[rng.permutation(len(a))[: len(a) // 2]] = "Ni"
        elif kind == "CuNiAl":  # a third each (about)
            perm = rng.permutation(len(a))
            a.symbols[perm[: len(a) // 3]] = "Ni"
            a.symbols[perm[len(a) // 3 : 2 * len(a) // 3]] = "Al"
        a.set_cell(a.cell.array * (1 + 0.03 * rng.uniform(-1, 1)), scale_atoms=True)
        a.rattle(0.08, seed=int(rng.integers(1 << 30)))
        a.calc = EMT()
        a.get_potential_energy()
        s = dpdata.LabeledSystem(a, fmt="ase/structure")
        ms = s if ms is None else ms + s
    type_map = PT_TYPE_MAPS[kind]
    ms.apply_type_map(type_map) if hasattr(ms, "apply_type_map") else None
    ms.to_deepmd_npy(str(out), type_map=type_map)
    return out


BASE_INPUT = {
    "model": {
        "type_map": ["Cu"],
        "descriptor": {
            "type": "se_e2_a",
            "rcut": 4.5,
            "rcut_smth": 1.0,
            "sel": [40],
            "neuron": [4, 8],
            "axis_neuron": 4,
            "seed": 1,
        },
        "fitting_net": {"neuron": [8, 8], "resnet_dt": True, "seed": 1},
    },
    "learning_rate": {"type": "exp", "start_lr": 1e-3, "stop_lr": 1e-4, "decay_steps": 10},
    "loss": {
        "type": "ener",
        "start_pref_e": 0.02,
        "limit_pref_e": 1,
        "start_pref_f": 1000,
        "limit_pref_f": 1,
        "start_pref_v": 0.02,
        "limit_pref_v": 1,
    },
    "training": {
        "training_data": {"systems": [], "batch_size": 1},
        "numb_steps": 20,
        "seed": 1,
        "disp_freq": 10,
        "save_freq": 20,
    },
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def train_model(cache: pathlib.Path, overrides: dict | None = None, data: str = "Cu") -> dict:
    """Train, freeze and convert one model; returns {"pb": path, "dp": path, "input": dict}.

    overrides: nested dict merged into BASE_INPUT (e.g. {"model": {"descriptor": {"precision": "float32"}}}).
    data: 'Cu' or 'CuNi' (the type_map is set to match).
    """
    cache = pathlib.Path(cache)
    inp = _merge(BASE_INPUT, overrides or {})
    if data == "CuNi":
        inp["model"]["type_map"] = ["Cu", "Ni"]
        d = inp["model"]["descriptor"]
        if len(d["sel"]) == 1:
            d["sel"] = [d["sel"][0] // 2 + 4, d["sel"][0] // 2 + 4]
    key = hashlib.sha1(json.dumps([inp, data], sort_keys=True).encode()).hexdigest()[:12]
    work = cache / f"model_{key}"
    result = {"pb": work / "frozen_model.pb", "dp": work / "model.dp", "input": inp, "dir": work}
    if result["dp"].exists():
        return result
    work.mkdir(parents=True, exist_ok=True)
    datadir = emt_dataset(cache, data)
    inp["training"]["training_data"]["systems"] = [str(datadir)]
    (work / "input.json").write_text(json.dumps(inp, indent=1))
    env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="3",
        DP_INTER_OP_PARALLELISM_THREADS="1",
        DP_INTRA_OP_PARALLELISM_THREADS="2",
        OMP_NUM_THREADS="2",
    )
    _train_freeze_convert(work, "tf", "frozen_model.pb", env)
    return result


def _train_freeze_convert(work: pathlib.Path, backend: str, frozen: str, env: dict) -> None:
    """`dp train input.json` -> `dp freeze` -> `dp convert-backend` to model.dp in ``work``."""
    dp = [sys.executable, "-m", "deepmd"]
    for cmd in (
        dp + [f"--{backend}", "train", "input.json", "--skip-neighbor-stat"],
        dp + [f"--{backend}", "freeze", "-o", frozen],
        dp + ["convert-backend", frozen, "model.dp"],
    ):
        p = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env)
        if p.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")


# Descriptors of DeePMD-kit's PyTorch backend, small enough to train in seconds on a CPU (CuNi data:
# type_map [Cu, Ni]); the keys are what tests ask train_pt_model for.
PT_DESCRIPTORS = {
    "se_e2_a": {
        "type": "se_e2_a",
        "rcut": 4.5,
        "rcut_smth": 1.0,
        "sel": [24, 24],
        "neuron": [4, 8],
        "axis_neuron": 4,
        "seed": 1,
    },
    "se_atten_v2": {
        "type": "se_atten_v2",
        "rcut": 4.5,
        "rcut_smth": 1.0,
        "sel": 48,
        "neuron": [4, 8],
        "axis_neuron": 4,
        "attn": 8,
        "attn_layer": 1,
        "attn_dotr": True,
        "seed": 1,
    },
    "dpa2": {
        "type": "dpa2",
        "repinit": {
            "rcut": 4.5,
            "rcut_smth": 1.0,
            "nsel": 48,
            "neuron": [4, 8],
            "axis_neuron": 4,
            "activation_function": "tanh",
        },
        "repformer": {
            "rcut": 3.5,
            "rcut_smth": 1.0,
            "nsel": 24,
            "nlayers": 2,
            "g1_dim": 8,
            "g2_dim": 4,
            "attn2_hidden": 4,
            "attn2_nhead": 1,
            "attn1_hidden": 4,
            "attn1_nhead": 1,
            "axis_neuron": 4,
            "update_h2": False,
            "update_g1_has_conv": True,
            "update_g1_has_grrg": True,
            "update_g1_has_drrd": True,
            "update_g1_has_attn": True,
            "update_g2_has_g1g1": True,
            "update_g2_has_attn": True,
            "attn2_has_gate": True,
        },
        "seed": 1,
        "add_tebd_to_repinit_out": False,
    },
    "dpa3": {
        "type": "dpa3",
        "repflow": {
            "n_dim": 8,
            "e_dim": 4,
            "a_dim": 4,
            "nlayers": 2,
            "e_rcut": 4.5,
            "e_rcut_smth": 1.0,
            "e_sel": 48,
            "a_rcut": 3.5,
            "a_rcut_smth": 1.0,
            "a_sel": 24,
            "axis_neuron": 4,
            "update_angle": True,
            "smooth_edge_update": True,
        },
        "seed": 1,
    },
}


def train_pt_model(
    cache: pathlib.Path,
    descriptor: str = "se_atten_v2",
    seed: int = 1,
    steps: int = 10,
    overrides: dict | None = None,
    data: str = "CuNi",
) -> dict:
    """Train (DeePMD-kit PyTorch backend, CPU) and freeze one model with a descriptor of
    PT_DESCRIPTORS on emt_dataset ``data`` (CuNi; also Cu, CuNiAl: the type_map follows);
    returns {"pth": frozen model, "dp": model.dp, "input": dict, "dir": folder}.
    Cached by the hash of the input like train_model."""
    cache = pathlib.Path(cache)
    inp = copy.deepcopy(BASE_INPUT)
    inp["model"]["type_map"] = list(PT_TYPE_MAPS[data])
    inp["model"]["descriptor"] = copy.deepcopy(PT_DESCRIPTORS[descriptor])
    inp["model"]["descriptor"]["seed"] = seed
    inp["model"]["fitting_net"]["seed"] = seed
    inp["training"].update(numb_steps=steps, seed=seed, save_freq=steps, disp_freq=steps)
    inp = _merge(inp, overrides or {})
    key = hashlib.sha1(json.dumps(["pt", inp], sort_keys=True).encode()).hexdigest()[:12]
    work = cache / f"ptmodel_{key}"
    result = {"pth": work / "frozen_model.pth", "dp": work / "model.dp", "input": inp, "dir": work}
    if result["dp"].exists():
        return result
    work.mkdir(parents=True, exist_ok=True)
    datadir = emt_dataset(cache, data)
    inp["training"]["training_data"]["systems"] = [str(datadir)]
    (work / "input.json").write_text(json.dumps(inp, indent=1))
    env = dict(
        os.environ,
        OMP_NUM_THREADS="2",
        DP_INTRA_OP_PARALLELISM_THREADS="2",
        DP_INTER_OP_PARALLELISM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
    )
    _train_freeze_convert(work, "pt", "frozen_model.pth", env)
    return result
