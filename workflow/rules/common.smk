# Helpers shared by the rules: the resolved config, iteration paths, and the walk over the
# checkpoints (one `select` checkpoint per iteration) that finds the last iteration.

import json
import os
import sys
from importlib.util import find_spec

from dpsnake.errors import UserError
from dpsnake.workflow import config as dpconfig
from dpsnake.workflow.candidates import decide_from_stats

# Files, elements and cross-references are checked here, before any job: one line naming the key.
try:
    CFG = dpconfig.check(config, ".")
except UserError as err:
    sys.exit(f"config error: {err}")

CONFIG_JSON = "results/config.json"
NMODELS = CFG["train"]["numb_models"]
SHARDED = CFG["explore"]["shards"] != 1  # explore.shards: several exploration jobs per iteration
SYSTEMS = list(CFG["systems"])
# explore.warmup: iteration 0's GPU kernels compiled while it trains (dpsnake explore-warmup)
WARMUP = CFG["explore"]["warmup"] is True or (
    CFG["explore"]["warmup"] == "auto" and CFG["explore"]["device"] != "cpu" and bool(find_spec("cupy"))
)
# explore.compile: DPA-3 through torch.compile, its graphs kept in one folder every job (any node) reads
COMPILE_CACHE = "results/cache/torchinductor"
COMPILE_ARGS = {True: "--compile on", "auto": "--compile auto", False: ""}[CFG["explore"]["compile"]]
COMPILE_ARGS += f" --compile-cache {COMPILE_CACHE}" if COMPILE_ARGS else ""


wildcard_constraints:
    it=r"\d{6}",
    k=r"\d+",
    task=r"\d{6}",
    shard=r"\d+",
    system=r"[A-Za-z0-9_-]+",


onstart:
    # every `dpsnake` command reads the run's resolved config from here; a folder that refuses the write
    # is one line naming it and what to do (errors.os_error_message), not a traceback
    try:
        dpconfig.write_if_changed(CFG, CONFIG_JSON)
    except OSError as err:
        from dpsnake.errors import os_error_message

        sys.exit(f"error: {os_error_message(err)}")


def it_int(wildcards):
    return int(wildcards.it)


def iter_dir(it):
    return f"results/iter.{int(it):06d}"


def model_dirs(it):
    return [f"{iter_dir(it)}/train/model.{k}" for k in range(NMODELS)]


def model_files(wildcards):
    return [f"{d}/model.dp" for d in model_dirs(wildcards.it)]


def train_data(wildcards):
    """Datasets model training of iteration `it` uses: init data plus every earlier iteration's."""
    it = int(wildcards.it)
    return [f"results/data/init/{s}" for s in SYSTEMS] + [f"results/data/iter.{j:06d}" for j in range(it)]


def warmup_input(wildcards):
    """Iteration 0's kernel warm-up (explore.warmup): an input of its exploration (job) until that ran,
    so a run that explored iteration 0 before warm-ups existed does not redo it."""
    it = iter_dir(wildcards.it)
    own = f"{it}/explore/shards/shard.{wildcards.shard}" if SHARDED else f"{it}/explore"
    if not WARMUP or int(wildcards.it) != 0 or os.path.isfile(f"{own}/summary.json"):
        return []
    return [f"{it}/explore/warmup.json"]


def compress_data(wildcards):
    """Training data of the iteration when explore.compress is auto (min_nbor_dist from it)."""
    return train_data(wildcards) if CFG["explore"].get("compress") == "auto" else []


def compress_arg(wildcards):
    c = CFG["explore"].get("compress")
    if c is None:
        return ""
    if c == "auto":
        return "--compress auto --compress-data " + " ".join(train_data(wildcards))
    return f"--compress {c}"


def shard_summaries(wildcards):
    """The summaries of an iteration's exploration shards (their number is in shards.json, written by
    the plan checkpoint)."""
    with open(checkpoints.plan.get(it=wildcards.it).output.shards) as f:
        n = len(json.load(f)["shards"])
    return [f"{iter_dir(wildcards.it)}/explore/shards/shard.{k}/summary.json" for k in range(n)]


