"""``dpsnake select``: classify this iteration's explored frames, pick candidates, decide convergence.

Reads ``explore/walkers.json``, ``explore/plan.json``, ``explore/summary.json`` and each walker's
``model_devi.out`` + ``traj.extxyz``; writes ``select/candidates/task.NNNNNN.extxyz`` (one frame each,
provenance in ``info``) and ``select/stats.json`` (format in docs/architecture.md, plus ``stage``,
``stage_iteration``, ``stop``, ``next_stage``, ``tasks``). Both are written under temporary names and
renamed, candidates first, so ``stats.json`` exists only when everything is complete.

Its ``converged`` and ``reason`` are the run's decision across stages (``workflow.convergence``, as the
reports say it); ``stop`` / ``next_stage`` and ``stage_decision`` are the per-stage decision
(``candidates.decide``) that the workflow follows.

A frame is never picked twice: not when it is already in a dataset (``--data``), and not when its label
failed in an earlier iteration (``--results``: ``iter.*/label/task.N.failed.json`` hold the frame's key);
the latter are counted per system as ``failed_before`` in stats.json.

``select.pick`` ``random`` / ``highest`` / ``diverse`` / ``kmeanspp``, ``select.dedup_tol`` and
``select.quota``: see :mod:`dpsnake.workflow.diversity` (features of ``diverse``, ``kmeanspp`` and
``dedup_tol``: the descriptor of the
iteration's model 0, ``--model``; near-copies dropped are counted in ``duplicates`` and
``near_duplicates``).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import sys

import numpy as np

from dpsnake.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="results/config.json")
    parser.add_argument("--iter", type=int, required=True)
    parser.add_argument("--explore", required=True, help="the iteration's explore folder")
    parser.add_argument("--outdir", required=True, help="the iteration's select folder")
    parser.add_argument(
        "--data", default=None, help="dataset root (results/data): frames already in it are never selected again"
    )
    parser.add_argument(
        "--results",
        default=None,
        help="the run's results folder: frames whose label failed in "
        "an earlier iteration (iter.*/label/task.N.failed.json) are never selected again",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="the model whose descriptor gives the features of "
        "select.pick diverse / kmeanspp and select.dedup_tol (default: the ensemble's model 0, "
        "EXPLORE/../train/model.0/model.dp)",
    )


def _read_frames(path: pathlib.Path) -> list:
    try:
        from dpsnake.md.trajectory import read_frames
    except ImportError:  # the reader of the MD package; plain ASE reads the same extxyz
        import ase.io

        return ase.io.read(path, index=":", format="extxyz")
    return read_frames(path)


def gather(explore: pathlib.Path, walkers: list[dict], summary: dict) -> dict:
    """Per system: {'walker', 'step', 'devi_f', 'devi_v'} arrays over all frames of its walkers."""
    from dpsnake.workflow.candidates import read_model_devi

    per = {}
    for w in walkers:
        f = explore / w["name"] / "model_devi.out"
        d = per.setdefault(w["system"], {"walker": [], "step": [], "devi_f": [], "devi_v": []})
        if not f.is_file():
            status = (summary.get(w["name"]) or {}).get("status")
            if status == "finished":
                raise UserError(f"{f}: missing although the walker finished")
            continue
        md = read_model_devi(f)
        n = len(md["step"])
        d["walker"] += [w["name"]] * n
        d["step"] += list(md["step"])
        d["devi_f"] += list(md["max_devi_f"])
        d["devi_v"] += list(md.get("max_devi_v", np.zeros(n)))
    return {s: {k: np.asarray(v) for k, v in d.items()} for s, d in per.items()}


def frame_key(positions, cell) -> bytes:
    """Identity of a structure (positions and cell rounded to 1e-5 A): finds frames selected twice,
    e.g. the start structure (step 0) shared by all walkers of a system and by every iteration."""
    return np.round(np.concatenate([np.ravel(positions), np.ravel(cell)]), 5).tobytes()


def frame_id(positions, cell) -> str:
    """:func:`frame_key` as a short hex string, stable across runs: what ``task.N.failed.json`` records."""
    return hashlib.sha1(frame_key(positions, cell)).hexdigest()[:20]


def failed_before(results, it: int) -> dict[str, str]:
    """{frame id: "task.N.failed.json path: reason"} of every label that failed in an iteration before
    ``it`` under ``results`` (later iterations are ignored, so rerunning a selection picks the same frames).
    A record without a key (written by an older dpsnake) takes it from the failed label's frame."""
    out = {}
    if results is None or not pathlib.Path(results).is_dir():
        return out
    for rec in sorted(pathlib.Path(results).glob("iter.*/label/task.*.failed.json")):
        m = re.fullmatch(r"iter\.(\d+)", rec.parent.parent.name)
        if not m or int(m.group(1)) >= it:
            continue
        try:
            info = json.loads(rec.read_text())
        except (OSError, json.JSONDecodeError):  # a record cut short: its frame is simply not remembered
            continue
        key = info.get("key")
        if not key:
            frame = rec.with_name(rec.name.replace(".failed.json", ".extxyz"))
            if not frame.is_file():
                continue
            import ase.io

            atoms = ase.io.read(frame, format="extxyz")
            key = frame_id(atoms.positions, atoms.cell.array)
        out[key] = f"{rec}: {info.get('reason')}"
    return out


