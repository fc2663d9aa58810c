"""Check ``train`` (the DeePMD-kit input and the fine-tuning setup) before any job runs.

``train.input`` is completed the way ``dpsnake train`` completes it (type_map, data systems, steps,
seeds), passed through the same steps as ``dp --pt/--tf train`` (fine-tuning rules with the pretrained
model's parameters, ``update_deepmd_input``, ``normalize``: DeePMD-kit's own dargs rules) and then
checked for what the loop can do with the model: the chosen backend must train every component (from
the "Supported Backend" labels DeePMD-kit attaches to its argument variants), and exploration needs a
single-task energy model. Every problem is one ``UserError`` line naming the key, e.g.
``train.input.model.descriptor.rcutt: unknown key (did you mean rcut?)``.

``deepmd.utils.argcheck`` and ``deepmd.utils.finetune`` import neither torch nor TensorFlow (~0.2 s);
torch is imported only to read a pretrained model (``train.finetune``).
"""

from __future__ import annotations

import json
import logging
import pathlib
import re

from dpsnake.errors import UserError

# model variants the loop can train and explore, and fittings/losses of energy models
EXPLORABLE_MODEL_TYPES = ("standard", "dpa4")
ENERGY_FITTINGS = ("ener", "dpa4_ener")
ENERGY_LOSSES = ("ener",)
FINETUNE_DEFAULTS = {"model_branch": None, "numb_steps": None, "use_pretrain_script": True}
_LABEL = re.compile(r"^\(Supported Backend: ([^)]*)\)")


# ---------------------------------------------------------------- init_from_previous policies


def init_policy(value) -> int | None:
    """``train.init_from_previous`` as a frame threshold: None = never start from the previous models,
    -1 = always (from iteration 1 on), N = only when the previous models were trained on more than N
    frames. Accepts the boolean of earlier configs, DP-GEN2's "no" / "yes" / "yes:N" and its
    "old_data_larger_than:N" spelling."""
    if value is True or value == "yes":
        return -1
    if value is False or value is None or value == "no":
        return None
    m = re.fullmatch(r"(?:yes|old_data_larger_than):(\d+)", str(value))
    if not m:
        raise UserError(f"train.init_from_previous: {value!r} is not one of true, false, no, yes, yes:N")
    return int(m.group(1))


def count_frames(system_dirs) -> int:
    """Frames of deepmd/npy system folders (the rows of every set.*/coord.npy, read memory-mapped)."""
    import numpy as np

    n = 0
    for d in system_dirs:
        for coord in sorted(pathlib.Path(d).glob("set.*/coord.npy")):
            n += np.load(coord, mmap_mode="r").shape[0]
    return n


# ---------------------------------------------------------------- pretrained models (train.finetune)


def resolve(path: str, base: pathlib.Path | str = ".") -> pathlib.Path:
    p = pathlib.Path(path)
    return p if p.is_absolute() else pathlib.Path(base) / p


def pretrained_params(path: pathlib.Path) -> dict:
    """The ``model`` section a DeePMD-kit PyTorch model was trained with (single- or multi-task):
    ``_extra_state.model_params`` of a ``.pt`` checkpoint, ``get_model_def_script()`` of a frozen
    ``.pth``. Raises UserError naming the file."""
    import torch

    try:
        if path.suffix == ".pth":
            import deepmd.pt.cxx_op  # noqa: F401  (the custom ops TorchScript models refer to)

            return json.loads(torch.jit.load(str(path), map_location="cpu").get_model_def_script())
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("model", state)
        return state["_extra_state"]["model_params"]
    except Exception as err:  # torch raises many kinds for a file that is not a model
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"train.finetune.model: {path}: not a DeePMD-kit PyTorch model ({msg})") from None


