"""Force providers: ``compute(state, all_models) -> {"energy" (M, S), "force" (M, N, 3), "virial" (M, S, 9)}``.

``EnsembleProvider`` drives MD with the engine (all walkers in one call). ``ASEProvider`` loops over
walkers with ASE calculators (e.g. EMT): a real potential that is independent of the engine, used
for statistical-mechanics checks of the integrators.
"""

from __future__ import annotations

import numpy as np

from dpsnake.engine.neighbor import pbc_axes
from dpsnake.engine.xp import asarray, to_numpy


class EnsembleProvider:
    """The engine's ``Ensemble``; model 0 alone on ordinary steps, all models on deviation steps."""

    def __init__(self, ensemble):
        self.ensemble = ensemble
        self.nmodels = len(ensemble.models) if hasattr(ensemble, "models") else None
        self.calls = 0
        self.overflow_calls = 0  # calls where some atom had more neighbours than sel (summary line)
        self._layout = None  # the batch's fixed arrays with their host copies (one per batch)

    @property
    def settings(self):
        """The ensemble's EngineSettings (None for an object without them), e.g. for
        ``graphs.make_stepper(xp, provider.settings)``."""
        return getattr(self.ensemble, "settings", None)

    def __call__(self, st, all_models: bool) -> dict:
        import warnings

        self.calls += 1
        idx = None if all_models else [0]
        with warnings.catch_warnings():  # one summary line at the end instead of a warning per step
            warnings.filterwarnings("ignore", message=".*more neighbours within rcut than sel", category=RuntimeWarning)
            kw = {}
            if hasattr(self.ensemble, "layout"):
                if self._layout is None or not self._layout.made_from(st.atype, st.system, st.pbc):
                    self._layout = self.ensemble.layout(st.atype, st.system, st.pbc)
                kw["layout"] = self._layout
            out = self.ensemble.evaluate(st.pos, st.atype, st.system, st.cells, st.pbc, model_indices=idx, **kw)
        self.overflow_calls += int(getattr(self.ensemble, "last_overflow", 0) > 0)
        return out


class ASEProvider:
    """ASE calculators (one per model) evaluated walker by walker on the host.

    type_map: symbols of the type indices. Virial = -stress * volume (eV), zero when not periodic.
    """

    def __init__(self, calculators, type_map):
        self.calcs = list(calculators)
        self.type_map = list(type_map)
        self.nmodels = len(self.calcs)

    def __call__(self, st, all_models: bool) -> dict:
        from ase import Atoms

        xp = st.xp
        pos, atype, system = to_numpy(st.pos), to_numpy(st.atype), to_numpy(st.system)
        cells = to_numpy(st.cells)
        pbc = pbc_axes(st.pbc, len(cells))  # (S, 3)
        calcs = self.calcs if all_models else self.calcs[:1]
        S, N = len(cells), len(pos)
        e = np.zeros((len(calcs), S))
        f = np.zeros((len(calcs), N, 3))
        v = np.zeros((len(calcs), S, 9))
        bounds = np.searchsorted(system, np.arange(S + 1))
        for s in range(S):
            lo, hi = bounds[s], bounds[s + 1]
            atoms = Atoms(
                [self.type_map[t] for t in atype[lo:hi]],
                positions=pos[lo:hi],
                cell=cells[s] if pbc[s].any() else None,
                pbc=pbc[s],
            )
            for m, calc in enumerate(calcs):
                atoms.calc = calc
                e[m, s] = atoms.get_potential_energy()
                f[m, lo:hi] = atoms.get_forces()
                if pbc[s].all():  # ASE's stress needs a volume: not for slabs, wires
                    v[m, s] = (-atoms.get_stress(voigt=False) * atoms.get_volume()).reshape(9)
        return {"energy": asarray(xp, e), "force": asarray(xp, f), "virial": asarray(xp, v)}
