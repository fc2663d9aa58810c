"""Statistical mechanics of the thermostats and barostats, driven by the engine with a real Cu model.

One batch of 4-atom Cu cells (NVT with three thermostats, NPT isotropic at three pressures,
anisotropic and fully flexible) runs 2000 steps of 2 fs; every walker has its own seed. Averages
are compared with their exact values within 4 standard errors (block averages over time and walkers).
"""

import warnings

import numpy as np
import pytest
from ase import units
from ase.build import bulk

from dpsnake.md import integrators as I
from dpsnake.md.providers import EnsembleProvider
from dpsnake.md.state import start_state
from dpsnake.md.walkers import parse_walkers, read_structures

T = 250.0
P0 = 12000.0  # bar; this tiny model's cell is mechanically sane (no sel overflow) around here
DP = 3000.0
NSTEPS, BURN, NW = 2000, 300, 6
pytestmark = pytest.mark.slow


def block_mean(x, nblock=10):
    """Mean and its standard error of x (T, W) from nblock time blocks per walker (independent walkers)."""
    t = (x.shape[0] // nblock) * nblock
    b = x[:t].reshape(nblock, t // nblock, -1).mean(axis=1).ravel()
    return b.mean(), b.std(ddof=1) / np.sqrt(b.size)


@pytest.fixture(scope="module")
def run(cu_model, tmp_path_factory):
    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.engine.model import load_model

    path = tmp_path_factory.mktemp("stat") / "cu4.extxyz"
    bulk("Cu", "fcc", a=3.7, cubic=True).write(path, format="extxyz")
    specs, seed = [], 100

    def add(group, **kw):
        nonlocal seed
        for r in range(NW):
            seed += 1
            specs.append(
                dict(
                    name=f"{group}_{r}",
                    structure=str(path),
                    temperature=T,
                    nsteps=NSTEPS,
                    dt=0.002,
                    trj_freq=100,
                    seed=seed,
                    tau_t=0.05,
                    tau_p=0.05,
                    **kw,
                )
            )
        return slice(len(specs) - NW, len(specs))

    groups = {th: add(th, ensemble="nvt", thermostat=th) for th in ("nhc", "bussi", "langevin")}
    for p in (P0 - DP, P0, P0 + DP):
        groups[p] = add(f"npt{p:.0f}", ensemble="npt", pressure=p)
    groups["aniso"] = add("aniso", ensemble="npt-aniso", pressure=P0)
    groups["tri"] = add("tri", ensemble="npt-tri", pressure=P0)
    ws = parse_walkers(specs)
    st = start_state(ws, read_structures(ws, ["Cu"]))
    prov = EnsembleProvider(Ensemble([load_model(cu_model["dp"])]))
    I.set_forces(st, prov(st, False))
    flags = st.flags()
    kin, ptens, vol = [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for k in range(NSTEPS):
            I.md_step(st, prov, k, flags)
            kin.append(I.kinetic_energy(st))
            ptens.append(I.pressure_tensor(st) / units.bar)
            vol.append(I.volume(st))
    return {
        "groups": groups,
        "nf": st.nf,
        "kin": np.array(kin)[BURN:],
        "ptens": np.array(ptens)[BURN:],
        "vol": np.array(vol)[BURN:],
    }


@pytest.mark.parametrize("thermostat", ["nhc", "bussi", "langevin"])
def test_nvt_kinetic_energy_is_canonical(run, thermostat):
    """<K> = nf kT / 2 and <(K - <K>)^2> = nf (kT)^2 / 2 (K is Gamma-distributed)."""
    g = run["groups"][thermostat]
    nf = run["nf"][g][0]
    kT = units.kB * T
    k = run["kin"][:, g] / (0.5 * nf * kT)  # 1 on average
    m, e = block_mean(k)
    v, ev = block_mean((k - 1) ** 2 / (2 / nf))  # 1 on average
    print(f"{thermostat}: nf {nf}, <K>/K0 {m:.3f} +- {e:.3f}, var/var0 {v:.3f} +- {ev:.3f}")
    assert abs(m - 1) < 4 * e and e < 0.05
    assert abs(v - 1) < 4 * ev and ev < 0.15


def test_npt_mean_pressure_and_volume_fluctuations(run):
    """<P_int> = P0, and the volume fluctuation equals the response: <dV^2> / kT = -d<V>/dP."""
    kT = units.kB * T
    piso = np.trace(run["ptens"], axis1=2, axis2=3) / 3
    vols = {}
    for p in (P0 - DP, P0, P0 + DP):
        g = run["groups"][p]
        m, e = block_mean(piso[:, g])
        print(f"P0 {p:.0f}: <P> {m:.0f} +- {e:.0f} bar, <V> {run['vol'][:, g].mean():.2f} A^3")
        assert abs(m - p) < 4 * e and e < 0.1 * P0
        vols[p] = block_mean(run["vol"][:, g])
    g = run["groups"][P0]
    v = run["vol"][:, g]
    kappa_fluct, e_fl = block_mean((v - v.mean()) ** 2 / (kT * v.mean()))
    dv = vols[P0 + DP][0] - vols[P0 - DP][0]
    kappa_resp = -dv / (2 * DP * units.bar) / v.mean()
    e_resp = np.hypot(vols[P0 + DP][1], vols[P0 - DP][1]) / (2 * DP * units.bar) / v.mean()
    print(
        f"compressibility (A^3/eV): fluctuation {kappa_fluct:.2f} +- {e_fl:.2f}, response {kappa_resp:.2f} +- {e_resp:.2f}"
    )
    assert abs(kappa_fluct - kappa_resp) < 4 * np.hypot(e_fl, e_resp)
    assert kappa_resp > 0 and np.hypot(e_fl, e_resp) < 0.3 * kappa_resp


@pytest.mark.parametrize("kind", ["aniso", "tri"])
def test_npt_flexible_cells_mean_stress(run, kind):
    """Diagonal pressures average to P0 in each direction; fully flexible: shear stresses to 0."""
    g = run["groups"][kind]
    p = run["ptens"][:, g]
    for a in range(3):
        m, e = block_mean(p[:, :, a, a])
        assert abs(m - P0) < 4 * e and e < 0.15 * P0, (a, m, e)
    if kind == "tri":
        for a, b in ((0, 1), (0, 2), (1, 2)):
            m, e = block_mean(0.5 * (p[:, :, a, b] + p[:, :, b, a]))
            assert abs(m) < 4 * e, (a, b, m, e)
