"""FP64 force calls with and without the fused embedding kernels (EngineSettings.fused "on" / "off" /
"auto": fused in chunks of at most fused_fp64_atoms centres)
over batch sizes: where the fused kernels' fewer launches beat cuBLAS (small, launch-bound batches) and
where their register-bound FP64 backward loses (large ones). One model (.dp), fcc Cu with 0.05 A noise,
batches of 32-atom cells. Prints a table, writes JSON.

    python3 bench/profiling/fused_crossover.py --model model.dp [--out F.json]
    python3 bench/profiling/fused_crossover.py --neuron 25 50 100 --rcut 6 --sel 96   # an untrained se_e2_a
                                                                                   # model of that size
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def untrained(neuron, rcut, sel) -> str:
    """An untrained one-type se_e2_a model (DeePMD-kit's initial weights) with embedding ``neuron``."""
    import deepmd
    from deepmd.dpmodel.model.model import get_model
    from deepmd.dpmodel.utils.serialization import save_dp_model

    params = {
        "type_map": ["Cu"],
        "descriptor": {
            "type": "se_e2_a",
            "rcut": rcut,
            "rcut_smth": 0.5,
            "sel": [sel],
            "neuron": neuron,
            "axis_neuron": 16,
            "seed": 1,
        },
        "fitting_net": {"neuron": [240, 240, 240], "resnet_dt": True, "seed": 1},
    }
    path = f"/tmp/untrained_{'_'.join(map(str, neuron))}.dp"
    save_dp_model(
        path, {"model": get_model(params).serialize(), "software": "deepmd-kit", "version": deepmd.__version__}
    )
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--neuron", type=int, nargs="+", default=None)
    ap.add_argument("--rcut", type=float, default=6.0)
    ap.add_argument("--sel", type=int, default=96)
    ap.add_argument("--cells", type=int, nargs="+", default=[1, 8, 32, 128, 512, 2048])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import cupy as cp
    from ase.build import bulk

    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.engine.settings import EngineSettings

    if a.model is None:
        a.model = untrained(a.neuron, a.rcut, a.sel)
    cell = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))  # 32 atoms
    rng = np.random.default_rng(0)
    ens = {
        m: Ensemble([a.model], precision="double", xp=cp, settings=EngineSettings(fused=m))
        for m in ("off", "on", "auto")
    }
    rows = []
    for s in a.cells:
        pos = np.concatenate([cell.positions + rng.normal(0, 0.05, cell.positions.shape) for _ in range(s)])
        args = (
            cp.asarray(pos),
            cp.zeros(len(pos), dtype=cp.int64),
            cp.repeat(cp.arange(s), 32),
            cp.asarray(np.tile(cell.cell[None], (s, 1, 1))),
            cp.ones((s, 3), dtype=bool),
        )
        row = {"atoms": 32 * s, "model": a.model}
        out = {}
        for m, e in ens.items():
            for _ in range(3):
                out[m] = e.evaluate(*args)
            cp.cuda.Device().synchronize()
            n = 20
            t = time.perf_counter()
            for _ in range(n):
                e.evaluate(*args)
            cp.cuda.Device().synchronize()
            row[f"ms_{m}"] = round(1e3 * (time.perf_counter() - t) / n, 3)
        row["max_dF"] = float(cp.abs(out["on"]["force"] - out["off"]["force"]).max())
        rows.append(row)
        print(
            f"{row['atoms']:8d} atoms: cuBLAS {row['ms_off']:8.3f} ms, fused {row['ms_on']:8.3f} ms "
            f"({row['ms_off'] / row['ms_on']:.2f}x), auto {row['ms_auto']:8.3f} ms, max |dF| {row['max_dF']:.1e}",
            flush=True,
        )
    if a.out:
        json.dump(rows, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
