"""``dpsnake train``: one DeePMD-kit model of the ensemble: ``dp train`` -> ``dp freeze`` ->
``dp convert-backend`` -> ``model.dp``.

The config's ``train.input`` fragment is completed with the global type_map, the datasets (init +
all earlier iterations), the number of steps and per-model seeds, and written to ``input.json``.
``frozen_model.*`` and ``model.dp`` are written under temporary names and renamed, ``model.dp`` last,
so it exists only when the model is complete.

Where a model starts from (``init.json`` in the model folder says which and why):
- ``init``: the same model of the previous iteration, when ``--init-from`` is given and the
  ``train.init_from_previous`` policy agrees (``yes:N``: the previous models saw more than N frames);
  it trains ``init_numb_steps`` more steps with the learning rate ``train.init_lr_schedule`` says:
  ``reset`` (``--init-frz-model`` / ``--init-model``: the step counter at 0, a new schedule from
  ``start_lr`` over ``init_numb_steps``, after a warm-up from 0 over ``train.init_lr_warmup`` of them) or
  ``continue`` (``dp train --restart`` from the previous checkpoint: step counter, learning rate, loss
  prefactors and Adam moments go on, one schedule over all steps so far);
  the architecture is the previous model's (its ``out.json``: ``sel: auto`` resolved then);
- ``finetune``: otherwise, with ``train.finetune``, the pretrained model (``dp --pt train --finetune``):
  a fine-tuning campaign never trains from random weights;
- ``scratch``: otherwise.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import sys

from dpsnake.errors import UserError
from dpsnake.fsio import write_json_atomic, write_text_atomic
from dpsnake.workflow.train_proc import remove_stale, run_steps

FROZEN = {"tf": "frozen_model.pb", "pt": "frozen_model.pth"}


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="results/config.json")
    parser.add_argument("--iter", type=int, required=True)
    parser.add_argument("--model", type=int, required=True, help="index of the model in the ensemble")
    parser.add_argument("--outdir", required=True, help="results/iter.N/train/model.K")
    parser.add_argument("--data", nargs="+", required=True, help="dataset roots (folders of deepmd/npy systems)")
    parser.add_argument("--init-from", default=None, help="previous iteration's model folder to start from")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--on-cpu",
        type=int,
        choices=(0, 1),
        default=0,
        help="1: train on CPU cores even where there is a GPU (faster for small models when the "
        "whole ensemble trains at once on one GPU); 0: DeePMD-kit's choice",
    )


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def previous_steps(model_dir) -> int:
    """Training steps behind a model (``numb_steps`` of its input.json: the step counter it ended at)."""
    path = pathlib.Path(model_dir) / "input.json"
    try:
        return int(json.loads(path.read_text())["training"]["numb_steps"])
    except (OSError, KeyError, ValueError) as err:
        raise UserError(f"--init-from: {path}: cannot read training.numb_steps ({err})") from None


def restart_step(backend: str, model_dir) -> int:
    """The step ``dp train --restart`` resumes at from a model's last checkpoint. TensorFlow's global step
    is the number of steps done; DeePMD-kit's PyTorch checkpoint stores the index of its last step
    (``numb_steps - 1``) and the restarted loop starts at that index again, so counting from it makes
    the continued run train exactly ``init_numb_steps`` steps."""
    n = previous_steps(model_dir)
    return n if backend == "tf" else n - 1


def previous_model(model_dir) -> dict | None:
    """The ``model`` section a previous model was trained with (DeePMD-kit's ``out.json``, with ``sel``
    resolved): a continued run must build the same network, whatever ``sel: auto`` gives on the new
    data. None when the folder has no out.json."""
    path = pathlib.Path(model_dir) / "out.json"
    try:
        return json.loads(path.read_text())["model"]
    except FileNotFoundError:
        return None
    except (OSError, KeyError, ValueError) as err:
        raise UserError(f"--init-from: {path}: cannot read its model section ({err})") from None


def _takes_seed(kind: str, tag: str | None) -> bool:
    """Whether DeePMD-kit's arguments of descriptor/fitting type ``tag`` have a ``seed`` (loc_frame has
    none); unknown types are left to the input check."""
    import deepmd.utils.argcheck as argcheck

    for arg in getattr(argcheck, f"{kind}_args_plugin").get_all_argument():
        if tag == arg.name or tag in (arg.alias or ()):
            return "seed" in arg.sub_fields
    return True


def warmup_supported() -> bool:
    """Whether the installed DeePMD-kit takes ``learning_rate.warmup_ratio`` (3.2 and later, every backend)."""
    import deepmd.utils.argcheck as argcheck

    return "warmup_ratio" in argcheck.learning_rate_args().sub_fields


def init_warmup(cfg: dict, lr: dict, steps: int) -> str | None:
    """``train.init_lr_warmup`` on the learning-rate section ``lr`` of a ``reset`` continuation: the rate
    climbs from 0 to ``start_lr`` over that fraction of ``init_numb_steps`` (``warmup_ratio``), then decays
    as usual. Why: a continuation starts a fresh Adam optimiser on trained weights, and Adam's first steps
    move every weight by about ``start_lr`` whatever its gradient, undoing part of what the model knew
    (docs/benchmarks.md "Continued training": PyTorch +7.7 % vs scratch without, -1.6 % with 0.1). Left out
    where ``lr`` has a warm-up of its own (it applies to every run) or DeePMD-kit has none (returns a line
    saying why), and where it is less than one of the run's ``steps``."""
    ratio = float(cfg["train"].get("init_lr_warmup") or 0.0)
    if int(ratio * steps) < 1:
        return None
    if lr.get("warmup_steps") or lr.get("warmup_ratio") is not None:
        return "train.init_lr_warmup: learning_rate has its own warm-up, kept"
    if not warmup_supported():
        import deepmd

        return f"train.init_lr_warmup: DeePMD-kit {deepmd.__version__} has no learning_rate.warmup_ratio (3.2+): none"
    lr["warmup_ratio"] = ratio
    return None


