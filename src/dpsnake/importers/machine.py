"""DP-GEN's ``machine.json`` (dpdispatcher format, ``api_version`` 1.0) as a Snakemake profile.

DP-GEN's three stages become the workflow's rules: ``train`` -> rule ``train``, ``model_devi`` -> rule
``explore``, ``fp`` -> rule ``label`` (and the small CPU rules: select, collect, report). Per stage:
``batch_type`` picks the executor (Slurm -> the SLURM plugin, as ``profiles/slurm``; LSF -> the LSF plugin;
PBS / Torque -> the generic cluster executor with ``qsub``; Shell / Local -> local), ``queue_name`` the
partition / queue, ``cpu_per_node`` x ``number_node`` the CPUs (MPI ranks of a label job), ``gpu_per_node``
the GPUs, ``custom_flags`` the runtime, memory, account and the rest (``#SBATCH -t``, ``--mem``, ``-A``;
``#PBS -l walltime``; ``#BSUB -W``); ``group_size`` of ``fp`` -> label jobs grouped into one batch job.
``module_list`` / ``source_list`` / ``envs`` go into ``setup-env.sh`` in the profile folder (source it before
starting Snakemake: jobs inherit the environment), ``envs`` of ``fp`` also into ``label.env``. Everything
else (SSH contexts, remote roots, dpdispatcher's kwargs and strategies) is listed in the table.
"""

from __future__ import annotations

import json
import pathlib
import re
import shlex

from dpsnake.errors import UserError
from dpsnake.importers.dpgen_common import short

RULES = {"train": "train", "model_devi": "explore", "fp": "label"}
EXECUTORS = {"slurm": "slurm", "lsf": "lsf", "pbs": "pbs", "torque": "torque", "shell": None, "local": None}
RESOURCE_KEYS = {
    "number_node",
    "cpu_per_node",
    "gpu_per_node",
    "queue_name",
    "group_size",
    "custom_flags",
    "source_list",
    "module_list",
    "envs",
    "batch_type",
}


def _q(text) -> str:
    """A resource value Snakemake keeps as a string: profile values are evaluated as Python and kept as
    text when that fails (NameError, SyntaxError); a value that would evaluate ("1", "None") is quoted."""
    import ast

    text = str(text)
    try:
        ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text if text.strip() else repr(text)
    return repr(text)


def _minutes(text: str) -> int | None:
    """A wall time ('96:0:0', '1-12:00:00', '12:00', '90') in minutes."""
    text = text.strip()
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(float(p)) for p in text.split(":") if p != ""]
    if not parts:
        return None
    if len(parts) == 3:
        h, m, s = parts
    elif len(parts) == 2:
        h, m, s = parts[0], parts[1], 0
    else:
        h, m, s = 0, parts[0], 0
    return days * 1440 + h * 60 + m + (1 if s else 0)


def _mem_mb(text: str) -> int | None:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", text.strip(), re.I)
    if not m:
        return None
    scale = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def parse_flags(kind: str, flags: list[str]) -> tuple[dict, list[str]]:
    """custom_flags -> ({runtime, mem_mb, account, partition}, the flags left over)."""
    found, rest = {}, []
    for flag in flags or []:
        words = shlex.split(re.sub(r"^#\s*(SBATCH|PBS|BSUB)\s*", "", flag.strip()))
        i = 0
        while i < len(words):
            w = words[i]
            opt, _, val = w.partition("=")
            if not val and i + 1 < len(words) and not words[i + 1].startswith("-"):
                val, i = words[i + 1], i + 1
            key = None
            if kind == "slurm":
                key = {"-t": "runtime", "--time": "runtime", "--mem": "mem_mb", "-A": "account", "--account": "account",
                       "-p": "partition", "--partition": "partition"}.get(opt)  # fmt: skip
            elif kind == "lsf":
                key = {"-W": "runtime", "-P": "account", "-q": "partition"}.get(opt)
            elif opt == "-l" and val.startswith("walltime="):
                key, val = "runtime", val.split("=", 1)[1]
            elif opt in ("-A", "-q"):
                key = "account" if opt == "-A" else "partition"
            value = _minutes(val) if key == "runtime" else _mem_mb(val) if key == "mem_mb" else val
            if key and value is not None:
                found[key] = value
            else:
                rest.append(f"{opt}={val}" if val and "=" in w else (f"{opt} {val}" if val else opt))
            i += 1
    return found, rest


def _stage(data, name: str, notes: list) -> dict | None:
    """One stage of machine.json (a dict, or a list: its first entry)."""
    entry = data.get(name)
    if entry is None:
        return None
    if isinstance(entry, list):
        if len(entry) > 1:
            notes.append((f"machine.json:{name}[1:]", short(entry[1:]), "one machine per stage: the first is used"))
        entry = entry[0] if entry else None
    return entry


