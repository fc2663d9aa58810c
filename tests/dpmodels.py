"""Tiny DeePMD-kit models trained for real (TensorFlow backend, CPU) on EMT-labelled data, for tests.

`train_model` caches by the hash of the training input, so one pytest session trains each variant once;
set DPSNAKE_TEST_CACHE to a folder to keep them between sessions while developing.

The `dp train` / `dp freeze` / `dp convert-backend` steps run in one helper process per backend that
lives for the session (`_Trainer`): it imports DeePMD-kit once (20-40 s of imports on a CI core, which
three `dp` processes per model used to pay three times) and forks a child per model that runs the
three commands through DeePMD-kit's own command-line entry point (``deepmd.main.main``), exactly as
`python -m deepmd ...` would, so each model is still trained by DeePMD-kit in a fresh process state.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

# type_map of each emt_dataset kind
PT_TYPE_MAPS = {"Cu": ["Cu"], "CuNi": ["Cu", "Ni"], "CuNiAl": ["Cu", "Ni", "Al"]}

# overrides of the default test model: a second member of an ensemble (other seeds)
SEED2 = {"model": {"descriptor": {"seed": 2}, "fitting_net": {"seed": 2}}, "training": {"seed": 2}}


def emt_dataset(outdir: pathlib.Path, kind: str = "Cu", nframes: int = 6, seed: int = 0) -> pathlib.Path:
    """Rattled fcc cells labelled with ASE's EMT, written as deepmd/npy. kind: 'Cu', 'CuNi' or 'CuNiAl'."""
    import dpdata
    from ase.build import bulk
    from ase.calculators.emt import EMT

    out = pathlib.Path(outdir) / f"data_{kind}"
    if (out / "type.raw").exists():
        return out
    rng = np.random.default_rng(seed)
    ms = None
    for _k in range(nframes):
        a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
        if kind == "CuNi":
            a.symbols[rng.permutation(len(a))[: len(a) // 2]] = "Ni"
        elif kind == "CuNiAl":  # a third each (about)
            perm = rng.permutation(len(a))
            a.symbols[perm[: len(a) // 3]] = "Ni"
            a.symbols[perm[len(a) // 3 : 2 * len(a) // 3]] = "Al"
        a.set_cell(a.cell.array * (1 + 0.03 * rng.uniform(-1, 1)), scale_atoms=True)
        a.rattle(0.08, seed=int(rng.integers(1 << 30)))
        a.calc = EMT()
        a.get_potential_energy()
        s = dpdata.LabeledSystem(a, fmt="ase/structure")
        ms = s if ms is None else ms + s
    type_map = PT_TYPE_MAPS[kind]
    ms.apply_type_map(type_map) if hasattr(ms, "apply_type_map") else None
    ms.to_deepmd_npy(str(out), type_map=type_map)
    return out


BASE_INPUT = {
    "model": {
        "type_map": ["Cu"],
        "descriptor": {
            "type": "se_e2_a",
            "rcut": 4.5,
            "rcut_smth": 1.0,
            "sel": [40],
            "neuron": [4, 8],
            "axis_neuron": 4,
            "seed": 1,
        },
        "fitting_net": {"neuron": [8, 8], "resnet_dt": True, "seed": 1},
    },
    "learning_rate": {"type": "exp", "start_lr": 1e-3, "stop_lr": 1e-4, "decay_steps": 10},
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
        "numb_steps": 20,
        "seed": 1,
        "disp_freq": 10,
        "save_freq": 20,
    },
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def train_model(cache: pathlib.Path, overrides: dict | None = None, data: str = "Cu") -> dict:
    """Train, freeze and convert one model; returns {"pb": path, "dp": path, "input": dict}.

    overrides: nested dict merged into BASE_INPUT (e.g. {"model": {"descriptor": {"precision": "float32"}}}).
    data: 'Cu' or 'CuNi' (the type_map is set to match).
    """
    cache = pathlib.Path(cache)
    inp = _merge(BASE_INPUT, overrides or {})
    if data == "CuNi":
        inp["model"]["type_map"] = ["Cu", "Ni"]
        d = inp["model"]["descriptor"]
        if len(d["sel"]) == 1:
            d["sel"] = [d["sel"][0] // 2 + 4, d["sel"][0] // 2 + 4]
    key = hashlib.sha1(json.dumps([inp, data], sort_keys=True).encode()).hexdigest()[:12]
    work = cache / f"model_{key}"
    result = {"pb": work / "frozen_model.pb", "dp": work / "model.dp", "input": inp, "dir": work}
    if result["dp"].exists():
        return result
    work.mkdir(parents=True, exist_ok=True)
    datadir = emt_dataset(cache, data)
    inp["training"]["training_data"]["systems"] = [str(datadir)]
    (work / "input.json").write_text(json.dumps(inp, indent=1))
    env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="3",
        DP_INTER_OP_PARALLELISM_THREADS="1",
        DP_INTRA_OP_PARALLELISM_THREADS="2",
        OMP_NUM_THREADS="2",
    )
    _train_freeze_convert(work, "tf", "frozen_model.pb", env)
    return result


def _train_freeze_convert(work: pathlib.Path, backend: str, frozen: str, env: dict) -> None:
    """`dp train input.json` -> `dp freeze` -> `dp convert-backend` to model.dp in ``work``."""
    cmds = [
        [f"--{backend}", "train", "input.json", "--skip-neighbor-stat"],
        [f"--{backend}", "freeze", "-o", frozen],
        ["convert-backend", frozen, "model.dp"],
    ]
    _Trainer.get(backend, env).run(work, cmds)


class _Trainer:
    """A helper process (``python dpmodels.py --serve BACKEND``, environment ``env`` of the first
    request) that has imported DeePMD-kit; each request forks a child that runs `dp` commands in a
    folder, its output in ``dp.log`` there. One per backend and pytest process; ends with it."""

    _all: dict = {}
    _lock = threading.Lock()

    @classmethod
    def get(cls, backend: str, env: dict) -> _Trainer:
        with cls._lock:
            t = cls._all.get(backend)
            if t is None or t.proc.poll() is not None:
                t = cls._all[backend] = cls(backend, env)
            return t

    def __init__(self, backend: str, env: dict):
        self.err = tempfile.TemporaryFile()  # the helper's own stderr (its imports' warnings, a crash)
        self.proc = subprocess.Popen(
            [sys.executable, str(pathlib.Path(__file__).resolve()), "--serve", backend],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            env=env,
            text=True,
        )
        atexit.register(self.close)

    def run(self, work: pathlib.Path, cmds: list) -> None:
        with self._lock:
            self.proc.stdin.write(json.dumps({"dir": str(work), "cmds": cmds}) + "\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
        log = work / "dp.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        if not reply:
            self.err.seek(0)
            own = self.err.read().decode(errors="replace")
            raise RuntimeError(
                f"the DeePMD-kit helper process died (exit {self.proc.wait()}):\n{own[-4000:]}\n{text[-4000:]}"
            )
        reply = json.loads(reply)
        if reply["timeout"]:
            raise RuntimeError(f"dp commands {cmds} killed after {_CHILD_TIMEOUT:.0f} s in {work}:\n{text[-6000:]}")
        if reply["failed"] is not None:
            raise RuntimeError(f"dp {' '.join(cmds[reply['failed']])} failed in {work}:\n{text[-6000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_CHILD_TIMEOUT = 1200.0  # s, one model's train + freeze + convert-backend in the helper


def _serve(backend: str) -> None:
    """The helper process: import DeePMD-kit (the backend's training entry point too), then one
    forked child per request line {"dir", "cmds"}; reply {"failed": index of the failed command or None,
    "timeout": killed after _CHILD_TIMEOUT}."""
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the imports print goes to stderr, not into the replies
    import deepmd.entrypoints.main  # noqa: F401 (convert-backend)
    import deepmd.main

    if backend == "pt":
        import deepmd.pt.entrypoints.main  # noqa: F401
    else:
        import deepmd.tf.entrypoints.main  # noqa: F401
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:  # child: run the commands as `python -m deepmd CMD` would, output to dp.log
            step, failed = 0, True
            try:
                os.chdir(req["dir"])
                fd = os.open("dp.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                for cmd in req["cmds"]:
                    print("$ dp", " ".join(cmd), flush=True)
                    deepmd.main.main(cmd)
                    sys.stdout.flush()
                    sys.stderr.flush()
                    step += 1
                failed = False
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(10 + step if failed else 0)
        code, deadline = None, time.monotonic() + _CHILD_TIMEOUT
        while code is None:  # a child stuck (a lock held at fork time, say) fails, not hangs the tests
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
            elif time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                code = -1
            else:
                time.sleep(0.05)
        failed = None if code == 0 else min(max(0, code - 10), len(req["cmds"]) - 1)
        reply.write(json.dumps({"failed": failed, "timeout": code == -1}) + "\n")
        reply.flush()


# Descriptors of DeePMD-kit's PyTorch backend, small enough to train in seconds on a CPU (CuNi data:
# type_map [Cu, Ni]); the keys are what tests ask train_pt_model for.
PT_DESCRIPTORS = {
    "se_e2_a": {
        "type": "se_e2_a",
        "rcut": 4.5,
        "rcut_smth": 1.0,
        "sel": [24, 24],
        "neuron": [4, 8],
        "axis_neuron": 4,
        "seed": 1,
    },
    "se_atten_v2": {
        "type": "se_atten_v2",
        "rcut": 4.5,
        "rcut_smth": 1.0,
        "sel": 48,
        "neuron": [4, 8],
        "axis_neuron": 4,
        "attn": 8,
        "attn_layer": 1,
        "attn_dotr": True,
        "seed": 1,
    },
    "dpa2": {
        "type": "dpa2",
        "repinit": {
            "rcut": 4.5,
            "rcut_smth": 1.0,
            "nsel": 48,
            "neuron": [4, 8],
            "axis_neuron": 4,
            "activation_function": "tanh",
        },
        "repformer": {
            "rcut": 3.5,
            "rcut_smth": 1.0,
            "nsel": 24,
            "nlayers": 2,
            "g1_dim": 8,
            "g2_dim": 4,
            "attn2_hidden": 4,
            "attn2_nhead": 1,
            "attn1_hidden": 4,
            "attn1_nhead": 1,
            "axis_neuron": 4,
            "update_h2": False,
            "update_g1_has_conv": True,
            "update_g1_has_grrg": True,
            "update_g1_has_drrd": True,
            "update_g1_has_attn": True,
            "update_g2_has_g1g1": True,
            "update_g2_has_attn": True,
            "attn2_has_gate": True,
        },
        "seed": 1,
        "add_tebd_to_repinit_out": False,
    },
    "dpa3": {
        "type": "dpa3",
        "repflow": {
            "n_dim": 8,
            "e_dim": 4,
            "a_dim": 4,
            "nlayers": 2,
            "e_rcut": 4.5,
            "e_rcut_smth": 1.0,
            "e_sel": 48,
            "a_rcut": 3.5,
            "a_rcut_smth": 1.0,
            "a_sel": 24,
            "axis_neuron": 4,
            "update_angle": True,
            "smooth_edge_update": True,
        },
        "seed": 1,
    },
}


def train_pt_model(
    cache: pathlib.Path,
    descriptor: str = "se_atten_v2",
    seed: int = 1,
    steps: int = 10,
    overrides: dict | None = None,
    data: str = "CuNi",
) -> dict:
    """Train (DeePMD-kit PyTorch backend, CPU) and freeze one model with a descriptor of
    PT_DESCRIPTORS on emt_dataset ``data`` (CuNi; also Cu, CuNiAl: the type_map follows);
    returns {"pth": frozen model, "dp": model.dp, "input": dict, "dir": folder}.
    Cached by the hash of the input like train_model."""
    cache = pathlib.Path(cache)
    inp = copy.deepcopy(BASE_INPUT)
    inp["model"]["type_map"] = list(PT_TYPE_MAPS[data])
    inp["model"]["descriptor"] = copy.deepcopy(PT_DESCRIPTORS[descriptor])
    inp["model"]["descriptor"]["seed"] = seed
    inp["model"]["fitting_net"]["seed"] = seed
    inp["training"].update(numb_steps=steps, seed=seed, save_freq=steps, disp_freq=steps)
    inp = _merge(inp, overrides or {})
    key = hashlib.sha1(json.dumps(["pt", inp], sort_keys=True).encode()).hexdigest()[:12]
    work = cache / f"ptmodel_{key}"
    result = {"pth": work / "frozen_model.pth", "dp": work / "model.dp", "input": inp, "dir": work}
    if result["dp"].exists():
        return result
    work.mkdir(parents=True, exist_ok=True)
    datadir = emt_dataset(cache, data)
    inp["training"]["training_data"]["systems"] = [str(datadir)]
    (work / "input.json").write_text(json.dumps(inp, indent=1))
    env = dict(
        os.environ,
        OMP_NUM_THREADS="2",
        DP_INTRA_OP_PARALLELISM_THREADS="2",
        DP_INTER_OP_PARALLELISM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
    )
    _train_freeze_convert(work, "pt", "frozen_model.pth", env)
    return result


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _serve(sys.argv[2])