def make_input(
    cfg: dict,
    it: int,
    k: int,
    systems: list[str],
    init: bool,
    start_step: int = 0,
    finetune: bool = False,
    model: dict | None = None,
) -> dict:
    """The DeePMD-kit input.json of model ``k`` in iteration ``it``; ``start_step``: the step the run
    starts at (``dp train --restart``: the step counter and learning-rate schedule continue from there,
    ``numb_steps`` counts from 0); ``model``: the model section to train instead of the config's (the
    previous model's). Steps: ``init_numb_steps`` when starting from the previous model (``init``),
    ``finetune.numb_steps`` when fine-tuning the pretrained model, else ``numb_steps``."""
    tr = cfg["train"]
    inp = merge({"model": {}, "training": {"training_data": {}}}, tr["input"])
    if model is not None:
        inp["model"] = copy.deepcopy(model)
    seed = (tr["seed"] * 1_000_003 + it * 1009 + k * 7919) % (2**31)
    model = inp["model"]
    model["type_map"] = list(cfg["type_map"])
    # per-model seeds where the input has the section (a fine-tuned model may take both from the
    # pretrained model); a hybrid descriptor has no seed of its own, its parts have
    desc = model.get("descriptor")
    for part in (desc.get("list") or []) if isinstance(desc, dict) and desc.get("type") == "hybrid" else [desc]:
        if isinstance(part, dict) and _takes_seed("descrpt", part.get("type")):
            part["seed"] = seed
    if isinstance(model.get("fitting_net"), dict) and _takes_seed("fitting", model["fitting_net"].get("type", "ener")):
        model["fitting_net"]["seed"] = seed + 1
    # written out when missing (DeePMD-kit's PyTorch trainer reads both without defaulting them): the
    # energy loss with DeePMD-kit's default prefactors, the learning rate of its se_e2_a example
    inp.setdefault("learning_rate", {"type": "exp", "start_lr": 0.001, "stop_lr": 3.51e-8, "decay_steps": 5000})
    inp.setdefault("loss", {"type": "ener"})
    t = inp["training"]
    t["seed"] = seed + 2
    t["training_data"]["systems"] = systems
    t.setdefault("training_data", {}).setdefault("batch_size", "auto")
    steps = tr["numb_steps"]
    if init and tr.get("init_numb_steps"):
        steps = tr["init_numb_steps"]
    elif finetune and not init and (tr.get("finetune") or {}).get("numb_steps"):
        steps = tr["finetune"]["numb_steps"]
    t["numb_steps"] = int(start_step + steps)
    if init and lr_schedule(cfg) == "reset" and (why := init_warmup(cfg, inp["learning_rate"], steps)):
        print(why, file=sys.stderr)
    t["disp_file"] = "lcurve.out"
    t.setdefault("save_ckpt", "model.ckpt")
    t["save_freq"] = min(int(t.get("save_freq", steps)), int(steps))
    return inp


