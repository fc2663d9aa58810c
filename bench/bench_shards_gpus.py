"""Sharded exploration on several GPUs of one host (issue 24): the walkers of one iteration split by
dpsnake's shard plan, one `dpsnake explore --shard K` process per GPU (CUDA_VISIBLE_DEVICES=K), all
started together, as the explore_shard jobs of a sharded iteration run. Strong scaling: the same W
walkers (fcc Cu, 3x3x3 cubic cells, 108 atoms; NPT 300 K / 1 bar, dt 1 fs, deviation of all models
every 10 steps, frames written) with 1, 2, ... shards; time = the slowest shard process, wall clock
from start to exit (start-up, structures, MD, files). Balance = slowest / mean shard process.

    python bench/bench_shards_gpus.py m0.dp m1.dp m2.dp m3.dp [--walkers 512 2048] [--gpus 1 2]
           [--steps 200] [--precision mixed] [--compress 2.0] [--device gpu]
CPU smoke test (processes, no GPUs): ... --walkers 4 --gpus 1 2 --steps 20 --device cpu --json ""

Prints a Markdown table, writes JSON (default bench/results/shards_gpus_<device>x<max GPUs>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from benchutil import device_tag, results_path, write_results


def gpu_name() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, check=True
        )
        return out.stdout.splitlines()[0].strip()
    except (OSError, subprocess.CalledProcessError, IndexError):
        return None


def run_shards(folder: pathlib.Path, models, ngpu: int, args) -> dict:
    """Plan ngpu shards of folder/walkers.json, start one explore process per shard and GPU; times."""
    from dpsnake.workflow import shards

    walkers = json.loads((folder / "walkers.json").read_text())
    plan = shards.plan_shards(walkers, {"cu.extxyz": 108}, ngpu, 1e30, len(models))
    (folder / "shards.json").write_text(json.dumps(plan))
    base = [
        sys.executable,
        "-m",
        "dpsnake.cli",
        "explore",
        "--models",
        *models,
        "--walkers",
        str(folder / "walkers.json"),
    ]
    base += ["--outdir", str(folder), "--device", args.device, "--precision", args.precision, "--no-progress"]
    base += ["--compress", str(args.compress)] if args.compress else []
    procs, t0 = [], time.perf_counter()
    for k in range(ngpu):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(k), PYTHONUNBUFFERED="1")
        cmd = [*base, "--shard", str(k), "--shards-file", str(folder / "shards.json")]
        log = open(folder / f"shard{k}.log", "w")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    ends = [None] * ngpu
    while None in ends:  # each process's wall time from the common start to its exit
        for k, (p, _log) in enumerate(procs):
            if ends[k] is None and p.poll() is not None:
                ends[k] = time.perf_counter() - t0
        time.sleep(0.02)
    for p, log in procs:
        log.close()
        if p.returncode != 0:
            raise SystemExit(f"shard process failed: {log.name}:\n" + pathlib.Path(log.name).read_text()[-3000:])
    times = ends
    return {"seconds": max(times), "shard_seconds": times, "balance": max(times) / (sum(times) / len(times))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--walkers", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", choices=("cpu", "gpu", "auto"), default="gpu")
    ap.add_argument("--precision", choices=("double", "mixed"), default="mixed")
    ap.add_argument("--compress", type=float, default=None, metavar="MIN_NBOR_DIST")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from ase.build import bulk

    models = [str(pathlib.Path(m).resolve()) for m in args.models]
    rows, result = [], {"runs": []}
    for nw in args.walkers:
        base_rate = None
        for ngpu in args.gpus:
            folder = pathlib.Path(tempfile.mkdtemp(prefix=f"shards_{nw}_{ngpu}_"))
            bulk("Cu", "fcc", a=3.634, cubic=True).repeat(3).write(folder / "cu.extxyz", format="extxyz")
            spec = dict(structure="cu.extxyz", ensemble="npt", temperature=300.0, pressure=1.0, nsteps=args.steps)
            walkers = [dict(spec, name=f"w{k}", dt=0.001, trj_freq=10, seed=k + 1) for k in range(nw)]
            (folder / "walkers.json").write_text(json.dumps(walkers))
            r = run_shards(folder, models, ngpu, args)
            rate = nw * 108 * args.steps / r["seconds"]
            base_rate = base_rate or rate
            r.update(walkers=nw, gpus=ngpu, atom_steps_per_s=rate, speedup=rate / base_rate)
            result["runs"].append(r)
            rows.append(r)
            shutil.rmtree(folder, ignore_errors=True)
    dev = device_tag(gpu_name()) if args.device != "cpu" else "cpu"
    result.update(device=dev, steps=args.steps, precision=args.precision, compress=args.compress,
                  models=models, command="python " + " ".join(sys.argv))  # fmt: skip
    print("\n| walkers | GPUs | slowest shard, s | balance | atom-steps/s | speed-up |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['walkers']} | {r['gpus']} | {r['seconds']:.2f} | {r['balance']:.3f} | "
            f"{r['atom_steps_per_s']:.3g} | {r['speedup']:.2f}x |"
        )
    write_results(results_path(args.json, "shards_gpus", f"{dev}x{max(args.gpus)}"), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
