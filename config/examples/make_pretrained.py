"""Make the "pretrained" model that config/examples/finetune-se_atten_v2.yaml fine-tunes.

There is no internet here, so instead of a model from a hub this trains a small se_atten_v2 model
(DeePMD-kit, PyTorch backend, CPU) on *other* data than the example explores: ASE's EMT on fcc Al,
Ni3Al (L1_2), a random Cu-Al alloy and Ni, with type_map [Al, Cu, Ni] (the example's [Cu, Ni] is a
subset in another order: DeePMD-kit maps the types when fine-tuning). Writes OUT/model.pt (the training
checkpoint `dp --pt train --finetune` starts from), OUT/frozen_model.pth, OUT/input.json, OUT/lcurve.out.

    python config/examples/make_pretrained.py --out pretrained [--steps 300]

Then `snakemake --profile profiles/local --configfile config/examples/finetune-se_atten_v2.yaml`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np

TYPE_MAP = ["Al", "Cu", "Ni"]
INPUT = {
    "model": {
        "type_map": TYPE_MAP,
        "descriptor": {
            "type": "se_atten_v2",
            "rcut": 4.5,
            "rcut_smth": 1.0,
            "sel": 60,
            "neuron": [8, 16],
            "axis_neuron": 4,
            "attn": 16,
            "attn_layer": 1,
            "attn_dotr": True,
            "seed": 11,
        },
        "fitting_net": {"neuron": [24, 24], "resnet_dt": True, "seed": 12},
    },
    "learning_rate": {"type": "exp", "start_lr": 0.003, "stop_lr": 0.0001, "decay_steps": 50},
    "loss": {
        "type": "ener",
        "start_pref_e": 0.02,
        "limit_pref_e": 1,
        "start_pref_f": 1000,
        "limit_pref_f": 1,
        "start_pref_v": 0.02,
        "limit_pref_v": 1,
    },
    "training": {
        "training_data": {"systems": [], "batch_size": 1},
        "numb_steps": 300,
        "seed": 13,
        "disp_freq": 50,
        "save_freq": 300,
        "disp_file": "lcurve.out",
        "save_ckpt": "model.ckpt",
    },
}


def structures(rng) -> dict:
    """Start cells of the pretraining systems (32-atom fcc supercells)."""
    from ase.build import bulk

    def fcc(el, a):
        return bulk(el, "fcc", a=a, cubic=True).repeat((2, 2, 2))

    al, ni = fcc("Al", 4.05), fcc("Ni", 3.52)
    ni3al = fcc("Ni", 3.57)
    ni3al.symbols[[i for i, p in enumerate(ni3al.get_scaled_positions()) if np.allclose((p * 4) % 2, 0)]] = "Al"
    cual = fcc("Cu", 3.70)
    cual.symbols[rng.permutation(len(cual))[:8]] = "Al"
    return {"Al": al, "Ni3Al": ni3al, "CuAl": cual, "Ni": ni}


def make_data(out: pathlib.Path, frames: int, seed: int) -> list[str]:
    """EMT-labelled, strained and rattled copies of each structure as deepmd/npy; returns the folders."""
    import dpdata
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    dirs = []
    for name, atoms in structures(rng).items():
        ms = None
        for _ in range(frames):
            a = atoms.copy()
            a.set_cell(a.cell.array @ (np.eye(3) + 0.02 * rng.uniform(-1, 1, (3, 3))), scale_atoms=True)
            a.rattle(0.08, seed=int(rng.integers(1 << 30)))
            a.calc = EMT()
            a.get_potential_energy()
            s = dpdata.LabeledSystem(a, fmt="ase/structure")
            ms = s if ms is None else ms + s
        ms.apply_type_map(TYPE_MAP)
        ms.to_deepmd_npy(str(out / name), set_size=frames)
        dirs.append(str((out / name).resolve()))
    return dirs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="pretrained", help="output folder (default: pretrained)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--frames", type=int, default=6, help="frames per pretraining system (default 6)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    out = pathlib.Path(args.out)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    inp = json.loads(json.dumps(INPUT))
    inp["training"]["training_data"]["systems"] = make_data(work / "data", args.frames, seed=2026)
    inp["training"].update(numb_steps=args.steps, save_freq=args.steps, disp_freq=max(1, args.steps // 6))
    (work / "input.json").write_text(json.dumps(inp, indent=1))
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        DP_INTRA_OP_PARALLELISM_THREADS=str(args.threads),
        DP_INTER_OP_PARALLELISM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
    )
    dp = [sys.executable, "-m", "deepmd", "--pt"]
    for cmd in (dp + ["train", "input.json", "--skip-neighbor-stat"], dp + ["freeze", "-o", "frozen_model.pth"]):
        print("+ " + " ".join(cmd), flush=True)
        r = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode:
            sys.exit(f"make_pretrained: {' '.join(cmd)} failed in {work}:\n{r.stdout[-3000:]}")
    # the checkpoint itself (model.ckpt.pt is a symlink to model.ckpt-<steps>.pt), under a stable name
    shutil.copy((work / "model.ckpt.pt").resolve(), out / "model.pt")
    for name in ("frozen_model.pth", "input.json", "lcurve.out"):
        shutil.copy(work / name, out / name)
    print(f"make_pretrained: wrote {out / 'model.pt'} (se_atten_v2, type_map {TYPE_MAP}, {args.steps} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
