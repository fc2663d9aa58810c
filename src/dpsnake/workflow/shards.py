"""Sharded exploration: the iteration's walkers split into balanced shards, one GPU job each.

``explore.shards`` (a number, or ``auto``: as many shards as the walkers' cost needs at
``explore.shard_budget`` atom-steps per shard) splits ``walkers.json`` into ``explore/shards.json``
(written by ``dpsnake plan``). Each shard is ``dpsnake explore --shard K``: the shard's walkers run as
one batch; their folders land in ``explore/<walker>/`` as unsharded, the shard's checkpoint and
summary in ``explore/shards/shard.K/``. ``dpsnake merge-shards`` then writes ``explore/summary.json``
and ``explore/engine.json``, so select and the reports see one exploration.

Cost of a walker, in atom-steps (atoms x model evaluations): ``natoms * nsteps * (1 + (M - 1) /
trj_freq)``: model 0 drives every step, the other M - 1 models run every ``trj_freq`` steps. The
batched engine's time is linear in it once a GPU is full, which is when sharding is worth it.
Shards are filled longest-first into the least-loaded shard (LPT), so the largest shard is at most
4/3 of the optimum; ``balance`` = largest shard cost / mean shard cost is recorded.
"""

from __future__ import annotations

import heapq
import json
import math
import pathlib

from dpsnake.errors import UserError

SHARDS = "shards.json"
# cost units per shard for shards: auto; ~12 min of the built-in engine on an H200 (0.149 us per cost unit
# = 0.19 us per MD atom-step / 1.3 with 4 models every 10 steps: bench/bench_shards.py)
DEFAULT_BUDGET = 5e9


def walker_cost(natoms: int, nsteps: int, trj_freq: int, nmodels: int) -> float:
    """Atom-steps (atoms x model evaluations) of one walker."""
    return float(natoms) * nsteps * (1.0 + (nmodels - 1) / trj_freq)


def shard_count(setting, total_cost: float, nwalkers: int, budget: float) -> int:
    """Shards for ``explore.shards`` = ``setting`` (int or 'auto'); never more than the walkers."""
    if setting == "auto":
        n = math.ceil(total_cost / budget) if total_cost > 0 else 1
    elif isinstance(setting, int) and not isinstance(setting, bool) and setting >= 1:
        n = setting
    else:
        raise UserError(f"explore.shards: must be a positive integer or 'auto', got {setting!r}")
    return max(1, min(n, nwalkers))


def split(costs: list[float], n: int) -> list[list[int]]:
    """Walker indices per shard: longest first into the least-loaded shard (ties: lowest shard).
    Each shard's indices are in walkers.json order."""
    heap = [(0.0, k) for k in range(n)]
    out: list[list[int]] = [[] for _ in range(n)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, k = heapq.heappop(heap)
        out[k].append(i)
        heapq.heappush(heap, (load + costs[i], k))
    return [sorted(s) for s in out]


def balance(loads: list[float]) -> float:
    """Largest shard load / mean shard load (1.0 = perfect)."""
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def plan_shards(walkers: list[dict], natoms: dict, setting, budget: float, nmodels: int) -> dict:
    """The content of shards.json for walker dicts (walkers.json entries); ``natoms``: atoms per
    walker ``structure`` path."""
    costs = [walker_cost(natoms[w["structure"]], w["nsteps"], w["trj_freq"], nmodels) for w in walkers]
    n = shard_count(setting, sum(costs), len(walkers), budget)
    parts = split(costs, n)
    loads = [sum(costs[i] for i in p) for p in parts]
    return {
        "setting": setting,
        "budget": budget,
        "models": nmodels,
        "balance": balance(loads),
        "shards": [{"walkers": [walkers[i]["name"] for i in p], "cost": c} for p, c in zip(parts, loads)],
    }


def write_shard_plan(cfg: dict, walkers: list[dict], outdir: pathlib.Path) -> dict:
    """Write ``outdir/shards.json`` for the walkers of an iteration (structures are in ``outdir``)."""
    import ase.io

    from dpsnake.fsio import write_json_atomic

    natoms = {s: len(ase.io.read(outdir / s)) for s in {w["structure"] for w in walkers}}
    ex = cfg["explore"]
    plan = plan_shards(
        walkers, natoms, ex.get("shards", 1), float(ex.get("shard_budget", DEFAULT_BUDGET)), cfg["train"]["numb_models"]
    )
    write_json_atomic(outdir / SHARDS, plan)
    return plan


def shard_walkers(path, k: int) -> list[str]:
    """Names of the walkers of shard ``k`` in a shards.json."""
    plan = read_json(path, "--shards-file")
    shards = plan.get("shards", [])
    if not 0 <= k < len(shards):
        raise UserError(f"--shard {k}: {path} has shards 0..{len(shards) - 1}")
    return list(shards[k]["walkers"])


def read_json(path, what: str) -> dict:
    path = pathlib.Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what}: file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def state_dir(outdir, k: int) -> pathlib.Path:
    """Where shard ``k`` keeps its checkpoint, summary.json and engine.json."""
    return pathlib.Path(outdir) / "shards" / f"shard.{k}"