def known_frames(data_root) -> set:
    """Keys of every frame already in the datasets under ``data_root`` (deepmd/npy set.*/coord.npy)."""
    keys = set()
    if data_root is None or not pathlib.Path(data_root).is_dir():
        return keys
    root = pathlib.Path(data_root)
    for coord in root.glob("**/set.*/coord.npy"):
        if any(part.startswith(".") for part in coord.relative_to(root).parts):
            continue  # a temporary folder of a dataset being written
        boxes = np.load(coord.with_name("box.npy"))
        for c, b in zip(np.load(coord), boxes):
            keys.add(frame_key(c, b))
    return keys


def training_frames(data_root, system: str, cap: int = 1000) -> list:
    """Frames of ``system`` already in the datasets under ``data_root`` (``*/<system>/set.*``), as ASE
    Atoms; at most ``cap``, evenly spread over them (the known frames of ``pick: diverse``)."""
    from ase import Atoms

    frames = []
    if data_root is None or not pathlib.Path(data_root).is_dir():
        return frames
    for sys_dir in sorted(pathlib.Path(data_root).glob(f"*/{system}")):
        if sys_dir.parent.name.startswith(".") or not (sys_dir / "type.raw").is_file():
            continue
        types = np.loadtxt(sys_dir / "type.raw", dtype=int, ndmin=1)
        tmap = (sys_dir / "type_map.raw").read_text().split()
        symbols = [tmap[t] for t in types]
        pbc = not (sys_dir / "nopbc").exists()
        for st in sorted(sys_dir.glob("set.*")):
            for c, b in zip(np.load(st / "coord.npy"), np.load(st / "box.npy")):
                frames.append(Atoms(symbols, positions=c.reshape(-1, 3), cell=b.reshape(3, 3), pbc=pbc))
    if len(frames) > cap:
        frames = [frames[k] for k in np.linspace(0, len(frames) - 1, cap).round().astype(int)]
    return frames


def _model_zero(explore: pathlib.Path, model=None):
    """The model file whose descriptor gives the features: ``model``, or the iteration's model 0."""
    return pathlib.Path(model) if model else explore.parent / "train" / "model.0" / "model.dp"


def _levels(cfg: dict, system: str, d: dict) -> tuple[dict, float, float]:
    """(the system's trust section, theta_low, theta_high) for its deviations ``d``, after
    ``select.adaptive_hi`` and then the adaptive theta_low (which counts frames below theta_high)."""
    from dpsnake.workflow import candidates as S
    from dpsnake.workflow.config import system_trust

    sel = cfg["select"]
    trust = system_trust(cfg, system)
    lo, hi = trust["force"]
    ah = sel.get("adaptive_hi") or {}
    hi = S.adaptive_hi(d["devi_f"], hi, ah.get("ratio"), ah.get("max_hi"))
    ad = sel.get("adaptive") or {}
    if ad.get("enabled"):
        lo = S.adaptive_lo(
            d["devi_f"], lo, hi, ad.get("numb_candidates", 10), ad.get("ratio", 0.0), ad.get("min_lo", 0.0)
        )
    return trust, lo, hi


