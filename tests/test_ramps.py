"""Temperature and pressure schedules per walker (issue 20 item 1): the targets follow the schedules on
the flat batched state, the thermostats and barostat reach them, a resumed exploration equals an
uninterrupted one, and bad schedules are one line naming the key.

Driven by the engine with the tests' tiny DeePMD-kit Cu model (4-atom cells, a = 3.7 A: no sel
overflow), as tests/test_md_stat.py. Averages are compared within 4 standard errors; the error comes
from the spread of the walkers' own means (independent walkers; the kinetic energy of a 4-atom cell is
correlated over much longer than tau_t, so time blocks would understate it).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from ase import units
from ase.build import bulk

from dpsnake.errors import UserError
from dpsnake.md import integrators as I
from dpsnake.md import ramps
from dpsnake.md.walkers import parse_walkers, read_structures

N, DT, TAU = 500, 0.002, 0.02  # steps, ps, ps
HALF = N // 2
HEAT = {"knots": [[0, 300], [HALF, 1000], [N, 300]]}  # heat, then quench (piecewise linear)
STEP_T = {"start": 300, "stop": 900, "schedule": "stepped", "steps": 2}
STEP_P = {"knots": [[0, 9000], [HALF, 15000]], "schedule": "stepped"}  # bar


def _ensemble(paths):
    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.engine.model import load_model

    return Ensemble([load_model(p) for p in paths])


def _walkers(path):
    base = dict(structure=str(path), nsteps=N, dt=DT, trj_freq=20, tau_t=TAU, tau_p=TAU)
    specs = []
    for r in range(10):
        specs.append(dict(base, name=f"step{r}", ensemble="nvt-langevin", seed=1 + r, temperature_ramp=STEP_T))
    for r in range(4):
        specs.append(dict(base, name=f"heat{r}", ensemble="nvt-langevin", seed=11 + r, temperature_ramp=HEAT))
    for r in range(6):
        specs.append(dict(base, name=f"npt{r}", ensemble="npt", temperature=250, seed=21 + r, pressure_ramp=STEP_P))
    specs.append(dict(base, name="const", ensemble="nvt", temperature=400, seed=31))
    return specs


def walker_mean(x):
    """Mean and standard error of x (T, W) from the W walkers' time averages."""
    b = x.mean(axis=0)
    return b.mean(), b.std(ddof=1) / np.sqrt(b.size)


