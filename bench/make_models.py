"""Make the models the GPU benchmarks read from the git-ignored ``.whl/models`` (CPU, DeePMD-kit 3.2
TensorFlow backend; a few minutes on 2 cores; the benchmarks measure speed, so 20 training steps).

- ``cu_float64_1``, ``cu_float32_{1..4}``: the DeePMD-kit v2 paper's Cu se_e2_a (rcut 6, rcut_smth 0.5,
  sel [152], embedding [25, 50, 100], axis 16, fitting [240, 240, 240] resnet_dt), trained on 10
  rattled 108-atom fcc Cu frames (a = 3.634 A, EMT labels), frozen and converted to ``model.dp`` (ours)
  and ``model.pth`` (DeePMD-kit's PyTorch backend, which ``bench_engine.py --deepmd`` times);
- ``t_cu.dp``, ``t_cuni.dp``, ``t_tos32.dp``: the test suite's tiny models (``tests/dpmodels.py``: one
  type; two types; two types type_one_side FP32 with exclude_types), for ``bench_engine.py --check`` and
  the GPU tests.

    python bench/make_models.py [OUT]          (default .whl/models; existing models are kept)
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS="2", DP_INTER_OP_PARALLELISM_THREADS="1")
# tests/test_engine.py's CUNI_TOS32
TOS32 = {
    "model": {
        "descriptor": {"type_one_side": True, "precision": "float32", "exclude_types": [[1, 1]]},
        "fitting_net": {"precision": "float32"},
    }
}


def cu_data(out: pathlib.Path) -> pathlib.Path:
    import dpdata
    from ase.build import bulk
    from ase.calculators.emt import EMT

    path = out / "data_cu108"
    if (path / "type.raw").exists():
        return path
    ms = None
    for k in range(10):
        a = bulk("Cu", "fcc", a=3.634, cubic=True).repeat((3, 3, 3))
        a.rattle(0.05, seed=k)
        a.calc = EMT()
        a.get_potential_energy()
        s = dpdata.LabeledSystem(a, fmt="ase/structure")
        ms = s if ms is None else ms + s
    ms.to_deepmd_npy(str(path), type_map=["Cu"])
    return path


def cu_input(prec: str, seed: int, data: pathlib.Path) -> dict:
    return {
        "model": {
            "type_map": ["Cu"],
            "descriptor": {
                "type": "se_e2_a",
                "rcut": 6.0,
                "rcut_smth": 0.5,
                "sel": [152],
                "neuron": [25, 50, 100],
                "axis_neuron": 16,
                "resnet_dt": False,
                "seed": seed,
                "precision": prec,
            },
            "fitting_net": {"neuron": [240, 240, 240], "resnet_dt": True, "seed": seed, "precision": prec},
        },
        "learning_rate": {"type": "exp", "start_lr": 1e-3, "stop_lr": 1e-4, "decay_steps": 10},
        "loss": {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1},
        "training": {
            "training_data": {"systems": [str(data)], "batch_size": 1},
            "numb_steps": 20,
            "seed": seed,
            "disp_freq": 10,
            "save_freq": 20,
        },
    }


def dp(*args: str, cwd: pathlib.Path) -> None:
    p = subprocess.run([sys.executable, "-m", "deepmd", *args], cwd=cwd, env=ENV, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"dp {' '.join(args)} failed in {cwd}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")


def main() -> None:
    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / ".whl/models").resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = cu_data(out)
    for prec, seed in [("float64", 1)] + [("float32", s) for s in (1, 2, 3, 4)]:
        work = out / f"cu_{prec}_{seed}"
        if (work / "model.pth").exists():
            continue
        work.mkdir(exist_ok=True)
        (work / "input.json").write_text(json.dumps(cu_input(prec, seed, data), indent=1))
        dp("--tf", "train", "input.json", "--skip-neighbor-stat", cwd=work)
        dp("--tf", "freeze", "-o", "model.pb", cwd=work)
        dp("convert-backend", "model.pb", "model.dp", cwd=work)
        dp("convert-backend", "model.dp", "model.pth", cwd=work)
        for f in work.iterdir():  # keep what the runs carry small (64 MiB in all, wheels included)
            if f.name.startswith(("model.ckpt", "checkpoint", "model.pb")):
                f.unlink()
        print(f"{work.name}: model.dp, model.pth", flush=True)
    sys.path.insert(0, str(ROOT / "tests"))
    from dpmodels import train_model

    for name, over, kind in (("t_cu", None, "Cu"), ("t_cuni", None, "CuNi"), ("t_tos32", TOS32, "CuNi")):
        if not (out / f"{name}.dp").exists():
            shutil.copy(train_model(out / "tests", over, kind)["dp"], out / f"{name}.dp")
            print(f"{name}.dp", flush=True)
    shutil.rmtree(out / "tests", ignore_errors=True)


if __name__ == "__main__":
    main()
