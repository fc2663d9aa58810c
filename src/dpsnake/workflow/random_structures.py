"""Random start structures (AIRSS-style): a random cell and random positions with minimum distances.

``structure: {random: {composition: {Cu: 4, Ni: 4}, volume_per_atom: [10, 14], min_dist: 2.0, seed: 0}}``

- the cell: angles uniform in [``angles`` range] (default 60-120 degrees), lengths with a ratio of at
  most ``max_aspect`` (default 2), scaled to a volume per atom drawn uniformly from ``volume_per_atom``
  (A^3; one number: that volume); a cell is drawn again when its shape is too flat (volume below half
  of the box of its lengths) or when a lattice plane spacing is below the largest minimum distance
  (an atom would be closer than that to its own image);
- the atoms in a random order at uniform fractional positions, each one retried until it is at least
  ``min_dist`` A (one number, or per pair ``{"Cu-Ni": 2.2, "Cu-Cu": 2.3, "Ni-Ni": 2.3}``) from every
  atom placed before, minimum image; a new cell after ``tries`` failures of one atom.

Periodic in all directions. The same spec and seed give the same structure; the exploration plan
gives each walker its own seed (``walker_seed``), recorded in its recipe.
"""

from __future__ import annotations

import numpy as np

from dpsnake.errors import UserError

KEYS = ("composition", "volume_per_atom", "min_dist", "seed", "angles", "max_aspect", "tries")