def _budget(cfg: dict, prepared: dict) -> dict[str, int]:
    """Labels each system may get this iteration: ``select.max_candidates``, or with ``select.budget``
    that many over all systems, shared in proportion to each system's frames the ensemble is not sure
    of (candidates + failed), at most ``max_candidates`` and at most the frames it can label (kept by
    :func:`_prepare`: candidates, and failed frames with ``fill_from_failed``, that passed the structure
    filter and were not labelled before) each (:func:`dpsnake.workflow.diversity.proportional`), so a
    share a system cannot use goes to the others."""
    from dpsnake.workflow import candidates as S
    from dpsnake.workflow.diversity import proportional

    sel = cfg["select"]
    names = sorted(prepared)
    if sel.get("budget") is None:
        return {s: int(sel["max_candidates"]) for s in names}
    weight = [int(np.sum(prepared[s]["cls"] != S.ACCURATE)) for s in names]
    avail = [min(len(prepared[s]["keep"]), int(sel["max_candidates"])) for s in names]
    return dict(zip(names, (int(n) for n in proportional(weight, avail, int(sel["budget"])))))


def _prepare(cfg, system, d, explore, by_name, seen, bad) -> dict:
    """One system's frames before picking: trust levels, classes (structure-filtered candidates become
    failed), and ``keep``: the candidates (+ failed frames with ``fill_from_failed``) that pass the structure filter, were not labelled before (``seen``: frame keys, updated)
    and whose label did not fail before (``bad``); with the counts select's stats report."""
    import ase.io

    from dpsnake.workflow import candidates as S

    sel = cfg["select"]
    trust, lo, hi = _levels(cfg, system, d)
    cls = S.classify(d["devi_f"], (lo, hi), d["devi_v"], trust.get("virial"))
    cand = np.flatnonzero(cls == S.CANDIDATE)
    # fill_from_failed: frames above the upper trust level may fill shares the candidates leave
    over = np.flatnonzero(cls == S.FAILED) if sel.get("fill_from_failed") else np.zeros(0, dtype=int)
    # structure filter on candidates: bad frames are counted as failed, never labelled
    frames_cache, keep, filtered, duplicates, refailed, example = {}, [], 0, 0, 0, None
    ref = ase.io.read(explore / by_name[d["walker"][0]]["structure"]) if len(d["walker"]) else None
    ref_vpa = abs(ref.cell.volume) / len(ref) if ref is not None and ref.pbc.any() else None
    for i in np.concatenate([cand, over]).astype(int):
        atoms = _frame(explore, d["walker"][i], int(d["step"][i]), frames_cache)
        why = (
            "frame missing from traj.extxyz"
            if atoms is None
            else S.structure_problem(atoms, sel["min_dist"], sel["min_cell_angle"], sel["volume_range"], ref_vpa)
        )
        if why and cls[i] == S.FAILED:  # a fill-in that is no structure to label: stays failed
            continue
        if why:
            filtered += 1
            cls[i] = S.FAILED
            print(f"select: {system} {d['walker'][i]} step {d['step'][i]}: not a candidate: {why}", file=sys.stderr)
            continue
        key = frame_key(atoms.positions, atoms.cell.array)
        if key in seen:  # already labelled (or picked from another walker): never twice
            duplicates += cls[i] != S.FAILED  # counted for candidates, not fill-ins
            continue
        fid = hashlib.sha1(key).hexdigest()[:20]  # = frame_id(): the key failed labels record
        if fid in bad:  # its label failed before (e.g. the start structure): a relabel fails again
            refailed += cls[i] != S.FAILED
            example = example or f"{d['walker'][i]} step {d['step'][i]} ({bad[fid]})"
            continue
        seen.add(key)
        keep.append(i)
    if refailed:
        print(
            f"select: {system}: {refailed} candidate(s) not picked again, their label failed in an earlier "
            f"iteration, e.g. {example}",
            file=sys.stderr,
        )
    # select holds every system's result until all are picked: keep only the frames it still reads
    # (the kept ones: features and tasks), not whole trajectories
    kept = {(d["walker"][i], int(d["step"][i])) for i in keep}
    frames_cache = {w: {k: a for k, a in fr.items() if (w, k) in kept} for w, fr in frames_cache.items()}
    return {
        "trust": trust,
        "lo": lo,
        "hi": hi,
        "cls": cls,
        "keep": np.asarray(keep, dtype=int),
        "frames_cache": frames_cache,
        "filtered": filtered,
        "duplicates": duplicates,
        "refailed": refailed,
    }


