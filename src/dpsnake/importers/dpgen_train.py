"""DP-GEN's training keys as dpsnake's ``train`` section.

``default_training_param`` -> ``train.input`` without what dpsnake fills in per model (``type_map``, the
data systems, ``numb_steps`` / ``stop_batch`` -> ``train.numb_steps``, seeds, ``disp_file``) and without
DP-GEN's ``_comment`` keys; then DeePMD-kit's own check (the one ``dpsnake check-config`` runs) removes,
one by one, the keys DeePMD-kit no longer knows (1.x leftovers such as ``coord_norm``; typos), each into
the table. ``training_init_model`` / ``training_reuse_iter`` -> ``init_from_previous``,
``training_reuse_numb_steps`` (``training_reuse_stop_batch``) -> ``init_numb_steps``; DP-GEN restarts the
learning rate (``--init-frz-model``), so ``init_lr_schedule: reset``.
"""

from __future__ import annotations

import copy
import re

from dpsnake.errors import UserError
from dpsnake.importers.dpgen_common import Context

BACKENDS = {"tensorflow": "tf", "tf": "tf", "pytorch": "pt", "pt": "pt", "torch": "pt"}
TRAIN_NOTES = {
    "training_reuse_old_ratio": "dpsnake trains on all data with equal weight (no old/new data probabilities)",
    "training_reuse_start_lr": "a continued run starts from train.input's start_lr (init_lr_schedule reset)",
    "training_reuse_decay_steps": "a continued run uses train.input's decay_steps",
    "training_reuse_start_pref_e": "a continued run uses train.input's loss prefactors",
    "training_reuse_start_pref_f": "a continued run uses train.input's loss prefactors",
    "training_iter0_model_path": "initial models per ensemble member: dpsnake starts iteration 0 from scratch or "
    "fine-tunes one pretrained model (train.finetune)",
    "training_init_frozen_model": "initial frozen models per ensemble member: dpsnake starts iteration 0 from "
    "scratch or fine-tunes one pretrained model (train.finetune)",
    "model_devi_activation_func": "per-model activation functions: one train.input for all models",
    "srtab_file_path": "DP-ZBL pair table: give it in train.input.model yourself if DeePMD-kit's check accepts it",
    "one_h5": "dpsnake passes deepmd/npy folders to dp train",
    "dp_train_skip_neighbor_stat": "dpsnake runs dp train without --skip-neighbor-stat",
    "init_batch_size": "one batch size for all systems: train.input.training.training_data.batch_size",
    "sys_batch_size": "one batch size for all systems: train.input.training.training_data.batch_size",
    "train_param": "the name of DP-GEN's input.json: dpsnake writes input.json per model",
}


