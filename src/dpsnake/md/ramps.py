"""Temperature and pressure schedules of a walker (``temperature_ramp``, ``pressure_ramp``).

A schedule is a list of knots ``[[step, value], ...]`` (steps: MD step indices, first 0, increasing;
values: K or bar) and how to go between them: ``linear`` (piecewise linear, so heat-then-quench is
three knots) or ``stepped`` (each knot's value holds until the next knot). After the last knot the
last value holds. The short forms, as in the config:

- ``{start: 300, stop: 2500}``: linear from start at step 0 to stop at the last step, as LAMMPS'
  ``fix nvt temp 300 2500 ...`` over a run of ``nsteps``;
- ``{start: 300, stop: 2500, schedule: stepped, steps: 4}``: 4 equal plateaus from start to stop;
- ``{knots: [[0, 300], [5000, 2500], [10000, 300]], schedule: linear}``.

The target of the step that ends at step n is the schedule's value at n (LAMMPS: the ramp's fraction
is (current step - start) / (end - start) with the step counter already advanced), so a frame written
at step n was made with the target at n. ``ramp_values`` evaluates it on the device for the whole
batch (NumPy or CuPy, no host synchronisation: it runs inside the captured CUDA graph).
"""

from __future__ import annotations

import math

from dpsnake.errors import UserError

SCHEDULES = ("linear", "stepped")
_KEYS = {"start", "stop", "schedule", "steps", "knots"}


def _number(v, key: str, positive: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise UserError(f"{key}: must be a number, got {v!r}")
    if positive and v <= 0:
        raise UserError(f"{key}: must be positive, got {v!r}")
    return float(v)


def normalize(spec, nsteps: int, key: str, positive: bool = True) -> dict:
    """A schedule in any form as ``{"schedule": "linear"|"stepped", "knots": [[step, value], ...]}``
    (steps int, values float), checked against ``nsteps``; ``positive``: values must be > 0
    (temperatures; pressures may be negative). A mistake is one UserError line starting with ``key``."""
    if not isinstance(spec, dict):
        raise UserError(f"{key}: must be an object ({{start, stop}} or {{knots}}), got {spec!r}")
    unknown = sorted(set(spec) - _KEYS)
    if unknown:
        raise UserError(f"{key}.{unknown[0]}: unknown key (allowed here: start, stop, schedule, steps, knots)")
    schedule = spec.get("schedule", "linear")
    if schedule not in SCHEDULES:
        raise UserError(f"{key}.schedule: must be linear or stepped, got {schedule!r}")
    if "knots" in spec:
        extra = sorted({"start", "stop", "steps"} & set(spec))
        if extra:
            raise UserError(f"{key}.{extra[0]}: give knots or start/stop, not both")
        knots = _knots(spec["knots"], nsteps, f"{key}.knots", positive)
    else:
        for k in ("start", "stop"):
            if k not in spec:
                raise UserError(f"{key}.{k}: required (or give knots)")
        a, b = (_number(spec[k], f"{key}.{k}", positive) for k in ("start", "stop"))
        if schedule == "linear":
            if "steps" in spec:
                raise UserError(f"{key}.steps: only with schedule stepped (a linear ramp runs over nsteps)")
            knots = [[0, a], [int(nsteps), b]]
        else:
            n = spec.get("steps")
            if isinstance(n, bool) or not isinstance(n, int) or n < 2:
                raise UserError(f"{key}.steps: the number of plateaus of a stepped ramp, an integer >= 2, got {n!r}")
            if n > nsteps:
                raise UserError(f"{key}.steps: {n} plateaus do not fit in nsteps {nsteps}")
            knots = [[round(k * nsteps / n), a + (b - a) * k / (n - 1)] for k in range(n)]
    return {"schedule": schedule, "knots": knots}


def _knots(knots, nsteps: int, key: str, positive: bool) -> list:
    if not isinstance(knots, list) or not knots:
        raise UserError(f"{key}: must be a non-empty list of [step, value] pairs, got {knots!r}")
    out = []
    for i, kv in enumerate(knots):
        if not isinstance(kv, (list, tuple)) or len(kv) != 2:
            raise UserError(f"{key}[{i}]: must be a [step, value] pair, got {kv!r}")
        step, value = kv
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step != int(step) or step < 0:
            raise UserError(f"{key}[{i}]: the step must be a non-negative integer, got {step!r}")
        step = int(step)
        if i == 0 and step != 0:
            raise UserError(f"{key}[0]: the first knot must be at step 0, got {step}")
        if out and step <= out[-1][0]:
            raise UserError(f"{key}[{i}]: steps must increase, got {step} after {out[-1][0]}")
        if step > nsteps:
            raise UserError(f"{key}[{i}]: step {step} is beyond nsteps {nsteps}")
        out.append([step, _number(value, f"{key}[{i}]", positive)])
    return out


def value_at(ramp: dict, step: float) -> float:
    """The schedule's value at ``step`` (host; the start temperature, names, reports)."""
    knots = ramp["knots"]
    for (s0, v0), (s1, v1) in zip(knots, knots[1:]):
        if step < s1:
            if ramp["schedule"] == "stepped":
                return v0
            return v0 + (v1 - v0) * max(step - s0, 0) / (s1 - s0)
    return knots[-1][1]


def label(ramp: dict) -> str:
    """Short text of a schedule for walker names and tables: the knot values, e.g. ``300-2500-300``
    (a stepped start/stop ramp: its plateaus)."""
    return "-".join(f"{v:g}" for _, v in ramp["knots"])


def ramp_values(xp, s, knots, values, stepped):
    """Values (S,) of the schedules at step ``s`` (a float, or a 0-d float64 array in ``xp``).

    knots, values (S, K) float64: knot steps and values per walker (K >= 2; walkers with fewer knots
    repeat their last knot, a walker without a schedule has two equal knots, so its value is exactly
    its constant); stepped (S,) bool. Only elementwise work and sums (no gathers, no host sync).
    """
    K = knots.shape[1]
    seg = xp.clip((knots <= s).sum(axis=1) - 1, 0, K - 2)  # the segment [k0, k1] holding s
    hot = xp.arange(K - 1)[None, :] == seg[:, None]
    k0 = xp.where(hot, knots[:, :-1], 0.0).sum(axis=1)
    k1 = xp.where(hot, knots[:, 1:], 0.0).sum(axis=1)
    v0 = xp.where(hot, values[:, :-1], 0.0).sum(axis=1)
    v1 = xp.where(hot, values[:, 1:], 0.0).sum(axis=1)
    frac = xp.clip((s - k0) / xp.maximum(k1 - k0, 1.0), 0.0, 1.0)
    linear = v0 + frac * (v1 - v0)
    return xp.where(stepped, xp.where(s >= k1, v1, v0), linear)


def knot_arrays(ramps: list, constants: list, scale: float):
    """Host arrays (knots (S, K), values (S, K) times ``scale``, stepped (S,)) of per-walker schedules
    (None: the constant of ``constants``), padded to a common K >= 2 by repeating the last knot."""
    import numpy as np

    rows = [r["knots"] if r else [[0, c], [0, c]] for r, c in zip(ramps, constants)]
    K = max(2, *(len(r) for r in rows)) if rows else 2
    rows = [r + [r[-1]] * (K - len(r)) for r in rows]
    knots = np.array([[k for k, _ in r] for r in rows], dtype=np.float64).reshape(-1, K)
    values = np.array([[v * scale for _, v in r] for r in rows], dtype=np.float64).reshape(-1, K)
    stepped = np.array([bool(r) and r["schedule"] == "stepped" for r in ramps], dtype=bool)
    return knots, values, stepped
