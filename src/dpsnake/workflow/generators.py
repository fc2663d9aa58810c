"""Start-structure generators: the ``transform`` steps of a system's ``structure``, applied in order.

After the file or builder (and ``repeat`` / ``substitute``), each step of ``transform`` takes the
structure so far and returns a new one (ASE does the work; units A):

- ``supercell: [nx, ny, nz]`` (``Atoms.repeat``) or a 3x3 integer matrix P (``ase.build.make_supercell``:
  new cell = P x cell);
- ``surface: {miller: [h, k, l], layers: 4, vacuum: 8.0, periodic: true}``: a slab of a periodic bulk
  (``ase.build.surface``); ``vacuum`` A on each side, so 2 x vacuum between the slab and its periodic
  image along the normal; pbc True in all directions (as DP-GEN users keep slabs), or (T, T, F) with
  ``periodic: false``;
- ``alloy: {fractions: {Cu: 0.7, Ni: 0.3}, sites: Cu, seed: 1}``: the sites of element ``sites``
  (default all atoms) get these elements in these fractions, exactly (counts rounded by largest remainder),
  at random sites;
- ``vacancies: {count: 2, element: Cu, seed: 3}``: removes ``count`` random atoms (of ``element``);
- ``interstitials: {element: H, count: 2, min_dist: 1.5, seed: 4}``: adds ``count`` atoms at random
  positions of the cell at least ``min_dist`` A from every atom (periodic images included);
- ``strain: 0.02 | [exx, eyy, ezz] | [[3x3]]``: the cell (and atoms with it) deformed by I + strain:
  a scalar stretches every direction, three numbers the axes, a tensor also shears (``[[0, 0.05, 0],
  [0, 0, 0], [0, 0, 0]]``: lattice vectors' x gets 0.05 x their y).

Random steps take a ``seed`` (default 0): the same seed gives the same structure. ``recipe`` writes a
spec as one line (recorded per walker in walkers.json and in plan.json).
"""

from __future__ import annotations

import numpy as np

from dpsnake.errors import UserError

STEPS = ("supercell", "surface", "alloy", "vacancies", "interstitials", "strain")


def apply(atoms, steps: list, key: str):
    """``atoms`` after the ``transform`` steps ``steps``; ``key`` names the list in errors."""
    for i, step in enumerate(steps or []):
        k = f"{key}[{i}]"
        if not isinstance(step, dict) or len(step) != 1 or next(iter(step)) not in STEPS:
            raise UserError(f"{k}: must be one of {{{', '.join(STEPS)}: ...}}, got {step!r}")
        ((name, args),) = step.items()
        atoms = globals()[f"_{name}"](atoms, args, f"{k}.{name}")
        if len(atoms) == 0:
            raise UserError(f"{k}.{name}: no atoms left")
    return atoms


