"""Walker specifications (``walkers.json``), structure reading and the Maxwell-Boltzmann start.

A walker is one MD run of the exploration: a structure, an ensemble, a temperature (K), a pressure
(bar, NPT only), ``nsteps`` steps of ``dt`` ps, a frame and a deviation every ``trj_freq`` steps, a seed.
The thermostat and barostat targets may follow a schedule (``temperature_ramp``, ``pressure_ramp``:
dpsnake.md.ramps); then ``temperature`` / ``pressure`` are the schedule's values at step 0.
All validation happens here, before any work starts, with one line naming the walker and the key.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from dataclasses import dataclass

import numpy as np

from dpsnake.errors import UserError

ENSEMBLES = ("nve", "nvt", "nvt-langevin", "npt", "npt-aniso", "npt-tri", "relax")
THERMOSTATS = ("nhc", "bussi", "langevin")
# what each ensemble uses unless the walker names a thermostat
DEFAULT_THERMOSTAT = {
    "nve": None,
    "nvt": "nhc",
    "nvt-langevin": "langevin",
    "npt": "bussi",
    "npt-aniso": "bussi",
    "npt-tri": "bussi",
    "relax": None,
}
BAROSTAT = {"npt": "iso", "npt-aniso": "aniso", "npt-tri": "tri"}

_REQUIRED = ("name", "structure", "ensemble", "nsteps", "dt", "trj_freq", "seed")
_KNOWN = set(_REQUIRED) | {
    "system",
    "temperature",
    "pressure",
    "tau_t",
    "tau_p",
    "max_devi_f_cap",
    "min_dist",
    "thermostat",
    "compressibility",
    "max_devi_f_patience",
    "format",
    "temperature_ramp",
    "pressure_ramp",
    "recipe",
    "fmax",
    "relax_cell",
    "maxstep",
    "bias",
}
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclass
class Walker:
    """One validated walker; see docs/md.md for every key. Units: K, bar, ps, eV/A, A, 1/bar."""

    name: str
    structure: str
    ensemble: str
    nsteps: int
    dt: float
    trj_freq: int
    seed: int
    system: str = ""
    temperature: float = 0.0
    pressure: float = 0.0
    tau_t: float = 0.1
    tau_p: float = 0.5
    max_devi_f_cap: float | None = None
    max_devi_f_patience: int = 3
    min_dist: float | None = None
    thermostat: str | None = None
    compressibility: float = 1e-5
    format: str | None = None
    temperature_ramp: dict | None = None
    pressure_ramp: dict | None = None
    recipe: str | None = None  # how the start structure was generated (dpsnake.workflow.generators.recipe)
    # ensemble relax (dpsnake.md.relax): FIRE until every force is below fmax (eV/A); relax_cell: the
    # cell too, at ``pressure`` (UnitCellFilter); maxstep: FIRE's largest move (A)
    fmax: float = 0.05
    relax_cell: bool = False
    maxstep: float = 0.2
    bias: dict | None = None  # a bias on one collective variable (dpsnake.md.bias), normalized

    @property
    def barostat(self) -> str | None:
        return BAROSTAT.get(self.ensemble)


def _num(w: dict, key: str, where: str, kind=float, positive=False, default=None):
    if key not in w or w[key] is None:
        return default
    v = w[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and int(v) != v):
        raise UserError(f"{where}: key '{key}' must be a{'n integer' if kind is int else ' number'}, got {v!r}")
    if not math.isfinite(v) or (positive and v <= 0) or v < 0 and key != "pressure":
        raise UserError(f"{where}: key '{key}' must be {'positive' if positive else 'non-negative'}, got {v!r}")
    return kind(v)


def _ramp(w: dict, key: str, where: str, nsteps: int, allowed: bool, needs: str) -> dict | None:
    """A walker's schedule (dpsnake.md.ramps) in its normalized form, None if absent."""
    from dpsnake.md import ramps

    if w.get(key) is None:
        return None
    if not allowed:
        raise UserError(f"{where}: key '{key}' needs {needs}, the ensemble is {w['ensemble']}")
    return ramps.normalize(w[key], nsteps, f"{where}: {key}", positive=key == "temperature_ramp")