# below this many atoms (a system's candidates + its training frames) select computes the features with
# NumPy even where there is a GPU: starting CuPy in the select job (import, context, the neighbour
# kernels) took 2-3 s per iteration on the H200 machine; NumPy took 0.23 ms per atom on the loaded 2-core dev machine
SMALL_POOL_ATOMS = 20_000


def feature_xp(cfg: dict, natoms: int, notes: dict):
    """numpy or cupy for the descriptor features of ``natoms`` atoms: NumPy with ``explore.device: cpu``
    or under :data:`SMALL_POOL_ATOMS`, else CuPy where it sees a GPU (started once per select run,
    kept in ``notes``)."""
    if cfg["explore"].get("device") == "cpu" or natoms < SMALL_POOL_ATOMS:
        return np
    if "xp" not in notes:
        from dpsnake.md.explore import pick_xp

        notes["xp"] = pick_xp("auto")
    return notes["xp"]


def _pick(
    cfg, system, d, keep, frames_cache, explore, by_name, rng, data_root, model, notes, fill=None, nmax=None, cls=None
):
    """``select.pick`` / ``dedup_tol`` / ``quota`` on the kept candidates ``keep`` of one system
    (``fill``: which of them are fill-ins from above the upper trust level), at most ``nmax`` (default
    ``select.max_candidates``): (picked indices, sorted; near duplicates dropped). ``cls``: the classes of
    all the system's frames (:func:`dpsnake.workflow.candidates.classify`), for ``quota: condition_weighted``."""
    from dpsnake.workflow import candidates as S
    from dpsnake.workflow import diversity as D

    sel = cfg["select"]
    nmax = int(sel["max_candidates"] if nmax is None else nmax)
    mode, tol, quota = sel["pick"], sel.get("dedup_tol"), sel.get("quota", "system")
    frac = float(sel.get("random_fraction") or 0.0)
    keep = np.asarray(keep, dtype=int)
    fill = np.zeros(len(keep), dtype=bool) if fill is None else np.asarray(fill, dtype=bool)
    if mode not in D.FEATURE_PICKS and tol is None and quota == "system" and not fill.any() and not frac:
        return S.pick(keep, d["devi_f"], nmax, mode, rng), 0
    groups = weights = None
    if quota in ("condition", "condition_weighted"):
        from dpsnake.workflow.stages import condition

        cond = {w: condition(by_name[w]) for w in set(d["walker"])}
        names = sorted(set(cond.values()))
        gid = {w: names.index(c) for w, c in cond.items()}
        groups = np.asarray([gid[d["walker"][i]] for i in keep], dtype=int)
        if quota == "condition_weighted":  # shares by the frames the ensemble is unsure of, as select.budget's
            if cls is None:
                raise ValueError("quota condition_weighted needs cls, the classes of all the system's frames")
            unsure = np.asarray(cls) != S.ACCURATE
            weights = np.bincount([gid[w] for w in d["walker"]], weights=unsure, minlength=len(names))
    feats = known = None
    if (mode in D.FEATURE_PICKS or tol is not None) and len(keep):
        frames = [_frame(explore, d["walker"][i], int(d["step"][i]), frames_cache) for i in keep]
        train = training_frames(data_root, system) if mode in D.FEATURE_PICKS else []
        xp = feature_xp(cfg, sum(len(a) for a in frames + train), notes)
        f, how = D.frame_features(_model_zero(explore, model), frames + train, cfg["type_map"], xp)
        if how not in notes:
            notes[how] = True
            print(f"select: features of pick {mode} / dedup_tol: {how}", file=sys.stderr)
        f = D.scaled(f)
        feats, known = f[: len(frames)], f[len(frames) :]
    pos, dups = D.greedy_pick(d["devi_f"][keep], nmax, mode, rng, feats, known, tol, groups, fill, frac, weights)
    if dups:
        print(
            f"select: {system}: {dups} candidate(s) within dedup_tol {tol:g} of a picked frame dropped", file=sys.stderr
        )
    return np.sort(keep[pos]), dups