def _kind(machine: dict, resources: dict) -> str | None:
    bt = str(machine.get("batch_type") or resources.get("batch_type") or "shell").lower()
    if bt not in EXECUTORS:
        raise UserError(f"machine.json: batch_type {bt!r}: no Snakemake executor for it here (Slurm, PBS, LSF, Shell)")
    return EXECUTORS[bt] if bt not in ("pbs", "torque") else bt


def _rule_resources(kind: str, stage: str, res: dict, flags: dict, rest: list[str]) -> dict:
    """The set-resources entry of one rule."""
    nodes = int(res.get("number_node") or 1)
    cpus = int(res.get("cpu_per_node") or 1) or 1
    gpus = int(res.get("gpu_per_node") or 0)
    out = {"runtime": flags.get("runtime", 240 if stage != "fp" else 60)}
    if "mem_mb" in flags:
        out["mem_mb"] = flags["mem_mb"]
    queue = flags.get("partition") or res.get("queue_name")
    if kind == "slurm":
        if queue:
            out["slurm_partition"] = _q(queue)
        if flags.get("account"):
            out["slurm_account"] = _q(flags["account"])
        if stage == "fp":
            out.update({"tasks": nodes * cpus, "cpus_per_task": 1})
            if nodes > 1:
                out["nodes"] = nodes
        else:
            out["cpus_per_task"] = cpus
        if gpus:
            out["gres"] = _q(f"gpu:{gpus}")
        if rest:
            out["slurm_extra"] = _q(" ".join(rest))
    elif kind == "lsf":
        if queue:
            out["lsf_queue"] = _q(queue)
        if flags.get("account"):
            out["lsf_project"] = _q(flags["account"])
        extra = rest + ([f'-gpu "num={gpus}"'] if gpus else [])
        if extra:
            out["lsf_extra"] = _q(" ".join(extra))
    elif kind in ("pbs", "torque"):
        walltime = out["runtime"]
        wt = f"{walltime // 60:02d}:{walltime % 60:02d}:00"
        if kind == "pbs":
            sel = f"select={nodes}:ncpus={cpus}" + (f":ngpus={gpus}" if gpus else "")
        else:
            sel = f"nodes={nodes}:ppn={cpus}" + (f":gpus={gpus}" if gpus else "")
        out["pbs_resources"] = _q(f"{sel},walltime={wt}")
        out["pbs_queue"] = _q(queue or "")
        out["pbs_extra"] = _q(" ".join(rest))
    return out


def build_profile(data: dict) -> tuple[dict, dict, list, str | None]:
    """machine.json -> (profile dict, {"fp_command", "label_env"}, table rows, setup-env.sh text or None)."""
    if "api_version" not in data and any(k.endswith("_machine") for k in data):
        raise UserError(
            "machine.json: the pre-dpdispatcher format (train_machine, fp_resources, ...): convert it to "
            "api_version 1.0 first (DP-GEN's docs) or write the profile from profiles/slurm"
        )
    notes: list = []
    extras: dict = {}
    stages = {s: _stage(data, s, notes) for s in RULES}
    kinds = {s: _kind(e.get("machine") or {}, e.get("resources") or {}) for s, e in stages.items() if e}
    # one executor per profile: the labels' (most jobs), else the first stage's
    kind = kinds.get("fp", next(iter(kinds.values()), None))
    set_resources, setup = {}, []
    for stage, entry in stages.items():
        if not entry:
            continue
        machine, res = entry.get("machine") or {}, dict(entry.get("resources") or {})
        flags, rest = parse_flags(kinds[stage] or "", res.get("custom_flags") or [])
        if kinds[stage] != kind:
            notes.append(
                (f"machine.json:{stage}.machine.batch_type", str(kinds[stage]), f"one batch system per profile: {kind}")
            )
        if kind:
            set_resources[RULES[stage]] = _rule_resources(
                kind, stage, res, flags if kinds[stage] == kind else {}, rest if kinds[stage] == kind else []
            )
        elif rest or flags:
            notes.append((f"machine.json:{stage}.resources.custom_flags", short(res.get("custom_flags")), "local runs"))
        setup += [f"module load {m}" for m in res.get("module_list") or []]
        setup += [f"source {s}" for s in res.get("source_list") or []]
        envs = res.get("envs") or {}
        setup += [f"export {k}={shlex.quote(str(v))}" for k, v in envs.items()]
        if stage == "fp":
            extras["fp_command"] = entry.get("command")
            if envs:
                extras["label_env"] = {str(k): str(v) for k, v in envs.items()}
        else:
            notes.append(
                (f"machine.json:{stage}.command", short(entry.get("command")), "dpsnake runs dp / its own MD itself")
            )
        for key, value in res.items():
            if key not in RESOURCE_KEYS and value not in (None, {}, [], "", False):
                notes.append((f"machine.json:{stage}.resources.{key}", short(value), "no Snakemake profile equivalent"))
        for key in ("context_type", "remote_root", "remote_profile"):
            if machine.get(key) and not (key == "context_type" and "local" in str(machine[key]).lower()):
                notes.append(
                    (f"machine.json:{stage}.machine.{key}", short(machine[key]), "Snakemake submits from this host")
                )
    profile = _profile(kind, set_resources, stages.get("fp") or {}, notes)
    for key in data:
        if key not in RULES and key not in ("api_version", "deepmd_version") and not key.startswith("_"):
            notes.append((f"machine.json:{key}", short(data[key]), "no Snakemake profile equivalent"))
    text = None
    if setup:
        text = "# environment of the DP-GEN stages (machine.json): source it before snakemake\n" + "\n".join(
            dict.fromkeys(setup)
        )
    return profile, extras, notes, text