def walker_seed(spec: dict, walker_seed: int) -> int:
    """The random structure seed of a walker: the spec's seed and the walker's (unique in a run) mixed
    (numpy SeedSequence), so walkers differ and neighbouring spec seeds do not share structures."""
    base = int(spec.get("seed", 0))
    return int(np.random.SeedSequence([base, int(walker_seed)]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _pair_table(symbols: list[str], min_dist, key: str) -> dict:
    """{(a, b): A} for every (sorted) pair of the composition's elements."""
    pairs = [tuple(sorted((a, b))) for i, a in enumerate(symbols) for b in symbols[i:]]
    if isinstance(min_dist, bool):
        raise UserError(f"{key}.min_dist: must be a positive number (A) or a mapping 'A-B': A, got {min_dist!r}")
    if isinstance(min_dist, (int, float)):
        if not min_dist > 0:
            raise UserError(f"{key}.min_dist: must be positive (A), got {min_dist!r}")
        return {p: float(min_dist) for p in pairs}
    if not isinstance(min_dist, dict):
        raise UserError(f"{key}.min_dist: must be a positive number (A) or a mapping 'A-B': A, got {min_dist!r}")
    table = {}
    for k, v in min_dist.items():
        ab = str(k).split("-")
        if len(ab) != 2 or any(x not in symbols for x in ab):
            raise UserError(f"{key}.min_dist.{k}: not a pair 'A-B' of the composition's elements {symbols}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise UserError(f"{key}.min_dist.{k}: must be a positive number (A), got {v!r}")
        table[tuple(sorted(ab))] = float(v)
    for p in pairs:
        if p not in table:
            raise UserError(f"{key}.min_dist: the pair '{p[0]}-{p[1]}' is missing")
    return table


def _range(v, key: str, low: float, name: str) -> tuple[float, float]:
    vals = [v, v] if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    if (
        not isinstance(vals, list)
        or len(vals) != 2
        or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in vals)
        or not low < vals[0] <= vals[1]
    ):
        raise UserError(f"{key}: must be a number or [min, max] with {low:g} < min <= max ({name}), got {v!r}")
    return float(vals[0]), float(vals[1])


def check(spec, key: str) -> dict:
    """The validated spec with defaults filled (one UserError line naming the key)."""
    from ase.data import atomic_numbers

    if not isinstance(spec, dict):
        raise UserError(f"{key}: must be a mapping of {', '.join(KEYS)}, got {spec!r}")
    for k in spec:
        if k not in KEYS:
            raise UserError(f"{key}.{k}: unknown key (allowed here: {', '.join(KEYS)})")
    for k in ("composition", "volume_per_atom", "min_dist"):
        if k not in spec:
            raise UserError(f"{key}.{k}: required")
    comp = spec["composition"]
    if not isinstance(comp, dict) or not comp:
        raise UserError(f"{key}.composition: must map elements to atom counts, got {comp!r}")
    for el, n in comp.items():
        if el not in atomic_numbers:
            raise UserError(f"{key}.composition.{el}: not an element")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UserError(f"{key}.composition.{el}: must be an integer >= 1, got {n!r}")
    out = {
        "composition": dict(comp),
        "volume_per_atom": _range(spec["volume_per_atom"], f"{key}.volume_per_atom", 0.0, "A^3 per atom"),
        "pairs": _pair_table(list(comp), spec["min_dist"], key),
        "angles": _range(spec.get("angles", [60.0, 120.0]), f"{key}.angles", 0.0, "degrees"),
        "max_aspect": float(spec.get("max_aspect", 2.0)),
        "tries": spec.get("tries", 1000),
        "seed": spec.get("seed", 0),
    }
    if out["angles"][1] >= 180:
        raise UserError(f"{key}.angles: must be below 180 degrees, got {spec['angles']!r}")
    if isinstance(spec.get("max_aspect", 2.0), bool) or not out["max_aspect"] >= 1:
        raise UserError(f"{key}.max_aspect: must be a number >= 1, got {spec.get('max_aspect')!r}")
    for k in ("tries", "seed"):
        if isinstance(out[k], bool) or not isinstance(out[k], int) or out[k] < (1 if k == "tries" else 0):
            raise UserError(f"{key}.{k}: must be an integer >= {1 if k == 'tries' else 0}, got {out[k]!r}")
    return out


def _cell(rng, n: int, c: dict, dmax: float) -> np.ndarray | None:
    """A random cell (rows = lattice vectors, A) or None when the draw is rejected."""
    from ase.geometry import cellpar_to_cell

    lengths = rng.uniform(1.0, c["max_aspect"], 3)
    angles = rng.uniform(*c["angles"], 3)
    cos = np.cos(np.radians(angles))
    flat = 1 - (cos**2).sum() + 2 * cos.prod()  # (V / (a b c))^2
    if flat < 0.25:  # also rejects impossible angle triples (flat <= 0)
        return None
    cell = cellpar_to_cell(np.concatenate([lengths, angles]))
    vol = rng.uniform(*c["volume_per_atom"]) * n
    cell *= (vol / abs(np.linalg.det(cell))) ** (1 / 3)
    spacing = 1 / np.linalg.norm(np.linalg.inv(cell).T, axis=1)  # lattice plane spacings
    return cell if spacing.min() >= dmax else None


def _mic_distances(cell: np.ndarray):
    """d(a (K, 3), b (L, 3)) -> (K, L) minimum-image distances, A: the difference wrapped in the
    Minkowski-reduced basis, then the shortest of its 27 neighbouring images (exact for a reduced basis)."""
    import itertools

    from ase.geometry import minkowski_reduce

    rcell = minkowski_reduce(cell)[0]
    inv = np.linalg.inv(rcell)
    shifts = np.array(list(itertools.product((-1, 0, 1), repeat=3))) @ rcell  # (27, 3)

    def dist(a, b):
        f = (a[:, None, :] - b[None, :, :]) @ inv
        d = (f - np.round(f)) @ rcell
        return np.sqrt((((d[:, :, None, :] + shifts) ** 2).sum(axis=-1)).min(axis=-1))

    return dist


def random_structure(spec: dict, key: str = "structure.random", seed: int | None = None):
    """An ase.Atoms (pbc True) from a ``random`` spec; ``seed`` overrides the spec's seed."""
    from ase import Atoms

    c = check(spec, key)
    rng = np.random.default_rng(c["seed"] if seed is None else seed)
    symbols = [el for el, n in c["composition"].items() for _ in range(n)]
    n = len(symbols)
    dmax = max(c["pairs"].values())
    for _ in range(200):
        cell = _cell(rng, n, c, dmax)
        if cell is None:
            continue
        order = rng.permutation(symbols)
        dist = _mic_distances(cell)
        pos = np.zeros((0, 3))
        for i, el in enumerate(order):
            need = np.array([c["pairs"][tuple(sorted((el, o)))] for o in order[:i]])
            for _ in range(0, c["tries"], 100):  # candidates in batches of 100, the first that fits
                cand = rng.random((100, 3)) @ cell
                if i == 0:
                    pos = cand[:1]
                    break
                d = dist(cand, pos)
                ok = np.flatnonzero((d >= need[None, :]).all(axis=1))
                if len(ok):
                    pos = np.vstack([pos, cand[ok[0]]])
                    break
            else:
                break  # this atom found no room: a new cell
        if len(pos) == n:
            return Atoms(list(order), positions=pos, cell=cell, pbc=True)
    raise UserError(
        f"{key}: no random structure with these minimum distances in 200 cells "
        f"(volume_per_atom {list(c['volume_per_atom'])}, min_dist up to {dmax:g} A); raise the volume or lower min_dist"
    )


def recipe(spec: dict, seed: int | None = None) -> str:
    """One line, e.g. ``random composition:Cu:4 Ni:4 min_dist:2 seed:17 volume_per_atom:[10,14]``."""
    from dpsnake.workflow.generators import _short

    s = dict(spec)
    if seed is not None:
        s["seed"] = seed
    return f"random {_short(s)}"