def select(cfg: dict, it: int, explore: pathlib.Path, data_root=None, results=None, model=None) -> tuple[dict, list]:
    """Returns (stats, tasks); tasks: list of (atoms, info) to write as candidates. ``data_root``: frames
    in its datasets are not picked; ``results``: frames whose label failed before ``it`` are not picked;
    ``model``: the model whose descriptor gives the features of ``pick: diverse`` and ``dedup_tol``
    (default: the iteration's model 0 next to ``explore``)."""
    from dpsnake.workflow import candidates as S

    walkers = json.loads((explore / "walkers.json").read_text())
    plan = json.loads((explore / "plan.json").read_text())
    summary = json.loads((explore / "summary.json").read_text()).get("walkers", {})
    by_name = {w["name"]: w for w in walkers}
    data = gather(explore, walkers, summary)
    sel = cfg["select"]
    rng = np.random.default_rng([sel["seed"], it])
    seen = known_frames(data_root)
    bad = failed_before(results, it)
    systems, tasks, notes = {}, [], {}
    prepared = {system: _prepare(cfg, system, data[system], explore, by_name, seen, bad) for system in sorted(data)}
    nmax = _budget(cfg, prepared)
    for system in sorted(data):
        d, pr = data[system], prepared[system]
        trust, lo, hi, cls, frames_cache = pr["trust"], pr["lo"], pr["hi"], pr["cls"], pr["frames_cache"]
        picked, near = _pick(
            cfg,
            system,
            d,
            pr["keep"],
            frames_cache,
            explore,
            by_name,
            rng,
            data_root,
            model,
            notes,
            cls[pr["keep"]] == S.FAILED,  # fill-ins from above trust hi
            nmax[system],
            cls,
        )
        filled = int(np.sum(cls[picked] == S.FAILED))
        if filled:
            print(
                f"select: {system}: {filled} frame(s) above the upper trust level fill shares the candidates "
                "left (fill_from_failed)",
                file=sys.stderr,
            )
        duplicates = pr["duplicates"] + near
        for i in picked:
            atoms = _frame(explore, d["walker"][i], int(d["step"][i]), frames_cache).copy()
            w = by_name[d["walker"][i]]
            atoms.info = {
                "iteration": it,
                "system": system,
                "walker": w["name"],
                "step": int(d["step"][i]),
                "max_devi_f": float(d["devi_f"][i]),
                "above_trust_hi": bool(cls[i] == S.FAILED),
                # the thermostat's / barostat's target at the frame's step (a schedule's, else the constant)
                "temperature": _target(w, "temperature", int(d["step"][i])),
                "pressure": _target(w, "pressure", int(d["step"][i])),
            }
            atoms.calc = None
            tasks.append(atoms)
        n = len(cls)
        counts = {
            k: int(np.sum(cls == c))
            for k, c in (("accurate", S.ACCURATE), ("candidate", S.CANDIDATE), ("failed", S.FAILED))
        }
        systems[system] = {
            **counts,
            "total": n,
            **{f"{k}_ratio": (v / n if n else 0.0) for k, v in counts.items()},
            "trust_lo": float(lo),
            "trust_hi": float(hi),
            "trust_lo_virial": None if trust.get("virial") is None else trust["virial"][0],
            "trust_hi_virial": None if trust.get("virial") is None else trust["virial"][1],
            "filtered": pr["filtered"],
            "duplicates": duplicates,
            "near_duplicates": int(near),
            "failed_before": pr["refailed"],
            "selected": int(len(picked)),
            "share": int(nmax[system]),
            "filled_from_failed": filled,
        }
    stages = cfg["explore"]["stages"]
    stage, stage_it = plan["stage"], plan["stage_iteration"]
    decision = S.decide(
        systems,
        cfg["convergence"]["accurate_ratio"],
        it,
        stage,
        stage_it,
        len(stages),
        stages[stage]["max_iterations"],
        cfg["convergence"]["max_iterations"],
    )
    wstats = {
        w["name"]: {
            "system": w["system"],
            "temperature": w["temperature"],
            "pressure": w.get("pressure"),
            "status": (summary.get(w["name"]) or {}).get("status", "missing"),
            "reason": (summary.get(w["name"]) or {}).get("reason"),
        }
        for w in walkers
    }
    for k, atoms in enumerate(tasks):
        atoms.info["task"] = f"{k:06d}"
    stats = {
        "iteration": it,
        "systems": systems,
        "walkers": wstats,
        **decision,
        "stage": stage,
        "stage_iteration": stage_it,
        "tasks": [a.info["task"] for a in tasks],
    }
    stats.update(honest_decision(cfg, stats, results))
    return stats, tasks