def _profile(kind: str | None, set_resources: dict, fp: dict, notes: list) -> dict:
    profile = {"rerun-triggers": "mtime", "rerun-incomplete": True, "show-failed-logs": True}
    if kind is None:
        return {"cores": "all", **profile}
    profile.update({"jobs": 100, "retries": 2, "latency-wait": 60, "keep-going": True, "printshellcmds": True})
    label = set_resources.get("label", {})
    default = {"runtime": 30, "mem_mb": 2000}
    for key in ("slurm_partition", "slurm_account", "lsf_queue", "lsf_project", "pbs_queue"):
        if key in label:
            default[key] = label[key]  # the small CPU rules go where the labels go
    if kind in ("pbs", "torque"):
        one = "select=1:ncpus=1" if kind == "pbs" else "nodes=1:ppn=1"
        default.update({"pbs_resources": _q(f"{one},walltime=00:30:00"), "pbs_extra": _q("")})
        default.setdefault("pbs_queue", _q(""))
        profile["executor"] = "cluster-generic"
        profile["cluster-generic-submit-cmd"] = (
            "qsub -V -j oe -o logs/ -q {resources.pbs_queue} -l {resources.pbs_resources} {resources.pbs_extra}"
        )
        notes.append(("machine.json:batch_type", kind, "needs pip install snakemake-executor-plugin-cluster-generic"))
    else:
        profile["executor"] = kind
        if kind == "lsf":
            notes.append(("machine.json:batch_type", kind, "needs pip install snakemake-executor-plugin-lsf"))
    profile["default-resources"] = default
    profile["set-resources"] = set_resources
    group = int(((fp or {}).get("resources") or {}).get("group_size") or 1)
    if group > 1:
        profile["groups"] = ["label=label"]
        profile["group-components"] = [f"label={group}"]
        profile["resources"] = ["label_slots=1"]
        label["label_slots"] = 1
    return profile


def write_profile(machine_json: pathlib.Path, profile_dir: pathlib.Path | None) -> tuple[dict, list, list[str]]:
    """Read machine.json; write ``profile_dir/config.yaml`` (+ ``setup-env.sh``) when given. Returns
    (extras for the config: fp_command, label_env; table rows; lines to print)."""
    import yaml

    from dpsnake.fsio import write_text_atomic

    try:
        data = json.loads(pathlib.Path(machine_json).read_text())
    except FileNotFoundError:
        raise UserError(f"{machine_json}: no such file") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{machine_json}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{machine_json}: expected a JSON object with train, model_devi and fp")
    profile, extras, notes, setup = build_profile(data)
    printed = []
    if profile_dir is not None:
        profile_dir = pathlib.Path(profile_dir)
        head = f"# Snakemake profile made by dpsnake import-dpgen from {machine_json} (docs/dpgen-import.md)\n"
        write_text_atomic(profile_dir / "config.yaml", head + yaml.safe_dump(profile, sort_keys=False))
        printed.append(f"wrote {profile_dir / 'config.yaml'}: snakemake --profile {profile_dir}")
        if setup:
            write_text_atomic(profile_dir / "setup-env.sh", setup + "\n")
            printed.append(f"wrote {profile_dir / 'setup-env.sh'}: source it before snakemake")
    elif data:
        notes.append(("machine.json", str(machine_json), "no --profile-dir given: no profile written"))
    return extras, notes, printed