@pytest.fixture(scope="module")
def run(cu_model, tmp_path_factory):
    from dpsnake.md.providers import EnsembleProvider
    from dpsnake.md.state import start_state

    path = tmp_path_factory.mktemp("ramps") / "cu4.extxyz"
    bulk("Cu", "fcc", a=3.7, cubic=True).write(path, format="extxyz")
    ws = parse_walkers(_walkers(path))
    st = start_state(ws, read_structures(ws, ["Cu"]))
    prov = EnsembleProvider(_ensemble([cu_model["dp"]]))
    I.set_forces(st, prov(st, False))
    flags = st.flags()
    temp, piso, kT, p0 = [], [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for k in range(N):
            I.md_step(st, prov, k, flags)
            temp.append(I.temperature(st))
            piso.append(np.trace(I.pressure_tensor(st), axis1=1, axis2=2) / 3 / units.bar)
            kT.append(st.kT.copy())
            p0.append(st.p0.copy())
    names = [w.name for w in ws]
    sl = {g: [i for i, n in enumerate(names) if n.startswith(g)] for g in ("step", "heat", "npt", "const")}
    return {
        "walkers": ws,
        "flags": flags,
        "sl": sl,
        "T": np.array(temp),
        "P": np.array(piso),
        "kT": np.array(kT),
        "p0": np.array(p0),
    }


def test_targets_follow_the_schedules_every_step(run):
    """Row k holds the targets of the step ending at k+1: the schedule's value there (LAMMPS' ramp)."""
    assert run["flags"]["ramp_t"] and run["flags"]["ramp_p"]
    for i, w in enumerate(run["walkers"]):
        want_t = [ramps.value_at(w.temperature_ramp, k + 1) if w.temperature_ramp else w.temperature for k in range(N)]
        want_p = [ramps.value_at(w.pressure_ramp, k + 1) if w.pressure_ramp else w.pressure for k in range(N)]
        np.testing.assert_allclose(run["kT"][:, i] / units.kB, want_t, rtol=1e-12)
        np.testing.assert_allclose(run["p0"][:, i] / units.bar, want_p, rtol=1e-12)
    heat = run["kT"][:, run["sl"]["heat"][0]] / units.kB
    assert heat[HALF - 1] == pytest.approx(1000) and heat[HALF // 2 - 1] == pytest.approx(650)
    assert heat[-1] == pytest.approx(300)
    # a walker without a schedule keeps its constant bit for bit
    assert (run["kT"][:, run["sl"]["const"][0]] == units.kB * 400.0).all()


def test_stepped_temperature_plateaus_are_reached(run):
    """<T> on each plateau of the stepped ramp (after 5 tau_t) is the plateau's temperature."""
    g = run["sl"]["step"]
    burn = int(5 * TAU / DT)
    for lo, hi, target in ((burn, HALF, 300.0), (HALF + burn, N, 900.0)):
        m, e = walker_mean(run["T"][lo:hi, g])
        print(f"plateau {target:g} K: <T> {m:.1f} +- {e:.1f} K")
        assert abs(m - target) < 4 * e and e < 0.05 * target


def test_heat_then_quench_follows_the_target(run):
    """Langevin's kinetic temperature relaxes in tau_t / 2 (5 steps here): T / T_target stays 1 on
    average while the target goes 300 -> 1000 -> 300 K; the hot half is hotter than the cold ends."""
    g = run["sl"]["heat"]
    target = run["kT"][:, g] / units.kB
    m, e = walker_mean(run["T"][20:, g] / target[20:])
    print(f"heat/quench: <T / T_target> {m:.3f} +- {e:.3f}")
    assert abs(m - 1) < 4 * e and e < 0.05
    mid = run["T"][HALF - 100 : HALF + 100, g].mean()
    ends = np.concatenate([run["T"][:60, g], run["T"][-60:, g]]).mean()
    assert mid > 2 * ends


def test_stepped_pressure_plateaus_are_reached(run):
    """<P_int> on each plateau of the barostat's stepped schedule is the plateau's pressure."""
    g = run["sl"]["npt"]
    burn = int(5 * TAU / DT)
    means = []
    for lo, hi, target in ((burn, HALF, 9000.0), (HALF + burn, N, 15000.0)):
        m, e = walker_mean(run["P"][lo:hi, g])
        print(f"plateau {target:g} bar: <P> {m:.0f} +- {e:.0f} bar")
        assert abs(m - target) < 4 * e and e < 1500
        means.append(m)
    assert means[1] - means[0] > 3000


def test_resumed_exploration_equals_uninterrupted(tmp_path, cu_model):
    """Schedules on NHC, Bussi (NPT) and Langevin walkers: killed after 70 steps (checkpoint at 50),
    the rerun resumes and writes the same frames and deviations as an uninterrupted run."""
    from dpsnake.md.explorer import Explorer
    from dpsnake.md.providers import EnsembleProvider

    path = tmp_path / "cu.extxyz"
    at = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 1, 1))
    at.rattle(0.05, seed=3)
    at.write(path, format="extxyz")
    base = dict(structure=str(path), nsteps=150, dt=0.002, trj_freq=10, tau_t=0.05, tau_p=0.1)
    specs = [
        dict(base, name="nhc", ensemble="nvt", seed=1, temperature_ramp={"knots": [[0, 300], [60, 900], [150, 200]]}),
        dict(base, name="npt", ensemble="npt-aniso", seed=2, temperature_ramp={"start": 300, "stop": 600},
             pressure_ramp={"start": 0, "stop": 20000, "schedule": "stepped", "steps": 3}),
        dict(base, name="lang", ensemble="nvt-langevin", seed=3, temperature_ramp=STEP_T),
    ]  # fmt: skip
    ws = parse_walkers(specs)
    prov = EnsembleProvider(_ensemble([cu_model["dp"], cu_model["dp"]]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = Explorer(ws, prov, ["Cu"], tmp_path / "ref", progress=False).run()
        run = tmp_path / "run"
        assert Explorer(ws, prov, ["Cu"], run, progress=False, stop_after=70, checkpoint_steps=50).run() == {}
        with np.load(run / "checkpoint.npz") as z:
            assert json.loads(str(z["meta"]))["step"] == 70
        assert Explorer(ws, prov, ["Cu"], run, progress=False).run() == ref
    assert all(r["status"] == "finished" for r in ref["walkers"].values())
    for w in specs:
        for f in ("traj.extxyz", "model_devi.out"):
            assert (tmp_path / "ref" / w["name"] / f).read_text() == (run / w["name"] / f).read_text()


def _walker(**kw):
    return dict(name="w", structure="cu.extxyz", ensemble="nvt", nsteps=100, dt=0.002, trj_freq=10, seed=1, **kw)


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            _walker(temperature_ramp={"knots": [[0, 300], [50, 900], [40, 300]]}),
            "walker 'w': temperature_ramp.knots[2]: steps must increase, got 40 after 50",
        ),
        (
            _walker(temperature_ramp={"knots": [[10, 300], [50, 900]]}),
            "temperature_ramp.knots[0]: the first knot must be at step 0, got 10",
        ),
        (_walker(temperature_ramp={"knots": [[0, 300], [500, 900]]}), "knots[1]: step 500 is beyond nsteps 100"),
        (_walker(temperature_ramp={"start": 300, "stop": -5}), "temperature_ramp.stop: must be positive, got -5"),
        (_walker(temperature_ramp={"start": 300, "stop": 900, "schedule": "stepped"}), "temperature_ramp.steps:"),
        (_walker(temperature_ramp={"start": 300, "stop": 900, "schedule": "cubic"}), "temperature_ramp.schedule:"),
        (_walker(temperature_ramp={"start": 300, "end": 900}), "temperature_ramp.end: unknown key"),
        (_walker(temperature=400, temperature_ramp={"start": 300, "stop": 900}), "key 'temperature' 400 differs"),
        (_walker(temperature=300, pressure_ramp={"start": 0, "stop": 1}), "key 'pressure_ramp' needs a barostat"),
    ],
)
def test_bad_walker_schedules_are_one_line(tmp_path, spec, message):
    bulk("Cu", "fcc", a=3.6).write(tmp_path / "cu.extxyz")
    with pytest.raises(UserError) as err:
        parse_walkers([spec], base=tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "stage, message",
    [
        (
            {"temperatures": [300], "temperature_ramp": {"start": 300, "stop": 900}},
            "explore.stages[0].temperature_ramp: give temperatures or temperature_ramp, not both",
        ),
        (
            {"groups": [{"temperatures": [300], "temperature_ramp": {"start": 300, "stop": 9}}]},
            "explore.stages[0].groups[0].temperature_ramp: give temperatures or temperature_ramp, not both",
        ),
        (
            {"temperatures": [300], "pressure_ramp": {"start": 0, "stop": 1e4}},
            "explore.stages[0].pressure_ramp: needs a barostat (npt, npt-aniso, npt-tri), the ensemble is nvt",
        ),
        (
            {"temperature_ramp": {"knots": [[0, 300], [5000, 900]]}},
            "explore.stages[0].temperature_ramp.knots[1]: step 5000 is beyond nsteps 40",
        ),
        ({"temperature_ramp": {"start": 300, "stop": "hot"}}, "explore.stages[0].temperature_ramp.stop: 'hot' is not"),
        ({"temperature_ramp": {"start": 300}}, "explore.stages[0].temperature_ramp.stop: required (or give knots)"),
    ],
)
def test_bad_config_schedules_are_one_line(tmp_path, stage, message):
    from select_helpers import cu_config

    with pytest.raises(UserError) as err:
        cu_config(tmp_path, explore={"stages": [{"nsteps": 40, "trj_freq": 5, **stage}]})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_plan_writes_schedules_into_walkers(tmp_path):
    """A stage group with a heat-then-quench ramp and an NPT group with a pressure ramp: walkers.json
    carries the normalized schedules, names show them, temperature / pressure are the start values."""
    from select_helpers import cu_config

    from dpsnake.workflow.plan import make_walkers

    groups = [
        {"name": "anneal", "temperature_ramp": {"knots": [[0, 300], [20, 1500], [40, 300]]}},
        {"name": "squeeze", "ensemble": "npt", "temperatures": [600], "pressure_ramp": {"start": 0, "stop": 5e4}},
        {"name": "lmp", "temperature_ramp": {"start": 300, "stop": 900, "schedule": "stepped", "steps": 3}},
    ]
    cfg = cu_config(tmp_path, explore={"stages": [{"nsteps": 40, "trj_freq": 5, "groups": groups}]})
    ws = make_walkers(cfg, 0, 0, tmp_path / "ex")
    assert [w["name"] for w in ws] == [
        "Cu.anneal.T300-1500-300.r0",
        "Cu.squeeze.T600.P0-50000.r0",
        "Cu.lmp.T300-600-900.r0",
    ]
    assert ws[0]["temperature_ramp"] == {"schedule": "linear", "knots": [[0, 300.0], [20, 1500.0], [40, 300.0]]}
    assert ws[1]["pressure_ramp"] == {"schedule": "linear", "knots": [[0, 0.0], [40, 50000.0]]}
    assert ws[1]["pressure"] == 0.0 and "temperature_ramp" not in ws[1]
    assert ws[2]["temperature_ramp"]["knots"] == [[0, 300.0], [13, 600.0], [27, 900.0]]
    assert [w.temperature for w in parse_walkers(ws, base=tmp_path / "ex")] == [300.0, 600.0, 300.0]