def observed_types(systems: list[str], type_map: list[str]) -> list[str] | None:
    """The elements the data systems hold, in the order DeePMD-kit's PyTorch trainer gives
    ``model.info.observed_type`` (model type index, then atomic number; ``collect_observed_types``).
    Given in the input, the trainer skips computing it: it imports mendeleev for the atomic numbers
    (2.5-2.9 s of every training job's start). None when a system has mixed types (DeePMD-kit then
    collects them from its sampled frames)."""
    import numpy as np
    from ase.data import atomic_numbers

    seen: set[int] = set()
    for d in map(pathlib.Path, systems):
        if any(d.glob("set.*/real_atom_types.npy")):
            return None
        types = np.unique(np.loadtxt(d / "type.raw", dtype=int, ndmin=1))
        names = (d / "type_map.raw").read_text().split() if (d / "type_map.raw").exists() else type_map
        seen.update(type_map.index(names[t]) for t in types if names[t] in type_map)
    return sorted((type_map[i] for i in sorted(seen)), key=lambda e: atomic_numbers.get(e, float("inf")))


def start_point(cfg: dict, it: int, data: list[str], init_from: str | None) -> dict:
    """Where model training starts: {"mode": "init" | "finetune" | "scratch", "from": path | None,
    "reason": str} (see the module docstring)."""
    from dpsnake.workflow.dataset import system_folders
    from dpsnake.workflow.train_input import count_frames, init_policy

    tr = cfg["train"]
    policy = init_policy(tr["init_from_previous"])
    reason = "train.init_from_previous is off" if policy is None else "iteration 0"
    if init_from and policy is not None:
        if policy < 0:
            return {"mode": "init", "from": init_from, "reason": "train.init_from_previous: yes"}
        # the data the previous models were trained on: all but this iteration's newest dataset
        old = [d for d in data if pathlib.Path(d).name != f"iter.{it - 1:06d}"]
        n = count_frames(system_folders(old))
        if n > policy:
            return {"mode": "init", "from": init_from, "reason": f"previous training data {n} > {policy} frames"}
        reason = f"previous training data {n} <= {policy} frames"
    ft = tr.get("finetune")
    if ft:
        return {"mode": "finetune", "from": ft["model"], "reason": reason}
    return {"mode": "scratch", "from": None, "reason": reason}


def lr_schedule(cfg: dict) -> str:
    """``train.init_lr_schedule``: ``reset`` or ``continue`` (configs resolved before it existed: the
    schema's default, reset)."""
    return cfg["train"].get("init_lr_schedule") or "reset"


