"""DeePMD-kit inputs of the exploration benchmarks (the sizes of DeePMD-kit's own examples) and their
EMT-labelled fcc Cu data: ``bench_explore_deepmd.py data`` writes them; ``bench_engine_attn_ab.py`` and
``profiling/compile_cache.py`` build their models from the same dicts."""

from __future__ import annotations

import json
import pathlib

import numpy as np

A_CU = 3.634

# DeePMD-kit's examples, sizes kept; only type_map, seeds, steps and data paths changed
SE_ATTEN_V2 = {  # examples/water/se_atten/input_torch.json, type se_atten_v2 (its head_num dropped: se_atten_v2 has none)
    "descriptor": {
        "type": "se_atten_v2",
        "sel": 120,
        "rcut_smth": 0.5,
        "rcut": 6.0,
        "neuron": [25, 50, 100],
        "tebd_dim": 8,
        "axis_neuron": 16,
        "type_one_side": True,
        "attn": 128,
        "attn_layer": 2,
        "attn_dotr": True,
        "attn_mask": False,
        "activation_function": "tanh",
        "scaling_factor": 1.0,
        "normalize": True,
        "temperature": 1.0,
    },
    "fitting_net": {"neuron": [240, 240, 240], "resnet_dt": True},
}
DPA3 = {  # examples/water/dpa3/input_torch.json (float32 there)
    "descriptor": {
        "type": "dpa3",
        "repflow": {
            "n_dim": 128,
            "e_dim": 64,
            "a_dim": 32,
            "nlayers": 6,
            "e_rcut": 6.0,
            "e_rcut_smth": 5.3,
            "e_sel": 120,
            "a_rcut": 4.0,
            "a_rcut_smth": 3.5,
            "a_sel": 30,
            "axis_neuron": 4,
            "fix_stat_std": 0.3,
            "a_compress_rate": 1,
            "a_compress_e_rate": 2,
            "a_compress_use_split": True,
            "update_angle": True,
            "smooth_edge_update": True,
            "edge_init_use_dist": True,
            "use_exp_switch": True,
            "update_style": "res_residual",
            "update_residual": 0.1,
            "update_residual_init": "const",
        },
        "activation_function": "silut:10.0",
        "use_tebd_bias": False,
        "precision": "float32",
        "concat_output_tebd": False,
    },
    "fitting_net": {
        "neuron": [240, 240, 240],
        "resnet_dt": True,
        "precision": "float32",
        "activation_function": "silut:10.0",
    },
}
SE_ATTEN_V2_FP32 = json.loads(json.dumps(SE_ATTEN_V2))  # the same in float32
SE_ATTEN_V2_FP32["descriptor"]["precision"] = SE_ATTEN_V2_FP32["fitting_net"]["precision"] = "float32"
# the same without attention layers (se_atten_v2 is tebd_input_mode "strip" already): the
# configuration DeePMD-kit can compress (`dp --pt compress`), and our engine tabulate
SE_ATTEN_V2_L0 = json.loads(json.dumps(SE_ATTEN_V2))
SE_ATTEN_V2_L0["descriptor"]["attn_layer"] = 0
KINDS = {
    "se_atten_v2": SE_ATTEN_V2,
    "dpa3": DPA3,
    "se_atten_v2_fp32": SE_ATTEN_V2_FP32,
    "se_atten_v2_l0": SE_ATTEN_V2_L0,
}


def write_npy(folder: pathlib.Path, frames) -> None:
    """deepmd/npy set of ASE frames with EMT energies, forces and virials."""
    from ase.calculators.emt import EMT

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "type_map.raw").write_text("Cu\n")
    (folder / "type.raw").write_text("\n".join("0" for _ in range(len(frames[0]))) + "\n")
    c, b, e, f, v = [], [], [], [], []
    for at in frames:
        at.calc = EMT()
        e.append(at.get_potential_energy())
        f.append(at.get_forces().reshape(-1))
        v.append((-at.get_stress(voigt=False) * at.get_volume()).reshape(-1))
        c.append(at.positions.reshape(-1))
        b.append(np.asarray(at.cell).reshape(-1))
    s = folder / "set.000"
    s.mkdir(exist_ok=True)
    for name, arr in (("coord", c), ("box", b), ("energy", e), ("force", f), ("virial", v)):
        np.save(s / f"{name}.npy", np.asarray(arr, dtype=np.float64))


def cmd_data(args) -> int:
    from ase.build import bulk

    out = pathlib.Path(args.dir).resolve()
    rng = np.random.default_rng(7)
    base = bulk("Cu", "fcc", a=A_CU, cubic=True).repeat(3)
    frames = []
    for k in range(args.frames):
        at = base.copy()
        at.set_cell(at.cell * rng.uniform(0.97, 1.03), scale_atoms=True)
        at.positions += rng.normal(0.0, 0.03 + 0.1 * (k % 4) / 3, at.positions.shape)
        frames.append(at)
    ntr = max(1, int(0.9 * len(frames)))
    write_npy(out / "data" / "train", frames[:ntr])
    write_npy(out / "data" / "valid", frames[ntr:] or frames[-1:])
    for kind, model in KINDS.items():
        for s in range(args.seeds):
            m = json.loads(json.dumps(model))
            m["type_map"] = ["Cu"]
            m["descriptor"]["seed"] = m["fitting_net"]["seed"] = 100 + s
            inp = {
                "model": m,
                "learning_rate": {
                    "type": "exp",
                    "decay_steps": max(1, args.steps // 4),
                    "start_lr": 1e-3,
                    "stop_lr": 1e-4,
                },
                "loss": {
                    "type": "ener",
                    "start_pref_e": 0.2,
                    "limit_pref_e": 20,
                    "start_pref_f": 100,
                    "limit_pref_f": 60,
                    "start_pref_v": 0.02,
                    "limit_pref_v": 1,
                },
                "training": {
                    "training_data": {"systems": [str(out / "data" / "train")], "batch_size": 1},
                    "validation_data": {"systems": [str(out / "data" / "valid")], "batch_size": 1},
                    "numb_steps": args.steps,
                    "seed": 10 + s,
                    "disp_file": "lcurve.out",
                    "disp_freq": max(1, args.steps // 5),
                    "save_freq": min(100, args.steps),
                },
            }
            d = out / f"{kind}_s{s}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "input.json").write_text(json.dumps(inp, indent=1) + "\n")
    print(f"{len(frames)} EMT frames of {len(base)} atoms and inputs for {list(KINDS)} x {args.seeds} in {out}")
    return 0
