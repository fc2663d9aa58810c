"""``dpsnake train``: one DeePMD-kit model of the ensemble: ``dp train`` -> ``dp freeze`` ->
``dp convert-backend`` -> ``model.dp``.

The config's ``train.input`` fragment is completed with the global type_map, the datasets (init +
all earlier iterations), the number of steps and per-model seeds, and written to ``input.json``.
``frozen_model.*`` and ``model.dp`` are written under temporary names and renamed, ``model.dp`` last,
so it exists only when the model is complete.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import subprocess
import sys

from dpsnake.errors import UserError

FROZEN = {"tf": "frozen_model.pb", "pt": "frozen_model.pth"}


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="results/config.json")
    parser.add_argument("--iter", type=int, required=True)
    parser.add_argument("--model", type=int, required=True, help="index of the model in the ensemble")
    parser.add_argument("--outdir", required=True, help="results/iter.N/train/model.K")
    parser.add_argument("--data", nargs="+", required=True, help="dataset roots (folders of deepmd/npy systems)")
    parser.add_argument("--init-from", default=None, help="previous iteration's model folder to start from")
    parser.add_argument("--threads", type=int, default=1)


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def previous_steps(model_dir) -> int:
    """Training steps behind a model (``numb_steps`` of its input.json): DeePMD-kit's TensorFlow backend
    keeps counting from there when it starts from that frozen model."""
    path = pathlib.Path(model_dir) / "input.json"
    try:
        return int(json.loads(path.read_text())["training"]["numb_steps"])
    except (OSError, KeyError, ValueError) as err:
        raise UserError(f"--init-from: {path}: cannot read training.numb_steps ({err})") from None


def make_input(cfg: dict, it: int, k: int, systems: list[str], init: bool, start_step: int = 0) -> dict:
    """The DeePMD-kit input.json of model ``k`` in iteration ``it``; ``start_step``: steps already done by
    the model it starts from (the step counter and learning-rate schedule continue from there)."""
    tr = cfg["train"]
    inp = merge({"model": {"descriptor": {}, "fitting_net": {}}, "training": {"training_data": {}}}, tr["input"])
    seed = (tr["seed"] * 1_000_003 + it * 1009 + k * 7919) % (2**31)
    inp["model"]["type_map"] = list(cfg["type_map"])
    inp["model"]["descriptor"]["seed"] = seed
    inp["model"]["fitting_net"]["seed"] = seed + 1
    t = inp["training"]
    t["seed"] = seed + 2
    t["training_data"]["systems"] = systems
    t.setdefault("training_data", {}).setdefault("batch_size", "auto")
    steps = tr["init_numb_steps"] if init and tr.get("init_numb_steps") else tr["numb_steps"]
    t["numb_steps"] = int(start_step + steps)
    t["disp_file"] = "lcurve.out"
    t.setdefault("save_ckpt", "model.ckpt")
    t["save_freq"] = min(int(t.get("save_freq", steps)), int(steps))
    return inp


def _run(cmd: list[str], cwd: pathlib.Path, env: dict) -> None:
    print("+ " + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, cwd=cwd, env=env, stdout=sys.stdout, stderr=subprocess.STDOUT)
    if p.returncode:
        raise UserError(f"{' '.join(cmd)} failed with exit code {p.returncode} in {cwd} (see the log above)")


def run(args) -> int:
    from dpsnake.workflow.config import read_resolved
    from dpsnake.workflow.dataset import system_folders

    cfg = read_resolved(args.config)
    backend = cfg["train"]["backend"]
    out = pathlib.Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    systems = [str(p.resolve()) for p in system_folders(args.data)]
    if not systems:
        raise UserError(f"--data: no deepmd/npy systems under {' '.join(args.data)}")
    for stale in list(out.glob("model.ckpt*")) + list(out.glob("checkpoint")) + list(out.glob("*.tmp*")):
        stale.unlink()  # left by a killed attempt: never restart from them by accident
    start = previous_steps(args.init_from) if args.init_from and backend == "tf" else 0
    inp = make_input(cfg, args.iter, args.model, systems, bool(args.init_from), start)
    (out / "input.json").write_text(json.dumps(inp, indent=1))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS=str(args.threads),
               DP_INTRA_OP_PARALLELISM_THREADS=str(args.threads), DP_INTER_OP_PARALLELISM_THREADS="1")
    dp = [sys.executable, "-m", "deepmd"]
    cmd = dp + [f"--{backend}", "train", "input.json"]
    if args.init_from:
        prev = pathlib.Path(args.init_from).resolve()
        if backend == "tf":
            cmd += ["--init-frz-model", str(prev / FROZEN["tf"])]
        else:
            cmd += ["--init-model", str(prev / "model.ckpt.pt")]
    print(f"train iteration {args.iter} model {args.model}: {len(systems)} systems, "
          f"{inp['training']['numb_steps']} steps, backend {backend}", flush=True)
    frozen = FROZEN[backend]
    tmp_frozen = frozen.replace("frozen_model", "frozen_model.tmp")
    steps = [cmd[3:], [f"--{backend}", "freeze", "-o", tmp_frozen], ["convert-backend", tmp_frozen, "model.tmp.dp"]]
    if backend == "tf":
        # one Python process for the three DeePMD-kit commands: TensorFlow's start-up (~5 s CPU) is paid once
        script = "from deepmd.main import main\n" + "".join(f"main({s!r})\n" for s in steps)
        for s in steps:
            print("+ dp " + " ".join(s), flush=True)
        _run([sys.executable, "-c", script], out, env)
    else:
        for s in steps:
            _run(dp + s, out, env)
    os.replace(out / tmp_frozen, out / frozen)
    os.replace(out / "model.tmp.dp", out / "model.dp")
    print(f"train: wrote {out / 'model.dp'}")
    return 0
