"""DP-GEN's ``model_devi_jobs`` as dpsnake's exploration plan (``explore.stages``).

DP-GEN runs job ``j`` in iteration ``j``, whatever the accuracy; a stage with ``max_iterations: 1`` does
the same (a done or not done stage moves on after its one iteration), and ``convergence.max_iterations`` is
the number of stages. Per job: ``sys_idx`` -> ``systems``, ``temps`` -> ``temperatures``, ``press`` ->
``pressures`` (npt ensembles only: DP-GEN ignores them otherwise), ``ensemble``, ``nsteps``, ``trj_freq``,
``dt`` (else ``model_devi_dt``), ``taut`` / ``taup`` (else ``model_devi_taut`` / ``model_devi_taup``).

Template jobs (``template.lmp`` + ``rev_mat.lmp``): dpsnake runs its own MD, not a LAMMPS input, so only
what a stage can say is taken: the ensemble (the template's ``fix`` line), ``timestep`` and ``run`` when
literal, and ``V_TEMP`` / ``V_PRES`` / ``V_NSTEPS`` of ``rev_mat.lmp``; the rest of the template (PLUMED
bias, other fixes, computes) goes into the table. A job that gives no temperature is left out (table).
"""

from __future__ import annotations

from dpsnake.importers.dpgen_common import Context
from dpsnake.importers.dpgen_systems import ENSEMBLES, expand_idx

JOB_KEYS = {
    "sys_idx",
    "temps",
    "Ts",
    "press",
    "Ps",
    "trj_freq",
    "t_freq",
    "traj_freq",
    "nsteps",
    "ensemble",
    "ens",
    "dt",
    "taut",
    "taup",
    "template",
    "rev_mat",
}


def _alias(job: dict, *names):
    for n in names:
        if n in job:
            return job[n]
    return None


def _template_md(ctx: Context, key: str, job: dict) -> dict:
    """What a LAMMPS template job says about the MD: {ensemble, dt, nsteps, temps, press} (None if unknown)."""
    tmpl = job.get("template") or {}
    rev = (job.get("rev_mat") or {}).get("lmp") or {}
    md = {"ensemble": None, "dt": None, "nsteps": None, "temps": None, "press": None}
    path = ctx.resolve(tmpl["lmp"]) if tmpl.get("lmp") else None
    text = path.read_text() if path is not None and path.is_file() else ""
    if path is not None and not text:
        raise ctx.error(f"{key}.template.lmp", f"{path}: no such file")
    for line in text.splitlines():
        words = line.split("#")[0].split()
        if len(words) >= 4 and words[0] == "fix":
            style = words[3]
            if style == "npt":
                md["ensemble"] = "npt-tri" if "tri" in words else "npt-aniso" if "aniso" in words else "npt"
            elif style in ("nvt", "nve") and md["ensemble"] is None:
                md["ensemble"] = style
            elif style == "langevin":
                md["ensemble"] = "nvt-langevin"
        elif len(words) == 2 and words[0] == "timestep" and _number(words[1]):
            md["dt"] = float(words[1])
        elif len(words) >= 2 and words[0] == "run" and words[1].isdigit():
            md["nsteps"] = int(words[1])
    taken = {"V_TEMP": "temps", "V_PRES": "press", "V_NSTEPS": "nsteps"}
    for var, values in rev.items():
        if var in taken:
            vals = values if isinstance(values, list) else [values]
            if var == "V_NSTEPS":
                md["nsteps"] = int(max(vals))
                if len(set(vals)) > 1:
                    ctx.note(f"{key}.rev_mat.lmp.V_NSTEPS", vals, "one nsteps per stage: the largest is used")
            else:
                md[taken[var]] = [float(v) for v in vals]
        else:
            ctx.note(f"{key}.rev_mat.lmp.{var}", values, "a variable of the LAMMPS template: dpsnake runs its own MD")
    ctx.note(
        f"{key}.template",
        tmpl,
        "dpsnake runs its own MD, not a LAMMPS/PLUMED input: ensemble, timestep, run, V_TEMP, V_PRES and "
        "V_NSTEPS are taken, the rest of the template (bias, other fixes) is not",
    )
    for part in ("plm",):
        if (job.get("rev_mat") or {}).get(part):
            ctx.note(f"{key}.rev_mat.{part}", job["rev_mat"][part], "PLUMED: no enhanced sampling in dpsnake")
    if job.get("sys_rev_mat"):
        ctx.note(f"{key}.sys_rev_mat", job["sys_rev_mat"], "per-system template variables: no templates in dpsnake")
    return md