def test_schedules_in_cuda_graphs_equal_eager_and_numpy(tmp_path):
    """On a GPU (skipped without CuPy, a device and the device runs' model .whl/models/t_cu.dp or
    DPSNAKE_GPU_MODEL): the targets set inside the captured CUDA graph (step read from device memory)
    equal the eager CuPy steps and NumPy's, step by step."""
    from engine_helpers import cupy_and_model_or_skip

    cp, model = cupy_and_model_or_skip()
    from dpsnake.md.graphs import GraphedStep
    from dpsnake.md.providers import EnsembleProvider
    from dpsnake.md.state import start_state

    path = tmp_path / "cu.extxyz"
    at = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 1, 1))
    at.rattle(0.05, seed=1)
    at.write(path, format="extxyz")
    base = dict(structure=str(path), nsteps=40, dt=0.002, trj_freq=10, tau_t=0.05, tau_p=0.1)
    specs = [
        dict(base, name="nhc", ensemble="nvt", seed=1, temperature_ramp={"knots": [[0, 300], [10, 900], [40, 200]]}),
        dict(base, name="lang", ensemble="nvt-langevin", seed=2, temperature_ramp=STEP_T),
        dict(base, name="npt", ensemble="npt", temperature=300, seed=3, pressure_ramp={"start": 0, "stop": 2e4}),
        dict(base, name="const", ensemble="nvt", thermostat="bussi", temperature=500, seed=4),
    ]

    def batch(xp):
        ws = parse_walkers(specs)
        st = start_state(ws, read_structures(ws, ["Cu"]), xp)
        prov = EnsembleProvider(_ensemble([str(model)]) if xp is np else _gpu_ensemble(str(model), cp))
        I.set_forces(st, prov(st, False))
        return st, prov

    (s_np, p_np), (s_eager, p_gpu), (s_graph, _) = batch(np), batch(cp), batch(cp)
    graphed = GraphedStep()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for k in range(30):
            I.md_step(s_np, p_np, k, s_np.flags())
            I.md_step(s_eager, p_gpu, k, s_eager.flags())
            graphed(s_graph, p_gpu, k, s_graph.flags())
            for f in ("kT", "p0", "pos", "vel", "cells"):
                a, b, c = getattr(s_np, f), cp.asnumpy(getattr(s_eager, f)), cp.asnumpy(getattr(s_graph, f))
                np.testing.assert_allclose(c, b, rtol=1e-11, atol=1e-11, err_msg=f"graph vs eager {f} step {k}")
                np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-8, err_msg=f"cupy vs numpy {f} step {k}")
    assert graphed.graphs is not None and "graph" not in graphed.ctx.broken
    assert cp.asnumpy(s_graph.kT)[0] / units.kB == pytest.approx(
        ramps.value_at(ramps.normalize(specs[0]["temperature_ramp"], 40, "t"), 30)
    )


def _gpu_ensemble(path, cp):
    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.engine.model import load_model

    return Ensemble([load_model(path)], xp=cp)


def test_selected_frames_carry_the_target_at_their_step():
    from dpsnake.workflow.select import _target

    ramp = {"schedule": "linear", "knots": [[0, 300.0], [100, 2500.0], [200, 300.0]]}
    w = {"temperature": 300.0, "temperature_ramp": ramp, "pressure": 1e4}
    assert [_target(w, "temperature", s) for s in (0, 50, 100, 150, 200)] == [300.0, 1400.0, 2500.0, 1400.0, 300.0]
    assert _target(w, "pressure", 50) == 1e4 and _target({"temperature": 900.0}, "temperature", 10) == 900.0
