"""The MD step's integrator stages replayed as CUDA graphs (CuPy).

For small batched walkers the integrator is ~200 tiny launches per step (per-walker thermostat and
barostat arithmetic), so it costs the host's launch time (3-4 ms per step on an H100 for 256 x 108
atoms) rather than GPU time. ``GraphedStep`` captures the two stages around the force call
(``integrators.pre_force`` and ``post_force``) once, as CUDA graphs, and replays them: two graph
launches and a few copies per step instead of ~200 launches. Same kernels, same order, same numbers
as ``integrators.md_step`` (tests/test_md_graphs.py checks bit identity on a GPU).

How a replay stays valid:
- every array the stages read or write is a field of the state, at a fixed address: what a stage
  assigns to a field (``st.vel = ...``) is copied back into the field's original array at the end of
  the capture, and the field is restored; the forces, energies and virials of the force call are
  copied into fixed buffers before the second graph;
- the step (the RNG counter) is read from a 0-d device array filled before each replay;
- temporaries come from a private memory pool used only while capturing, so no other array ever
  gets their addresses;
- any change of the state's arrays or flags (walkers dropped, a resume) is seen by identity checks
  and the next step runs eagerly, the one after it is captured again.

Switched off by ``EngineSettings.fast`` without the family "graph" (``make_stepper``'s settings; the
``EnsembleProvider``'s ``settings`` are its ensemble's); a capture that fails switches it off for
the stepper with a warning and the steps run eagerly.
"""

from __future__ import annotations

from dataclasses import fields

from dpsnake.engine.settings import EngineContext, EngineSettings
from dpsnake.md import integrators, rng
from dpsnake.md.state import BatchState

_FIELDS = tuple(f.name for f in fields(BatchState) if f.name != "xp")
# fields a step replaces (md_step assigns new arrays); the others change only with a new state
_DYNAMIC = ("pos", "vel", "cells", "nhc_v", "nhc_eta", "energy", "force", "virial")


def make_stepper(xp, settings: EngineSettings | None = None):
    """``md_step``-compatible callable: ``GraphedStep()`` on CuPy when ``settings`` (default: the
    defaults) enable the family "graph", else ``md_step``."""
    ctx = EngineContext.of(settings)
    return GraphedStep(ctx) if ctx.fast(xp, "graph") else integrators.md_step


class GraphedStep:
    """Callable as ``integrators.md_step(st, compute, step, flags, all_models)``."""

    def __init__(self, ctx: EngineContext | None = None):
        import cupy

        self.ctx = EngineContext.of(ctx)  # "graph" in ctx.broken after a failed capture
        self.cp = cupy
        self.stream = cupy.cuda.Stream()  # capture needs a stream other than the legacy one
        self.pool = cupy.cuda.MemoryPool()
        self.graphs = None
        self.refs = None  # the state's arrays the graphs were captured with (held: ids stay unique)
        self.flags = None
        self.seen = None  # static arrays + flags of the last eager step (capture on the second sight)

    def __call__(self, st: BatchState, compute, step, flags: dict, all_models: bool = False) -> dict:
        if "graph" in self.ctx.broken:
            return integrators.md_step(st, compute, step, flags, all_models)
        if self.graphs is None or not self._valid(st, flags):
            self.graphs = self.refs = None
            if self.seen is None or not self._same(self.seen, st, flags):
                self.seen = ({f: getattr(st, f) for f in _FIELDS if f not in _DYNAMIC}, dict(flags))
                return integrators.md_step(st, compute, step, flags, all_models)
            if self.ctx.guarded("graph", self._capture, st, flags) is None:
                self.graphs = self.refs = None
                return integrators.md_step(st, compute, step, flags, all_models)
        self.step_dev.fill(step)
        self.graphs[0].launch(self.stream)
        out = compute(st, all_models)
        self.buf["energy"][...] = out["energy"][0]
        self.buf["force"][...] = out["force"][0]
        self.buf["virial"][...] = out["virial"][0].reshape(-1, 3, 3)
        self.graphs[1].launch(self.stream)
        return out

    @staticmethod
    def _arrays(st):
        return {f: getattr(st, f) for f in _FIELDS}

    @staticmethod
    def _same(seen, st, flags) -> bool:
        arrays, fl = seen
        return fl == flags and all(getattr(st, f) is a for f, a in arrays.items())

    def _valid(self, st, flags) -> bool:
        return self.flags == flags and all(getattr(st, f) is a for f, a in self.refs.items())

    def _capture(self, st: BatchState, flags: dict) -> bool:
        cp = self.cp
        # forces of the last eager step into fixed buffers that the second graph reads
        self.buf = {"energy": st.energy.copy(), "force": st.force.copy(), "virial": st.virial.reshape(-1, 3, 3).copy()}
        for k, v in self.buf.items():
            setattr(st, k, v)
        self.step_dev = cp.zeros((), dtype=cp.uint64)
        # the kernels of the device-step RNG path, compiled and loaded outside the capture
        rng.walker_keys(cp, st.seed, self.step_dev, rng.BUSSI)
        orig = self._arrays(st)
        mode = getattr(cp.cuda.runtime, "streamCaptureModeRelaxed", None)
        graphs = []
        with cp.cuda.using_allocator(self.pool.malloc), self.stream:
            for stage in (integrators.pre_force, integrators.post_force):
                self.stream.begin_capture() if mode is None else self.stream.begin_capture(mode)
                try:
                    stage(st, self.step_dev, flags)
                    for f, a in orig.items():  # results back into the fields' own arrays
                        if getattr(st, f) is not a:
                            a[...] = getattr(st, f)
                finally:  # nothing ran while capturing: the state is as before
                    for f, a in orig.items():
                        setattr(st, f, a)
                    g = self.stream.end_capture()
                graphs.append(g)
        self.stream.synchronize()
        self.graphs, self.refs, self.flags = graphs, orig, dict(flags)
        return True