def _bias(spec, nsteps: int, where: str, ens: str) -> dict:
    from dpsnake.md import bias

    out = bias.normalize(spec, nsteps, f"{where}: bias")
    if bias.needs_npt(out) and not ens.startswith("npt"):
        raise UserError(f"{where}: bias.cv.type: volume needs a barostat (npt*), the ensemble is {ens}")
    return out


def _start(ramp: dict | None, value: float | None, key: str, where: str, default: float) -> float:
    """The walker's temperature / pressure: the schedule's value at step 0 (a given value must match)."""
    if ramp is None:
        return default if value is None else float(value)
    first = ramp["knots"][0][1]
    if value is not None and value != first:
        raise UserError(f"{where}: key '{key}' {value:g} differs from {key}_ramp's value at step 0 ({first:g})")
    return first


def parse_walkers(data, base: pathlib.Path | None = None) -> list[Walker]:
    """Validate a list of walker dicts; relative structure paths are resolved against ``base``."""
    if isinstance(data, dict) and "walkers" in data:
        data = data["walkers"]
    if not isinstance(data, list) or not data:
        raise UserError("walkers.json: must be a non-empty list of walker objects")
    out, names = [], set()
    for i, w in enumerate(data):
        where = f"walkers.json: walker {i}"
        if not isinstance(w, dict):
            raise UserError(f"{where}: must be an object, got {type(w).__name__}")
        if isinstance(w.get("name"), str):
            where = f"walkers.json: walker '{w['name']}'"
        for k in _REQUIRED:
            if k not in w and not (k == "dt" and w.get("ensemble") == "relax"):  # FIRE has its own steps
                raise UserError(f"{where}: missing key '{k}'")
        unknown = sorted(set(w) - _KNOWN)
        if unknown:
            raise UserError(f"{where}: unknown key '{unknown[0]}'")
        name = w["name"]
        if not isinstance(name, str) or not _NAME.match(name):
            raise UserError(f"{where}: key 'name' must be a folder-safe string, got {name!r}")
        if name in names:
            raise UserError(f"{where}: duplicate name '{name}'")
        names.add(name)
        ens = w["ensemble"]
        if ens not in ENSEMBLES:
            raise UserError(f"{where}: key 'ensemble' must be one of {', '.join(ENSEMBLES)}, got {ens!r}")
        thermo = w.get("thermostat", DEFAULT_THERMOSTAT[ens])
        if ens == "nve" and thermo is not None:
            raise UserError(f"{where}: key 'thermostat' is not allowed with ensemble nve")
        if ens == "nvt-langevin" and thermo != "langevin":
            raise UserError(f"{where}: ensemble nvt-langevin uses the langevin thermostat, got {thermo!r}")
        if thermo is not None and thermo not in THERMOSTATS:
            raise UserError(f"{where}: key 'thermostat' must be one of {', '.join(THERMOSTATS)}, got {thermo!r}")
        nsteps = _num(w, "nsteps", where, int)
        relax = _relax_keys(w, where)
        t_ramp = _ramp(w, "temperature_ramp", where, nsteps, ens not in ("nve", "relax"), "a thermostat (not nve)")
        p_ramp = _ramp(w, "pressure_ramp", where, nsteps, ens.startswith("npt"), "a barostat (npt*)")
        if ens not in ("nve", "relax") and "temperature" not in w and not t_ramp:
            raise UserError(f"{where}: key 'temperature' is required for ensemble {ens}")
        if ens.startswith("npt") and "pressure" not in w and not p_ramp:
            raise UserError(f"{where}: key 'pressure' is required for ensemble {ens}")
        temp = _num(w, "temperature", where, default=None)
        temp = _start(t_ramp, temp, "temperature", where, 0.0)
        pres = _start(p_ramp, _num(w, "pressure", where, default=None), "pressure", where, 0.0)
        if ens not in ("nve", "relax") and temp <= 0:
            raise UserError(f"{where}: key 'temperature' must be positive for ensemble {ens}, got {temp!r}")
        structure = pathlib.Path(str(w["structure"]))
        if base is not None and not structure.is_absolute():
            structure = base / structure
        if not structure.is_file():
            raise UserError(f"{where}: key 'structure': file not found: {structure}")
        out.append(
            Walker(
                name=name,
                structure=str(structure),
                ensemble=ens,
                nsteps=nsteps,
                dt=_num(w, "dt", where, positive=True, default=0.001),
                trj_freq=_num(w, "trj_freq", where, int, positive=True),
                seed=_num(w, "seed", where, int),
                system=str(w.get("system") or name),
                temperature=temp,
                pressure=pres,
                tau_t=_num(w, "tau_t", where, positive=True, default=0.1),
                tau_p=_num(w, "tau_p", where, positive=True, default=0.5),
                max_devi_f_cap=_num(w, "max_devi_f_cap", where, positive=True),
                max_devi_f_patience=_num(w, "max_devi_f_patience", where, int, positive=True, default=3),
                min_dist=_num(w, "min_dist", where, positive=True),
                thermostat=thermo,
                compressibility=_num(w, "compressibility", where, positive=True, default=1e-5),
                format=w.get("format"),
                temperature_ramp=t_ramp,
                pressure_ramp=p_ramp,
                recipe=None if w.get("recipe") is None else str(w["recipe"]),
                **relax,
                bias=None if w.get("bias") is None else _bias(w["bias"], nsteps, where, ens),
            )
        )
    return out