def pth_to_checkpoint(pth: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """A frozen ``.pth`` as a training checkpoint ``dp --pt train --finetune`` loads (DeePMD-kit 3.2
    reads fine-tuning sources with ``torch.load(weights_only=True)``, which refuses TorchScript): the
    frozen module's weights under the trainer's ``model.Default.`` prefix plus its model parameters."""
    import deepmd.pt.cxx_op  # noqa: F401
    import torch

    from dpsnake.fsio import atomic_path

    m = torch.jit.load(str(pth), map_location="cpu")
    state = {"model.Default." + k: v for k, v in m.state_dict().items()}
    state["_extra_state"] = {
        "model_params": json.loads(m.get_model_def_script()),
        "train_infos": {"lr": 0.0, "step": 0},
    }
    with atomic_path(out, ".pt") as tmp:
        torch.save({"model": state}, str(tmp))
    return out


def branch_params(params: dict, branch: str | None, path) -> dict:
    """The single-task model section of ``params`` that fine-tuning starts from: the head ``branch`` of
    a multi-task model (without one, DeePMD-kit takes the first head with a new fitting net)."""
    if "model_dict" not in params:
        if branch not in (None, "", "RANDOM"):
            raise UserError(
                f"train.finetune.model_branch: {branch!r}: {path} is a single-task model "
                "(leave model_branch out, or RANDOM to re-initialize the fitting net)"
            )
        return params
    heads = list(params["model_dict"])
    if branch in (None, "", "RANDOM"):
        return params["model_dict"][heads[0]]
    from deepmd.utils.model_branch_dict import get_model_dict

    aliases, _ = get_model_dict(params["model_dict"])
    if branch not in aliases:
        raise UserError(f"train.finetune.model_branch: {branch!r} is not a head of {path} (heads: {', '.join(heads)})")
    return params["model_dict"][aliases[branch]]


# ---------------------------------------------------------------- the check


def _dargs_line(err) -> str:
    """A dargs ArgumentError as 'train.input.<key path>: what is wrong'."""
    path = ["train.input"] + [p for p in err.path.split("/") if p]
    msg = err.message or ""
    m = re.match(r"undefined key `([^`]+)` is not allowed in strict mode\.\s*(?:Did you mean: (.+?)\?)?", msg)
    if m:
        hint = f" (did you mean {m.group(2)}?)" if m.group(2) else ""
        return f"{'.'.join(path + [m.group(1)])}: unknown key{hint}"
    m = re.match(r"get invalid choice `([^`]+)` for flag key `([^`]+)`\.\s*(?:Did you mean: (.+?)\?)?", msg)
    if m:
        hint = f" (did you mean {m.group(3)}?)" if m.group(3) else ""
        return f"{'.'.join(path + [m.group(2)])}: unknown choice {m.group(1)!r}{hint}"
    m = re.match(r"key `([^`]+)` is required (?:in arguments|to choose variant) but not found", msg)
    if m:
        return f"{'.'.join(path + [m.group(1)])}: required key is missing"
    m = re.match(r"key `([^`]+)` gets (.*)", msg, re.S)
    if m:
        return f"{'.'.join(path + [m.group(1)])}: {' '.join(m.group(2).split())}"
    return f"{'.'.join(path)}: {' '.join(msg.split())}"


def normalize(inp: dict) -> dict:
    """DeePMD-kit's own input check (what ``dp train`` runs): compat update + dargs normalize."""
    from dargs.dargs import ArgumentError
    from deepmd.utils.argcheck import normalize as dp_normalize
    from deepmd.utils.compat import update_deepmd_input

    try:
        return dp_normalize(update_deepmd_input(inp, warning=False), multi_task="model_dict" in inp["model"])
    except ArgumentError as err:
        raise UserError(_dargs_line(err)) from None
    except (ValueError, TypeError, KeyError, AssertionError) as err:
        raise UserError(f"train.input: {' '.join(str(err).split())}") from None


def _backend_line(backend: str, path: list[str], tag: str, doc: str) -> str | None:
    """Why ``backend`` cannot train variant ``tag`` (from its 'Supported Backend' label), or None."""
    from deepmd.utils.argcheck import BACKEND_DOCUMENTATION

    m = _LABEL.match(doc or "")
    name = BACKEND_DOCUMENTATION[backend].display_name
    if not m or name in [s.strip() for s in m.group(1).split(",")]:
        return None
    other = "pt" if backend == "tf" else "tf"
    hint = f"; use train.backend: {other}" if BACKEND_DOCUMENTATION[other].display_name in m.group(1) else ""
    return (
        f"{'.'.join(path)}: {tag!r} cannot be trained with train.backend: {backend} "
        f"(DeePMD-kit supports it on {m.group(1)}){hint}"
    )


def _chosen(arg, value: dict) -> list:
    """(flag, tag, chosen Argument) of every variant of ``arg`` selected by ``value``, nested ones too."""
    out = []
    for var in arg.sub_variants.values():
        choice = var.get_choice(value)
        out.append((var.flag_name, value.get(var.flag_name, var.default_tag), choice))
        out += _chosen(choice, value)
    return out


def backend_problem(arg, value, backend: str, path: list[str]) -> str | None:
    """Walk a normalized input along DeePMD-kit's Argument tree; the first variant (descriptor, fitting,
    model, loss, learning-rate type, ...) whose documented backends exclude ``backend``."""
    if isinstance(value, list) and arg.repeat:
        items = [(f"{path[-1]}[{i}]", v) for i, v in enumerate(value)]
    elif isinstance(value, dict):
        items = [(None, value)]
    else:
        return None
    for name, item in items:
        here = path if name is None else path[:-1] + [name]
        if not isinstance(item, dict):
            continue
        for flag, tag, choice in _chosen(arg, item):
            bad = _backend_line(backend, here + [flag], tag, choice.doc)
            if bad:
                return bad
        if arg.name == "descriptor" and item.get("type") == "hybrid":
            for i, d in enumerate(item.get("list") or []):  # every sub-descriptor is a descriptor
                bad = backend_problem(arg, d, backend, here + [f"list[{i}]"])
                if bad:
                    return bad
        for key, sub in arg.flatten_sub(item).items():
            if key in item and (sub.sub_fields or sub.sub_variants):
                bad = backend_problem(sub, item[key], backend, here + [key])
                if bad:
                    return bad
    return None


def model_problem(model: dict, loss: dict | None, key: str) -> str | None:
    """Why the loop cannot explore with such a model (not a single-task energy model), or None."""
    if "model_dict" in model:
        return (
            f"{key}.model_dict: multi-task training is not supported in the loop (fine-tune one "
            "head of a multi-task model with train.finetune.model_branch)"
        )
    mtype = model.get("type", "standard")
    if mtype not in EXPLORABLE_MODEL_TYPES:
        return f"{key}.type: {mtype!r} models cannot be trained and explored in the loop (energy models only)"
    if model.get("spin"):
        return f"{key}.spin: spin models are not supported (exploration needs an energy model)"
    if model.get("modifier"):
        return f"{key}.modifier: models with a modifier (DPLR) are not supported"
    loss = (loss or {}).get("type", "ener")
    if loss not in ENERGY_LOSSES:
        return f"train.input.loss.type: {loss!r} is not an energy loss (exploration needs an energy model: ener)"
    fit = (model.get("fitting_net") or {}).get("type", "ener")
    if fit not in ENERGY_FITTINGS:
        return (
            f"{key}.fitting_net.type: {fit!r} models are not supported (exploration needs an energy "
            "model: fitting_net type ener)"
        )
    return None


def check_train(cfg: dict, base: pathlib.Path | str = ".") -> dict:
    """Check ``train`` of a schema-validated config; returns the normalized DeePMD-kit ``model`` section
    the first training job will use (the pretrained model's architecture when fine-tuning with its
    script), for the exploration engine check. Raises UserError (one line)."""
    from dpsnake.workflow.train import make_input

    tr = cfg["train"]
    init_policy(tr["init_from_previous"])
    if tr.get("finetune"):  # defaults here, not in the schema (see its comment)
        for key, value in FINETUNE_DEFAULTS.items():
            tr["finetune"].setdefault(key, value)
    inp = make_input(cfg, 0, 0, ["<training data>"], init=False, finetune=bool(tr.get("finetune")))
    ft = tr.get("finetune")
    if ft:
        if tr["backend"] != "pt":
            raise UserError(
                "train.finetune: fine-tuning in the loop needs train.backend: pt (DeePMD-kit's "
                f"PyTorch backend), not {tr['backend']}"
            )
        path = resolve(ft["model"], base)
        if path.suffix not in (".pt", ".pth"):
            raise UserError(
                f"train.finetune.model: {ft['model']}: expected a DeePMD-kit PyTorch checkpoint "
                "(.pt) or frozen model (.pth)"
            )
        if not path.is_file():
            raise UserError(f"train.finetune.model: {ft['model']}: no such file")
        params = pretrained_params(path)
        single = branch_params(params, ft.get("model_branch"), ft["model"])
        ptm = list(single.get("type_map") or [])
        missing = [el for el in cfg["type_map"] if el not in ptm]
        if missing:
            raise UserError(
                f"train.finetune.model: {ft['model']} has type_map {ptm}, which lacks {missing} "
                f"of the config's type_map {list(cfg['type_map'])}"
            )
        from deepmd.utils.finetune import get_finetune_rules_from_model_params

        quiet = logging.getLogger("deepmd")  # its notes on replaced descriptor keys belong to training logs
        level, quiet.level = quiet.level, logging.ERROR
        try:  # what `dp --pt train --finetune [--model-branch] [--use-pretrain-script]` does first
            inp["model"], _ = get_finetune_rules_from_model_params(
                params,
                inp["model"],
                model_branch=ft.get("model_branch") or "",
                change_model_params=ft["use_pretrain_script"],
            )
        except (ValueError, KeyError) as err:
            raise UserError(f"train.finetune: {ft['model']}: {' '.join(str(err).split())}") from None
        finally:
            quiet.setLevel(level)
    norm = normalize(inp)
    bad = model_problem(norm["model"], norm.get("loss"), "train.input.model")
    if bad:
        raise UserError(bad)
    from dargs import Argument
    from deepmd.utils.argcheck import gen_args

    root = Argument("train.input", dict, gen_args(multi_task=False))
    bad = backend_problem(root, norm, tr["backend"], ["train.input"])
    if bad:
        raise UserError(bad)
    return norm["model"]
