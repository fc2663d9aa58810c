"""Exploration over several GPUs of one host: walkers split, one process per GPU (bench_md.py each,
pinned with CUDA_VISIBLE_DEVICES), all started together. Strong scaling: the same W walkers on 1, 2,
... GPUs; rate = W x atoms x steps / the slowest process's timed loop.

    python bench/bench_scaling.py m0.dp m1.dp m2.dp m3.dp [--walkers 512] [--gpus 1 2] [--steps 100]
           [--compress 2.0] [--json out.json]

Prints a Markdown table and writes JSON (default bench/results/scaling_<device>x<max GPUs>.json).
Needs as many GPUs as the largest --gpus.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchutil import device_tag, results_path, write_results


def run_split(models, walkers, ngpu, steps, extra, tmp):
    """Start ngpu bench_md.py processes on walkers // ngpu walkers each; their JSON results."""
    procs = []
    for k in range(ngpu):
        out = tmp / f"g{ngpu}_{k}.json"
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(k), PYTHONUNBUFFERED="1")
        cmd = [
            sys.executable,
            str(HERE / "bench_md.py"),
            *models,
            "--walkers",
            str(walkers // ngpu),
            "--steps",
            str(steps),
            "--device",
            "gpu",
            "--json",
            str(out),
            *extra,
        ]
        procs.append((subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), out))
    res = []
    for p, out in procs:
        log, _ = p.communicate()
        if p.returncode:
            raise RuntimeError(f"bench_md.py failed:\n{log[-3000:]}")
        res.append(json.loads(out.read_text()))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--walkers", type=int, default=512)
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--compress", type=float, default=None)
    ap.add_argument("--precision", default="mixed")
    ap.add_argument("--json", default=None, help="results file (default bench/results/scaling_...)")
    a = ap.parse_args()
    extra = ["--precision", a.precision] + (["--compress", str(a.compress)] if a.compress else [])
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    rows = []
    for n in a.gpus:
        res = run_split(a.models, a.walkers, n, a.steps, extra, tmp)
        atoms = sum(r["atoms"] for r in res)
        row = {"gpus": n, "walkers": a.walkers, "atoms": atoms, "devices": [r["device"] for r in res]}
        for part in ("explore", "force"):
            slowest = max(r["seconds_per_step"][part] for r in res)
            row[f"{part}_atom_steps_per_s"] = atoms / slowest
            row[f"{part}_ms_per_step"] = 1e3 * slowest
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    print(
        f"\n{a.walkers} walkers x {rows[0]['atoms'] // a.walkers} atoms, {len(a.models)} models, {a.precision}"
        f"{', tabulated' if a.compress else ''}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
    )
    print("| GPUs | explore atom-steps/s | speed-up | efficiency | force-only atom-steps/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        sp = r["explore_atom_steps_per_s"] / base["explore_atom_steps_per_s"]
        r["speedup"], r["efficiency"] = sp, sp * base["gpus"] / r["gpus"]
        print(
            f"| {r['gpus']} | {r['explore_atom_steps_per_s']:.3e} | {sp:.2f}x | {100 * r['efficiency']:.0f}% "
            f"| {r['force_atom_steps_per_s']:.3e} |"
        )
    tag = f"{device_tag(rows[-1]['devices'][0].split('(CuPy, ')[-1])}x{rows[-1]['gpus']}"
    write_results(results_path(a.json, "scaling", tag), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