def _number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _stage(ctx: Context, j: int, job: dict, names: list[list[str]], nconfs: list[int], confs: str) -> dict | None:
    """One model_devi job as a stage, or None (with a table row) when it cannot be one."""
    key = f"model_devi_jobs[{j}]"
    if "template" in job:
        md = _template_md(ctx, key, job)
        temps = _alias(job, "temps", "Ts") or md["temps"]
        press = _alias(job, "press", "Ps") or md["press"]
        ensemble = _alias(job, "ensemble", "ens") or md["ensemble"] or "nvt"
        nsteps = _alias(job, "nsteps") or md["nsteps"]
        dt = job.get("dt") or md["dt"]
    else:
        temps, press = _alias(job, "temps", "Ts"), _alias(job, "press", "Ps")
        ensemble, nsteps, dt = _alias(job, "ensemble", "ens"), job.get("nsteps"), job.get("dt")
    trj_freq = _alias(job, "trj_freq", "t_freq", "traj_freq")
    if not temps or nsteps is None:
        ctx.note(key, job, "no temperatures or nsteps that dpsnake's MD can run: left out of the plan")
        return None
    ens = ENSEMBLES.get(str(ensemble))
    if ens is None:
        ctx.note(key, job, f"ensemble {ensemble!r} has no dpsnake equivalent: left out of the plan")
        return None
    sys_idx = expand_idx(ctx, f"{key}.sys_idx", job.get("sys_idx", []))
    for i in sys_idx:
        if not 0 <= i < len(names):
            raise ctx.error(f"{key}.sys_idx", f"system {i} is not in sys_configs (0..{len(names) - 1})")
    stage = {"systems": [n for i in sys_idx for n in names[i]], "temperatures": [float(t) for t in temps]}
    if ens.startswith("npt"):
        stage["pressures"] = [float(p) for p in (press or [0.0])]
    stage.update({"ensemble": ens, "nsteps": int(nsteps), "trj_freq": int(trj_freq or 10)})
    stage["dt"] = float(dt if dt is not None else ctx.get("model_devi_dt", 0.002))
    taut = job.get("taut", ctx.get("model_devi_taut"))
    taup = job.get("taup", ctx.get("model_devi_taup"))
    if taut is not None:
        stage["tau_t"] = float(taut)
    if taup is not None and ens.startswith("npt"):
        stage["tau_p"] = float(taup)
    reps = max(nconfs[i] for i in sys_idx) if confs == "first" and sys_idx else 1
    if reps > 1:
        stage["replicas"] = reps
        if len({nconfs[i] for i in sys_idx}) > 1:
            ctx.note(f"{key}.sys_idx", job["sys_idx"], f"systems with different numbers of files: {reps} replicas each")
    stage["max_iterations"] = 1
    _job_leftovers(ctx, key, job)
    return stage


def _job_leftovers(ctx: Context, key: str, job: dict) -> None:
    why = {
        "model_devi_f_trust_lo": "trust levels per iteration: dpsnake's are per system for the whole run",
        "model_devi_f_trust_hi": "trust levels per iteration: dpsnake's are per system for the whole run",
        "model_devi_v_trust_lo": "trust levels per iteration: dpsnake's are per system for the whole run",
        "model_devi_v_trust_hi": "trust levels per iteration: dpsnake's are per system for the whole run",
        "nbeads": "path-integral MD: not in dpsnake",
        "pka_e": "primary knock-on atom: not in dpsnake",
        "neidelay": "LAMMPS neighbour list setting: not needed by dpsnake's MD",
        "sys_rev_mat": None,
    }
    for sub, value in job.items():
        if sub in JOB_KEYS or sub.startswith("_") or why.get(sub, "") is None:
            continue
        ctx.note(f"{key}.{sub}", value, why.get(sub, "no dpsnake equivalent"))


def build_stages(ctx: Context, names: list[list[str]], nconfs: list[int], confs: str, skip: int = 0) -> list[dict]:
    """``model_devi_jobs`` -> stages; jobs before ``skip`` are done already (``--data``) and left out."""
    engine = ctx.get("model_devi_engine", "lammps")
    jobs = ctx.require("model_devi_jobs")
    if engine != "lammps":
        ctx.note("model_devi_engine", engine, "dpsnake explores with its own batched MD: jobs are read as MD jobs")
        for key in ("gromacs_settings", "model_devi_amber_settings"):
            if ctx.has(key):
                ctx.note(key, ctx.get(key), f"settings of {engine}: dpsnake runs its own MD")
    if not isinstance(jobs, list) or not jobs:
        raise ctx.error("model_devi_jobs", "expected a non-empty list of jobs")
    if skip >= len(jobs):
        ctx.note(
            "model_devi_jobs",
            f"{len(jobs)} jobs",
            f"all done in the DP-GEN run ({skip} iterations): the last job is kept as the plan",
        )
        skip = len(jobs) - 1
    elif skip:
        ctx.note(
            f"model_devi_jobs[0:{skip}]",
            f"{skip} jobs",
            "done in the DP-GEN run (--data): their labels are init data, the plan starts after them",
        )
    stages = []
    for j, job in enumerate(jobs):
        if j < skip:
            continue
        stage = _stage(ctx, j, job, names, nconfs, confs)
        if stage is not None:
            stages.append(stage)
            ctx.source("explore", f"explore.stages[{len(stages) - 1}] <- model_devi_jobs[{j}]")
    if not stages:
        raise ctx.error(
            "model_devi_jobs",
            f"no job dpsnake's MD can run (model_devi_engine {engine}): each needs temps and nsteps "
            "(or a LAMMPS template with V_TEMP); write explore.stages yourself",
        )
    return stages