# --------------------------------------------------------------------------- dpsnake merge-shards
def add_arguments(p) -> None:
    p.add_argument("--walkers", required=True, help="explore/walkers.json")
    p.add_argument("--shards-file", required=True, help="explore/shards.json")
    p.add_argument("--outdir", required=True, help="the exploration folder (explore/)")


def merge(walkers_path, shards_path, outdir) -> dict:
    """Join the shards' summaries into ``outdir/summary.json`` (walkers.json order) and their
    engine.json into ``outdir/engine.json``; every walker must be in exactly one finished shard."""
    from dpsnake.fsio import write_json_atomic

    names = [w["name"] for w in read_json(walkers_path, "--walkers")]
    plan = read_json(shards_path, "--shards-file")
    outdir = pathlib.Path(outdir)
    rows, engines = {}, []
    for k, shard in enumerate(plan["shards"]):
        sdir = state_dir(outdir, k)
        summ = read_json(sdir / "summary.json", f"shard {k}")["walkers"]
        if set(summ) != set(shard["walkers"]):
            raise UserError(f"{sdir / 'summary.json'}: its walkers are not those of shard {k} in {shards_path}")
        rows.update(summ)
        engines.append(read_json(sdir / "engine.json", f"shard {k}"))
    missing = [n for n in names if n not in rows]
    if missing or len(rows) != len(names) or sum(len(s["walkers"]) for s in plan["shards"]) != len(names):
        listed = [n for s in plan["shards"] for n in s["walkers"]]
        extra = sorted(set(rows) - set(names)) or sorted(n for n in set(listed) if listed.count(n) > 1)
        raise UserError(f"{shards_path}: walker '{(missing or extra)[0]}' is not in exactly one shard")
    kinds = {(e["engine"], e["device"]) for e in engines}
    if len(kinds) > 1:
        raise UserError(f"shards ran on different engines/devices {sorted(kinds)}: rerun them with one setting")
    engine = {**engines[0], "shards": len(engines), "balance": plan["balance"]}
    write_json_atomic(outdir / "engine.json", engine)
    summary = {"walkers": {n: rows[n] for n in names}}
    write_json_atomic(outdir / "summary.json", summary, fsync=True)  # last: marks the exploration done
    return summary


def run(args) -> int:
    summary = merge(args.walkers, args.shards_file, args.outdir)
    plan = read_json(args.shards_file, "--shards-file")
    done = sum(r["status"] == "finished" for r in summary["walkers"].values())
    print(
        f"merged {len(plan['shards'])} shards: {done}/{len(summary['walkers'])} walkers finished; "
        f"balance (largest / mean shard cost) {plan['balance']:.3f}"
    )
    return 0