def _relax_keys(w: dict, where: str) -> dict:
    """fmax, relax_cell, maxstep of a relax walker (refused on MD walkers); temperature 0 (no
    thermostat, no start velocities)."""
    ens = w["ensemble"]
    given = [k for k in ("fmax", "relax_cell", "maxstep") if k in w]
    if ens != "relax":
        if given:
            raise UserError(f"{where}: key '{given[0]}' needs ensemble relax, the ensemble is {ens}")
        return {}
    if w.get("temperature"):
        raise UserError(f"{where}: key 'temperature' is not allowed with ensemble relax (FIRE has no temperature)")
    if w.get("thermostat") is not None:
        raise UserError(f"{where}: key 'thermostat' is not allowed with ensemble relax")
    cell = w.get("relax_cell", False)
    if not isinstance(cell, bool):
        raise UserError(f"{where}: key 'relax_cell' must be true or false, got {cell!r}")
    if w.get("pressure") and not cell:
        raise UserError(f"{where}: key 'pressure' needs relax_cell: true with ensemble relax")
    return {
        "fmax": _num(w, "fmax", where, positive=True, default=0.05),
        "relax_cell": cell,
        "maxstep": _num(w, "maxstep", where, positive=True, default=0.2),
    }


def load_walkers(path) -> list[Walker]:
    """Read and validate ``walkers.json``."""
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--walkers: file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    return parse_walkers(data, base=path.parent if path.parent != pathlib.Path("") else None)


def _guess_format(path: str) -> str | None:
    low = path.lower()
    if low.endswith((".data", ".lmp", ".lammps")) or pathlib.Path(low).name.startswith("data."):
        return "lammps-data"
    return None


