"""Does TorchInductor's on-disk cache spare a new process the ~70 s compilation of DPA-3's repflow layers?

Each case is a fresh process (as an explore job is) that loads a DPA-3 model through ``DeepmdProvider(...,
compile=True)`` with ``TORCHINDUCTOR_CACHE_DIR`` set, then times its first and second force calls on W
walkers x 108 fcc CuNi atoms. Models: untrained DPA-3 of DeePMD-kit's example size (bench_explore_deepmd.DPA3,
FP32), weights from seed 1 and seed 2. Cases, in order:

    cold        empty cache, model 1
    warm        the same cache, model 1 again (a later explore job on the same node / a shared folder)
    warm_other  the same cache, model 2 (other weights: a warm-up with an untrained model, then trained ones)
    eager       compile off (TorchScript), model 1: the call time without compilation

Prints one JSON line per case (seconds: import, load, first call, second call; Inductor's cache counters)
and writes them all to ``--out``/compile_cache_<device>.json.

    python3 bench/profiling/compile_cache.py --out /tmp/cc [--walkers 64] [--device gpu|cpu]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent / "src"))


def make_model(path: pathlib.Path, seed: int) -> None:
    """An untrained DPA-3 of DeePMD-kit's example size as a .dp file (weights from ``seed``)."""
    import deepmd
    from deepmd.dpmodel.model.model import get_model
    from deepmd.dpmodel.utils.serialization import save_dp_model
    from explore_models import DPA3

    mp = copy.deepcopy(DPA3)
    mp["type_map"] = ["Cu", "Ni"]
    mp["descriptor"]["seed"] = mp["fitting_net"]["seed"] = seed
    m = get_model(copy.deepcopy(mp))
    save_dp_model(
        str(path),
        {"model": m.serialize(), "model_def_script": mp, "software": "deepmd-kit", "version": deepmd.__version__},
    )


def child(args) -> dict:
    t0 = time.perf_counter()
    import numpy as np
    import torch
    from ase.build import bulk

    from dpsnake.md.deepmd_provider import DeepmdProvider

    xp = np
    if args.device == "gpu":
        import cupy as xp
    t_import = time.perf_counter() - t0
    a = bulk("Cu", "fcc", a=3.634, cubic=True).repeat((3, 3, 3))
    rng = np.random.default_rng(0)
    n, W = len(a), args.walkers
    types = np.zeros((W, n), int)
    for t in types:
        t[rng.permutation(n)[: n // 2]] = 1
    pos = np.concatenate([a.positions + rng.normal(0, 0.05, a.positions.shape) for _ in range(W)])
    batch = [xp.asarray(x) for x in (pos, types.reshape(-1), np.repeat(np.arange(W), n))]
    batch += [xp.asarray(np.stack([a.cell.array] * W)), xp.asarray(np.ones(W, bool))]
    t1 = time.perf_counter()
    prov = DeepmdProvider([args.child], xp, compile=args.compile)
    t_load = time.perf_counter() - t1
    times = []
    for _ in range(2):
        t = time.perf_counter()
        out = prov.evaluate(*batch)
        if args.device == "gpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    from torch._dynamo.utils import counters

    keep = ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass")
    ind = {k: int(v) for k, v in counters["inductor"].items() if k in keep}
    aot = {k: int(v) for k, v in counters["aot_autograd"].items() if "cache" in k}
    return {
        "import_s": round(t_import, 2),
        "load_s": round(t_load, 2),
        "first_call_s": round(times[0], 2),
        "second_call_s": round(times[1], 3),
        "compiled_models": prov.compiled,
        "inductor": ind,
        "aot_autograd": aot,
        "energy0": float(out["energy"][0, 0]),
        "torch": torch.__version__,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/compile_cache")
    ap.add_argument("--walkers", type=int, default=64)
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    m1, m2, cache = out / "dpa3_s1.dp", out / "dpa3_s2.dp", out / "inductor_cache"
    make_model(m1, 1)
    make_model(m2, 2)
    rows = []
    for case, model, comp in (("cold", m1, True), ("warm", m1, True), ("warm_other", m2, True), ("eager", m1, False)):
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache))
        cmd = [sys.executable, __file__, "--child", str(model), "--walkers", str(args.walkers), "--device", args.device]
        t = time.perf_counter()
        p = subprocess.run(cmd + (["--compile"] if comp else []), env=env, capture_output=True, text=True)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        row = {"case": case, "process_s": round(time.perf_counter() - t, 1)}
        row.update(json.loads(line[7:]) if line else {"error": (p.stderr or p.stdout)[-2000:]})
        rows.append(row)
        print(json.dumps(row), flush=True)
    dev = "cpu" if args.device == "cpu" else "gpu"
    (out / f"compile_cache_{dev}.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