def train_init_dir(wildcards):
    """The previous iteration's model folder when train.init_from_previous may use it (not false/no;
    with yes:N `dpsnake train` decides from the frame count), else None."""
    from dpsnake.workflow.train_input import init_policy

    it = int(wildcards.it)
    if init_policy(CFG["train"]["init_from_previous"]) is not None and it > 0:
        return f"{iter_dir(it - 1)}/train/model.{wildcards.k}"
    return None


def train_init(wildcards):
    """What a model may start from: the previous iteration's model and the pretrained model of
    train.finetune (used at iteration 0 and whenever the previous model is not)."""
    prev = train_init_dir(wildcards)
    out = [f"{prev}/model.dp"] if prev else []
    if CFG["train"].get("finetune"):
        out.append(CFG["train"]["finetune"]["model"])
    return out


def train_init_arg(wildcards):
    prev = train_init_dir(wildcards)
    return f"--init-from {prev}" if prev else ""


def prev_stats(wildcards):
    it = int(wildcards.it)
    return [f"{iter_dir(it - 1)}/select/stats.json"] if it > 0 else []


def prev_stats_arg(wildcards):
    prev = prev_stats(wildcards)
    return f"--prev-stats {prev[0]}" if prev else ""


def structure_file(system):
    """The structure file of a system (None for an ASE builder)."""
    return CFG["systems"][system]["structure"].get("file")


def collected(it):
    return os.path.isfile(f"{iter_dir(it)}/collect/summary.json")


def follow(files, finished):
    """Edited input files rerun unfinished work only: for finished work the same files are listed as
    ancient() (the file list stays the same, mtimes no longer count). The report names data built
    from an older version of a file (structures.fingerprint, recorded with the data)."""
    return [ancient(f) for f in files] if finished else list(files)


def init_data_inputs(wildcards):
    """What the initial data is made from: the system's existing dataset (init_data), else the structure
    file it is generated from. It is finished work, kept when that changes, once iteration 0 has
    collected its labels (training used it)."""
    s = wildcards.system
    f = CFG["systems"][s].get("init_data") or structure_file(s)
    return follow([f], collected(0)) if f else []


def plan_structures(wildcards):
    """The structure files of the systems the iteration's stage explores. Finished once the
    iteration's selection ran (the frames explored from them are classified and picked)."""
    from dpsnake.workflow.plan import iteration_stage, stage_systems

    it = int(wildcards.it)
    try:
        stage = iteration_stage(CFG, selected_stats(it - 1) if it > 0 else None)[0]
        systems = stage_systems(CFG, stage)
    except UserError:  # the previous iteration stopped: `dpsnake plan` says so itself
        systems = SYSTEMS
    files = [f for f in map(structure_file, systems) if f]
    return follow(files, os.path.isfile(f"{iter_dir(it)}/select/stats.json"))


def selected_stats(it):
    """stats.json of iteration `it` (waits for its select checkpoint)."""
    out = checkpoints.select.get(it=f"{int(it):06d}").output
    with open(out.stats) as f:
        return json.load(f)


def label_inputs(wildcards):
    """The candidate frame of one label job (exists once the select checkpoint ran)."""
    checkpoints.select.get(it=wildcards.it)
    return f"{iter_dir(wildcards.it)}/select/candidates/task.{wildcards.task}.extxyz"


def label_outputs(wildcards):
    """All labelled frames of iteration `it`: one per selected candidate."""
    stats = selected_stats(wildcards.it)
    return [f"{iter_dir(wildcards.it)}/label/task.{t}.extxyz" for t in stats["tasks"]]


def last_iteration():
    """Walk the checkpoints: the first iteration whose decision (re-evaluated with the current config,
    so raising convergence.max_iterations continues a finished run) is to stop."""
    it = 0
    while True:
        if decide_from_stats(CFG, selected_stats(it))["stop"]:
            return it
        it += 1


def iteration_reports(wildcards):
    last = last_iteration()
    return [f"results/reports/iter.{j:06d}.html" for j in range(last + 1)]


def final_models(wildcards):
    return [f"{d}/model.dp" for d in model_dirs(last_iteration())]


def final_stats(wildcards):
    return f"{iter_dir(last_iteration())}/select/stats.json"


def final_model_dirs(wildcards):
    return " ".join(model_dirs(last_iteration()))


def final_iter(wildcards):
    return last_iteration()