def honest_decision(cfg: dict, stats: dict, results=None) -> dict:
    """``converged`` and ``reason`` as the reports, ``dpsnake status`` and finalize say them
    (``workflow.convergence.run_decision`` over the stats.json of the earlier iterations under ``results``
    and this one): a last stage that explores only some systems is not "converged" while another system's
    latest accurate ratio is below the threshold. ``stop`` and ``next_stage`` stay the per-stage decision
    (the workflow's), which is kept whole as ``stage_decision``."""
    from dpsnake.workflow.convergence import history_upto, run_decision

    it = int(stats["iteration"])
    history = history_upto(results, it - 1) if results is not None and it > 0 else []
    d = run_decision([*history, stats], float(cfg["convergence"]["accurate_ratio"]), cfg)
    return {
        "converged": d["converged"],
        "reason": d["reason"],
        "stage_decision": {k: stats[k] for k in ("converged", "stop", "next_stage", "reason")},
    }


def _target(w: dict, key: str, step: int) -> float:
    """A walker's temperature (K) or pressure (bar) target at ``step``: its schedule's value, else the constant."""
    from dpsnake.md.ramps import value_at

    ramp = w.get(f"{key}_ramp")
    return float(value_at(ramp, step)) if ramp else float(w.get(key) or 0.0)


def _frame(explore: pathlib.Path, walker: str, step: int, cache: dict):
    if walker not in cache:
        path = explore / walker / "traj.extxyz"
        frames = _read_frames(path) if path.is_file() else []
        cache[walker] = {int(a.info.get("step", -1)): a for a in frames}
    return cache[walker].get(step)


def table(stats: dict) -> str:
    """The per-system counts as a fixed-width table and the decision (logged every iteration)."""
    from dpsnake.workflow.convergence import verdict

    lines = [
        f"iteration {stats['iteration']} (stage {stats['stage']}): per-system model deviation classes",
        f"{'system':<12}{'accurate':>9}{'candidate':>10}{'failed':>8}{'total':>7}{'acc_ratio':>10}"
        f"{'trust_lo':>9}{'trust_hi':>9}{'selected':>9}",
    ]
    for s, v in stats["systems"].items():
        lines.append(
            f"{s:<12}{v['accurate']:>9}{v['candidate']:>10}{v['failed']:>8}{v['total']:>7}"
            f"{v['accurate_ratio']:>10.3f}{v['trust_lo']:>9.3f}{v['trust_hi']:>9.3f}{v['selected']:>9}"
        )
    lines.append(f"{verdict(stats)}: {stats['reason']}")  # the words of the reports and `dpsnake status`
    return "\n".join(lines)


def run(args) -> int:
    import ase.io

    from dpsnake.fsio import atomic_dir, write_json_atomic
    from dpsnake.workflow.config import read_resolved

    cfg = read_resolved(args.config)
    explore, out = pathlib.Path(args.explore), pathlib.Path(args.outdir)
    for f in ("walkers.json", "plan.json", "summary.json"):
        if not (explore / f).is_file():
            raise UserError(f"--explore: {explore / f}: no such file")
    stats, tasks = select(cfg, args.iter, explore, args.data, args.results, args.model)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out / "candidates") as tmp:
        for atoms in tasks:
            ase.io.write(tmp / f"task.{atoms.info['task']}.extxyz", atoms, format="extxyz")
    write_json_atomic(out / "stats.json", stats)
    print(table(stats))
    return 0