def read_structure(walker: Walker, type_map: list[str]):
    """The walker's structure as ``ase.Atoms`` (last frame of the file) with its model type indices.

    Returns (atoms, atype (n,) int). Any file ASE reads; LAMMPS data files (``*.data``, ``*.lmp``)
    are read with ``atom_style atomic`` and types mapped in order of the model's type_map.
    Periodicity per direction as the file says (slabs T T F, wires F F T: the cell vectors along
    non-periodic directions play no part); NPT needs all three directions periodic.
    """
    import ase.io

    fmt = walker.format or _guess_format(walker.structure)
    where = f"walker '{walker.name}': structure {walker.structure}"
    try:
        if fmt == "lammps-data":
            from ase.data import atomic_numbers

            atoms = ase.io.read(
                walker.structure,
                format=fmt,
                atom_style="atomic",
                Z_of_type={i + 1: atomic_numbers[s] for i, s in enumerate(type_map)},
            )
        else:
            atoms = ase.io.read(walker.structure, format=fmt)
    except Exception as err:  # ASE raises many kinds; say which file
        raise UserError(f"{where}: ASE cannot read it ({type(err).__name__}: {err})") from None
    if len(atoms) == 0:
        raise UserError(f"{where}: has no atoms")
    missing = sorted(set(atoms.get_chemical_symbols()) - set(type_map))
    if missing:
        raise UserError(f"{where}: element {missing[0]} is not in the model's type_map {type_map}")
    pbc = [bool(p) for p in atoms.pbc]
    if all(pbc) and abs(np.linalg.det(atoms.cell.array)) < 1e-6:
        raise UserError(f"{where}: periodic but the cell has zero volume")
    if any(pbc) and not all(pbc):  # slab, wire: only the periodic cell vectors matter
        from dpsnake.engine.neighbor import effective_cells

        h = effective_cells(np, atoms.cell.array[None], np.array([pbc]))[0]
        if not abs(np.linalg.det(h)) > 1e-6:
            raise UserError(f"{where}: pbc {pbc}: the cell vectors along the periodic directions are degenerate")
    if not any(pbc) and walker.barostat:
        raise UserError(f"{where}: ensemble {walker.ensemble} needs a periodic cell")
    if not all(pbc) and walker.barostat:  # the barostat scales all three directions with the volume
        raise UserError(
            f"{where}: ensemble {walker.ensemble} needs a cell periodic in all directions, pbc is {pbc} "
            "(a slab or wire); use nvt for it"
        )
    if walker.relax_cell and not all(pbc):
        raise UserError(f"{where}: relax_cell needs a cell periodic in all directions, pbc is {pbc}")
    index = {s: i for i, s in enumerate(type_map)}
    atype = np.array([index[s] for s in atoms.get_chemical_symbols()], dtype=np.int64)
    return atoms, atype


def masses_for(atype: np.ndarray, type_map: list[str]) -> np.ndarray:
    """Masses (amu) of atoms by model type index, from ASE's table of standard atomic weights."""
    from ase.data import atomic_masses, atomic_numbers

    return np.array([atomic_masses[atomic_numbers[s]] for s in type_map])[atype]


def read_structures(walkers: list[Walker], type_map: list[str]) -> list[tuple]:
    """(atoms, atype, masses) of each walker's start structure (read_structure + masses_for)."""
    out = []
    for w in walkers:
        atoms, atype = read_structure(w, type_map)
        out.append((atoms, atype, masses_for(atype, type_map)))
    return out


def degrees_of_freedom(n: int, walker: Walker) -> int:
    """Kinetic degrees of freedom: the total momentum is zero and conserved except under Langevin."""
    if walker.thermostat == "langevin" or n == 1:
        return 3 * n
    return 3 * n - 3


def maxwell_boltzmann(masses: np.ndarray, temperature: float, seed: int, nf: int) -> np.ndarray:
    """Initial velocities (n, 3) in ASE units (A per ASE time unit) at exactly ``temperature`` K.

    Gaussian velocities (ASE's thermalize_momenta, seeded), total momentum removed, then
    rescaled so the kinetic energy is nf/2 kB T, as LAMMPS' ``velocity create`` does.
    """
    from ase import Atoms, units
    from ase.md.velocitydistribution import Stationary, thermalize_momenta

    n = len(masses)
    if temperature <= 0:
        return np.zeros((n, 3))
    atoms = Atoms(f"H{n}", masses=masses)
    thermalize_momenta(atoms, temperature_K=temperature, rng=np.random.default_rng(seed))
    if nf < 3 * n:
        Stationary(atoms)
    v = atoms.get_velocities()
    ke = 0.5 * float(np.sum(masses[:, None] * v * v))
    if ke > 0:
        v *= math.sqrt(0.5 * nf * units.kB * temperature / ke)
    return v