def dp_train_args(cfg: dict, start: dict, out: pathlib.Path) -> list[str]:
    """The arguments after ``dp --<backend> train input.json`` for a start point."""
    from dpsnake.workflow.train_input import FINETUNE_DEFAULTS

    tr = cfg["train"]
    ft = dict(FINETUNE_DEFAULTS, **tr["finetune"]) if tr.get("finetune") else {}
    if start["mode"] == "init":
        prev = pathlib.Path(start["from"]).resolve()
        if lr_schedule(cfg) == "continue":
            ckpt = prev / ("model.ckpt" if tr["backend"] == "tf" else "model.ckpt.pt")
            probe = ckpt.with_name("model.ckpt.index") if tr["backend"] == "tf" else ckpt
            if not probe.exists():
                raise UserError(
                    f"--init-from: {probe}: no such checkpoint (train.init_lr_schedule: continue "
                    "restarts from the previous model's last checkpoint; reset starts from its "
                    "frozen model)"
                )
            return ["--restart", str(ckpt)]
        if tr["backend"] == "tf":
            return ["--init-frz-model", str(prev / FROZEN["tf"])]
        # the checkpoint's own model section: after fine-tuning it is the pretrained architecture
        return ["--init-model", str(prev / "model.ckpt.pt")] + (
            ["--use-pretrain-script"] if ft.get("use_pretrain_script") else []
        )
    if start["mode"] == "finetune":
        from dpsnake.workflow.train_input import pth_to_checkpoint

        src = pathlib.Path(ft["model"]).absolute()
        if src.suffix == ".pth":
            src = pth_to_checkpoint(src, out / "pretrained.pt")
        args = ["--finetune", str(src)]
        if ft.get("model_branch"):
            args += ["--model-branch", ft["model_branch"]]
        return args + (["--use-pretrain-script"] if ft.get("use_pretrain_script") else [])
    return []


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
    remove_stale(out)
    start = start_point(cfg, args.iter, args.data, args.init_from)
    init = start["mode"] == "init"
    first = restart_step(backend, start["from"]) if init and lr_schedule(cfg) == "continue" else 0
    model = previous_model(start["from"]) if init else None
    inp = make_input(
        cfg, args.iter, args.model, systems, init, first, finetune=start["mode"] == "finetune", model=model
    )
    # (a pretrained model keeps its own; a continued model has the one of its first training)
    if backend == "pt" and start["mode"] != "finetune" and "observed_type" not in inp["model"].get("info", {}):
        if observed := observed_types(systems, inp["model"]["type_map"]):
            inp["model"].setdefault("info", {})["observed_type"] = observed
    write_text_atomic(out / "input.json", json.dumps(inp, indent=1))
    write_json_atomic(out / "init.json", start)
    env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="3",
        OMP_NUM_THREADS=str(args.threads),
        DP_INTRA_OP_PARALLELISM_THREADS=str(args.threads),
        DP_INTER_OP_PARALLELISM_THREADS="1",
    )
    if getattr(args, "on_cpu", 0):
        # hide the GPUs from TensorFlow and torch (DEVICE=cpu is DeePMD-kit's own switch for torch); and
        # load the batches in the trainer itself: DeePMD-kit's PyTorch trainer forks min(4, cores)
        # DataLoader workers by default, processes that compete with the concurrent trainings for cores
        env.update(CUDA_VISIBLE_DEVICES="", DEVICE="cpu")
        env.setdefault("NUM_WORKERS", "0")
    train_cmd = [f"--{backend}", "train", "input.json"] + dp_train_args(cfg, start, out)
    n = inp["training"]["numb_steps"]
    steps = f"steps {first} to {n}" if first else f"{n} steps"
    lr = f", learning rate: {lr_schedule(cfg)}" if init else ""
    if (warm := inp["learning_rate"].get("warmup_ratio")) and init:
        lr += f" after a warm-up over {warm:g} of the steps"
    print(
        f"train iteration {args.iter} model {args.model}: {len(systems)} systems, {steps}, backend "
        f"{backend}{' on the CPU' if env.get('DEVICE') == 'cpu' else ''}, start: {start['mode']}"
        f"{' from ' + str(start['from']) if start['from'] else ''} ({start['reason']}){lr}",
        flush=True,
    )
    frozen = FROZEN[backend]
    tmp_frozen = frozen.replace("frozen_model", "frozen_model.tmp")
    run_steps(
        [train_cmd, [f"--{backend}", "freeze", "-o", tmp_frozen], ["convert-backend", tmp_frozen, "model.tmp.dp"]],
        out,
        env,
        server=cfg["train"].get("server", "auto"),
    )
    os.replace(out / tmp_frozen, out / frozen)
    os.replace(out / "model.tmp.dp", out / "model.dp")
    print(f"train: wrote {out / 'model.dp'}")
    return 0