def _int(v, key: str, low: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
        raise UserError(f"{key}: must be an integer >= {low}, got {v!r}")
    return int(v)


def _rng(args: dict, key: str):
    return np.random.default_rng(_int(args.get("seed", 0), f"{key}.seed"))


def _args(args, key: str, allowed: tuple, required: tuple = ()) -> dict:
    if not isinstance(args, dict):
        raise UserError(f"{key}: must be a mapping of {', '.join(allowed)}, got {args!r}")
    for k in args:
        if k not in allowed:
            raise UserError(f"{key}.{k}: unknown key (allowed here: {', '.join(allowed)})")
    for k in required:
        if k not in args:
            raise UserError(f"{key}.{k}: required")
    return args


def _elements(atoms, element, key: str) -> np.ndarray:
    """Indices of the atoms of ``element`` (all atoms if None)."""
    symbols = np.array(atoms.get_chemical_symbols())
    if element is None:
        return np.arange(len(atoms))
    idx = np.flatnonzero(symbols == element)
    if not len(idx):
        raise UserError(f"{key}: no {element!r} atoms in the structure (it has {sorted(set(symbols))})")
    return idx


def _supercell(atoms, args, key: str):
    m = np.asarray(args)
    if m.shape == (3,):
        return atoms.repeat(tuple(_int(x, key, 1) for x in args))
    if m.shape != (3, 3) or not np.all(m == np.round(m)):
        raise UserError(f"{key}: give [nx, ny, nz] or a 3x3 integer matrix, got {args!r}")
    if abs(np.linalg.det(m)) < 0.5:
        raise UserError(f"{key}: the matrix {args!r} is singular")
    from ase.build import make_supercell

    return make_supercell(atoms, m.astype(int))


def _surface(atoms, args, key: str):
    from ase.build import surface

    a = _args(args, key, ("miller", "layers", "vacuum", "periodic"), ("miller", "layers"))
    miller = a["miller"]
    if not isinstance(miller, list) or len(miller) != 3 or not all(isinstance(x, int) for x in miller):
        raise UserError(f"{key}.miller: must be three integers [h, k, l], got {miller!r}")
    if not any(miller):
        raise UserError(f"{key}.miller: [0, 0, 0] is no plane")
    if not atoms.pbc.all():
        raise UserError(f"{key}: needs a bulk periodic in all directions, the structure has pbc {atoms.pbc.tolist()}")
    vacuum = a.get("vacuum", 8.0)
    if isinstance(vacuum, bool) or not isinstance(vacuum, (int, float)) or vacuum <= 0:
        raise UserError(f"{key}.vacuum: must be a positive number (A on each side), got {vacuum!r}")
    periodic = a.get("periodic", True)
    if not isinstance(periodic, bool):
        raise UserError(f"{key}.periodic: must be true or false, got {periodic!r}")
    layers = _int(a["layers"], f"{key}.layers", 1)
    try:
        return surface(atoms, tuple(miller), layers, vacuum=float(vacuum), periodic=periodic)
    except Exception as err:  # ASE raises ValueError / LinAlgError for impossible planes
        raise UserError(f"{key}: ase.build.surface failed: {type(err).__name__}: {err}") from None


def _alloy(atoms, args, key: str):
    from ase.data import atomic_numbers

    a = _args(args, key, ("fractions", "sites", "seed"), ("fractions",))
    fr = a["fractions"]
    if not isinstance(fr, dict) or not fr:
        raise UserError(f"{key}.fractions: must map elements to fractions, got {fr!r}")
    for el, f in fr.items():
        if el not in atomic_numbers:
            raise UserError(f"{key}.fractions.{el}: not an element")
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1:
            raise UserError(f"{key}.fractions.{el}: must be a number in [0, 1], got {f!r}")
    if abs(sum(fr.values()) - 1) > 1e-6:
        raise UserError(f"{key}.fractions: must add up to 1, they add up to {sum(fr.values()):g}")
    sites = _elements(atoms, a.get("sites"), f"{key}.sites")
    want = np.array(list(fr.values())) * len(sites)
    counts = np.floor(want).astype(int)
    # largest remainder: the counts add up to the sites and each is within one of fraction x sites
    counts[np.argsort(-(want - counts), kind="stable")[: len(sites) - counts.sum()]] += 1
    symbols = np.array(atoms.get_chemical_symbols(), dtype=object)
    symbols[_rng(a, key).permutation(sites)] = np.repeat(list(fr), counts)
    out = atoms.copy()
    out.set_chemical_symbols(list(symbols))
    return out


def _vacancies(atoms, args, key: str):
    a = _args(args, key, ("count", "element", "seed"), ("count",))
    n = _int(a["count"], f"{key}.count", 1)
    sites = _elements(atoms, a.get("element"), f"{key}.element")
    if n >= len(atoms) or n > len(sites):
        raise UserError(f"{key}.count: {n} vacancies, but the structure has {len(sites)} such atoms of {len(atoms)}")
    out = atoms.copy()
    del out[sorted(_rng(a, key).choice(sites, size=n, replace=False))]
    return out


VACUUM = 4.0  # A: a gap between atomic planes wider than this is vacuum (a slab's), not an interstice


def _occupied(atoms):
    """(lo, width) (3,) in fractional coordinates: the part of the cell interstitials are drawn from.
    Along a non-periodic direction, and along a periodic one whose atoms leave a gap wider than
    VACUUM (a slab kept periodic with vacuum), only the range the atoms span; elsewhere all of it."""
    frac = atoms.get_scaled_positions(wrap=False)
    spacing = 1.0 / np.linalg.norm(np.linalg.inv(atoms.cell.array), axis=0)  # between lattice planes, A
    lo, width = np.zeros(3), np.ones(3)
    for i in range(3):
        f = frac[:, i]
        if not atoms.pbc[i]:
            lo[i], width[i] = f.min(), f.max() - f.min()
            continue
        f = np.sort(f % 1.0)
        gaps = np.diff(np.concatenate([f, [f[0] + 1.0]]))
        j = int(np.argmax(gaps))
        if gaps[j] * spacing[i] > VACUUM:
            lo[i], width[i] = f[(j + 1) % len(f)], 1.0 - gaps[j]
    return lo, width


def _interstitials(atoms, args, key: str, tries: int = 20000):
    from ase import Atom
    from ase.data import atomic_numbers
    from ase.geometry import get_distances

    a = _args(args, key, ("element", "count", "min_dist", "seed"), ("element", "count"))
    el = a["element"]
    if el not in atomic_numbers:
        raise UserError(f"{key}.element: {el!r} is not an element")
    n = _int(a["count"], f"{key}.count", 1)
    dmin = a.get("min_dist", 1.5)
    if isinstance(dmin, bool) or not isinstance(dmin, (int, float)) or dmin <= 0:
        raise UserError(f"{key}.min_dist: must be a positive number (A), got {dmin!r}")
    if not atoms.pbc.any() or abs(atoms.cell.volume) < 1e-6:
        raise UserError(f"{key}: needs a cell to place atoms in (the structure has none)")
    rng = _rng(a, key)
    out = atoms.copy()
    lo, width = _occupied(out)
    for k in range(n):
        # rejection sampling of uniform positions in the occupied part of the cell, in batches
        for _ in range(0, tries, 500):
            frac = lo + rng.random((500, 3)) * width
            cand = np.where(out.pbc, frac % 1.0, frac) @ out.cell.array
            d = get_distances(cand, out.positions, cell=out.cell, pbc=out.pbc)[1]
            ok = np.flatnonzero(d.min(axis=1) >= dmin)
            if len(ok):
                out.append(Atom(el, cand[ok[0]]))
                break
        else:
            raise UserError(
                f"{key}.min_dist: no room for interstitial {k + 1} of {n} at {dmin:g} A from every atom "
                f"({tries} random positions tried); lower min_dist or count"
            )
    return out


def _strain(atoms, args, key: str):
    try:
        e = np.asarray(args, dtype=float)
    except (TypeError, ValueError):
        raise UserError(f"{key}: give a number, [exx, eyy, ezz] or a 3x3 tensor, got {args!r}") from None
    if isinstance(args, bool) or e.shape not in ((), (3,), (3, 3)) or not np.isfinite(e).all():
        raise UserError(f"{key}: give a number, [exx, eyy, ezz] or a 3x3 tensor, got {args!r}")
    eps = e * np.eye(3) if e.shape == () else np.diag(e) if e.shape == (3,) else e
    f = np.eye(3) + eps
    if np.linalg.det(f) <= 0.05:
        raise UserError(f"{key}: I + strain must keep the cell's volume positive, got {args!r}")
    out = atoms.copy()
    # lattice vectors are rows: a' = (I + e) a, i.e. cell' = cell (I + e)^T; atoms move with the cell
    out.set_cell(out.cell.array @ f.T, scale_atoms=True)
    return out


def recipe(spec: dict) -> str:
    """One line saying how a structure spec builds its structure, e.g.
    ``bulk(cubic=True, name=Cu) | supercell [3,3,3] | alloy fractions:Cu:0.7 Ni:0.3 seed:1 | vacancies count:2``."""
    if "file" in spec:
        parts = [f"file {spec['file']}" + (f" index {spec['index']}" if spec.get("index") else "")]
    elif "random" in spec:  # the walker's own seed is in its spec (dpsnake.workflow.plan)
        parts = [f"random {_short(spec['random'])}"]
    else:
        kw = ", ".join(f"{k}={_short(v)}" for k, v in sorted((spec.get("kwargs") or {}).items()))
        parts = [f"{spec.get('builder')}({kw})"]
    if spec.get("repeat"):
        parts.append("repeat " + "x".join(map(str, spec["repeat"])))
    sub = spec.get("substitute")
    if sub:
        parts.append(f"substitute {sub['from']}->{sub['to']} {sub['fraction']:g} seed {sub.get('seed', 0)}")
    for step in spec.get("transform") or []:
        ((name, args),) = step.items()
        parts.append(f"{name} {_short(args)}")
    return " | ".join(parts)


def _short(v) -> str:
    """Compact text of a config value (no quotes, no spaces after colons; keys sorted, as in the
    resolved config, so the text does not depend on the order they were written in)."""
    if isinstance(v, dict):
        return " ".join(f"{k}:{_short(x)}" for k, x in sorted(v.items()))
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_short(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)