def _strip_comments(value):
    if isinstance(value, dict):
        return {k: _strip_comments(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, list):
        return [_strip_comments(v) for v in value]
    return value


def clean_input(ctx: Context, inp: dict) -> tuple[dict, int | None]:
    """``default_training_param`` without what dpsnake fills in; returns (input, numb_steps)."""
    inp = _strip_comments(copy.deepcopy(inp))
    model = inp.setdefault("model", {})
    tmap = model.pop("type_map", None)
    if tmap is not None and list(tmap) != list(ctx.param.get("type_map") or []):
        ctx.note("default_training_param.model.type_map", tmap, "differs from type_map: the global type_map is used")
    training = inp.setdefault("training", {})
    steps = training.pop("numb_steps", None)
    stop = training.pop("stop_batch", None)
    steps = steps if steps is not None else stop
    for key in ("seed", "disp_file", "systems", "set_prefix"):
        training.pop(key, None)  # filled in per model by dpsnake (seeds per ensemble member, the data)
    for part in ("descriptor", "fitting_net"):
        if isinstance(model.get(part), dict):
            model[part].pop("seed", None)
    if "batch_size" in training:  # DeePMD-kit 1.x place of the batch size
        training.setdefault("training_data", {})["batch_size"] = training.pop("batch_size")
    data = training.get("training_data")
    if isinstance(data, dict):
        data.pop("systems", None)
        data.pop("set_prefix", None)
    if isinstance(training.get("validation_data"), dict):
        ctx.note(
            "default_training_param.training.validation_data",
            training.pop("validation_data"),
            "validation systems of the DP-GEN run: dpsnake trains on the loop's data (use test_data for reports)",
        )
    return inp, (int(steps) if steps is not None else None)


_UNKNOWN = re.compile(r"^train\.input\.(\S+): unknown key")


def drop_unknown_keys(ctx: Context, cfg: dict) -> None:
    """Run DeePMD-kit's check of train.input; move each unknown key into the table, until it passes."""
    from dpsnake.workflow.config import validate_schema
    from dpsnake.workflow.train_input import check_train

    for _ in range(50):
        try:
            check_train(validate_schema(cfg))
            return
        except UserError as err:
            m = _UNKNOWN.match(str(err))
            if not m:
                raise UserError(f"{ctx.path}: default_training_param: {err}") from None
            node, parts = cfg["train"]["input"], m.group(1).split(".")
            for part in parts[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict) or parts[-1] not in node:
                raise UserError(f"{ctx.path}: default_training_param: {err}") from None
            value = node.pop(parts[-1])
            ctx.note(f"default_training_param.{m.group(1)}", value, f"DeePMD-kit does not know it: {err}")


def build_train(ctx: Context) -> dict:
    """The ``train`` section (before DeePMD-kit's check, see ``drop_unknown_keys``)."""
    train = {"numb_models": int(ctx.require("numb_models"))}
    ctx.source("train", "train.numb_models <- numb_models")
    backend = ctx.get("train_backend", "tensorflow")
    if str(backend).lower() not in BACKENDS:
        raise ctx.error("train_backend", f"{backend!r}: expected tensorflow or pytorch")
    train["backend"] = BACKENDS[str(backend).lower()]
    engine = ctx.get("mlp_engine", "dp")
    if engine != "dp":
        raise ctx.error("mlp_engine", f"{engine!r}: dpsnake trains DeePMD-kit models only")
    inp, steps = clean_input(ctx, ctx.require("default_training_param"))
    train["input"] = inp
    ctx.source("train", "train.input <- default_training_param (type_map, data, steps, seeds filled per model)")
    if steps is not None:
        train["numb_steps"] = steps
        ctx.source("train", "train.numb_steps <- default_training_param.training.numb_steps / stop_batch")
    _continuation(ctx, train)
    finetune = ctx.get("training_finetune_model")
    if finetune:
        paths = sorted({str(ctx.resolve(p).resolve()) for p in finetune})
        if len(paths) == 1 and paths[0].endswith((".pt", ".pth")):
            train["finetune"] = {"model": paths[0]}
            train["backend"] = "pt"
            ctx.source("train", "train.finetune.model <- training_finetune_model (backend pt)")
        else:
            ctx.note("training_finetune_model", finetune, "dpsnake fine-tunes from one PyTorch model (.pt/.pth)")
    for key, why in TRAIN_NOTES.items():
        if ctx.has(key):
            ctx.note(key, ctx.get(key), why)
    return train


def _continuation(ctx: Context, train: dict) -> None:
    """``training_init_model`` / ``training_reuse_iter`` and the reuse steps."""
    init = ctx.get("training_init_model", False)
    reuse = ctx.get("training_reuse_iter")
    steps = ctx.get("training_reuse_numb_steps", ctx.get("training_reuse_stop_batch"))
    ctx.used.update({"training_reuse_numb_steps", "training_reuse_stop_batch"})
    if init or reuse is not None:
        train["init_from_previous"] = True
        train["init_lr_schedule"] = "reset"
        src = "training_init_model" if init else "training_reuse_iter"
        ctx.source("train", f"train.init_from_previous: true, init_lr_schedule: reset <- {src}")
        if not init and reuse is not None and int(reuse) > 1:
            ctx.note(
                "training_reuse_iter",
                reuse,
                "dpsnake continues from the previous models from iteration 1 on, not from this iteration",
            )
        if steps is not None:
            train["init_numb_steps"] = int(steps)
            ctx.source("train", "train.init_numb_steps <- training_reuse_numb_steps / training_reuse_stop_batch")
    elif steps is not None:
        ctx.note("training_reuse_numb_steps", steps, "unused: no training_init_model / training_reuse_iter")
