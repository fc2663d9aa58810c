"""The exploration loop: all walkers in one batch, deviation every trj_freq, early stop, checkpoints.

Outputs per walker (``DIR/<name>/``): ``traj.extxyz`` and ``model_devi.out``, written as ``*.part``
while the walker runs and renamed when it stops, so a finished file is always complete.
``DIR/checkpoint.npz`` (written atomically) holds the batch state, walker statuses and the byte
lengths of the ``.part`` files; a rerun resumes from it (files are cut back to those lengths).
``DIR/summary.json`` is written last: it marks the whole exploration as done. A shard of a sharded
exploration (dpsnake.workflow.shards) keeps its checkpoint and summary in its own ``state_dir``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
import signal
import sys
import time

import numpy as np

from dpsnake.engine.xp import to_numpy
from dpsnake.fsio import open_atomic, write_json_atomic
from dpsnake.md import bias, integrators, ramps
from dpsnake.md.deviation import batch_deviation, min_distances
from dpsnake.md.graphs import make_stepper
from dpsnake.md.relax import step as relax_step
from dpsnake.md.relax import update_converged
from dpsnake.md.state import BatchState, start_state
from dpsnake.md.trajectory import DEVI_HEADER, encoded_rows
from dpsnake.md.walkers import Walker, read_structures

CHECKPOINT = "checkpoint.npz"
SUMMARY = "summary.json"


def _helper_init(parent: int) -> None:
    """In the frame helper: let go of the parent's stdout/stderr (a caller waiting for their end
    must not wait for the helper) and exit when the parent is gone (killed: no one to serve)."""
    import threading

    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _write_rows(pool, outs, bundle, devi) -> None:
    """Append a deviation step's model_devi.out lines and frames to the walkers' files ``outs``;
    formatted and encoded by the helper process ``pool`` (here if None or if it died). Runs in the
    explorer's writer thread (or inline without a helper), so the files' writes overlap the device;
    the thread then only writes bytes (little time holding the GIL the main thread launches with)."""
    data = None
    if pool is not None:
        try:
            data = pool.submit(encoded_rows, bundle, devi).result()
        except Exception:  # the helper process died: format here
            pass
    lines, frames = data if data is not None else encoded_rows(bundle, devi)
    for o, line, frame in zip(outs, lines, frames):
        o.files["devi"].write(line)
        o.files["traj"].write(frame)


_FILES = {"traj": "traj.extxyz", "devi": "model_devi.out", "bias": "bias.out"}


class _Out:
    """The growing output files of one walker (binary append; lengths known for checkpoints):
    frames, deviation lines and, for a biased walker, ``bias.out`` (step, CV, bias energy)."""

    def __init__(self, folder: pathlib.Path, offsets=None, biased=False):
        folder.mkdir(parents=True, exist_ok=True)
        keys = ("traj", "devi", "bias") if biased or "bias" in (offsets or {}) else ("traj", "devi")
        self.final = {k: folder / _FILES[k] for k in keys}
        self.part = {k: p.with_name(p.name + ".part") for k, p in self.final.items()}
        self.files = {}
        self.busy = None  # the writer thread's last task appending to the files (only it writes there)
        for k in keys:
            if offsets is None:
                self.part[k].unlink(missing_ok=True)
                self.final[k].unlink(missing_ok=True)
                head = {"devi": DEVI_HEADER, "bias": bias.BIAS_HEADER}.get(k, "")
                self.part[k].write_bytes(head.encode())
            else:
                if not self.part[k].exists() and self.final[k].exists():
                    os.replace(self.final[k], self.part[k])  # stopped after the last checkpoint
                os.truncate(self.part[k], offsets[k])
            self.files[k] = open(self.part[k], "ab")

    def wait(self) -> None:
        """Wait for the writer thread's last task appending to this walker's files."""
        if self.busy is not None:
            busy, self.busy = self.busy, None
            busy.result()

    def offsets(self) -> dict:
        self.wait()
        out = {}
        for k, f in self.files.items():
            f.flush()
            os.fsync(f.fileno())
            out[k] = f.tell()
        return out

    def close(self) -> None:
        self.wait()
        for k, f in self.files.items():
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(self.part[k], self.final[k])


# keys added to walkers later, at their defaults left out of the hash: the spec as before they existed
# (checkpoints of earlier versions stay usable)
_LATER = {"bias": None, "fmax": 0.05, "relax_cell": False, "maxstep": 0.2}


def spec_hash(walkers: list[Walker], models: list[str]) -> str:
    specs = [{k: v for k, v in dataclasses.asdict(w).items() if k not in _LATER or v != _LATER[k]} for w in walkers]
    blob = json.dumps([specs, [str(m) for m in models]], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


class Explorer:
    """Runs walkers as one batch with a force provider.

    provider(st, all_models) -> {"energy" (M, S), "force" (M, N, 3), "virial" (M, S, 9)} (model 0
    drives); type_map: the models' element symbols; xp: numpy or cupy. checkpoint_every: seconds
    between checkpoints; checkpoint_steps: also every this many steps (None: time only);
    state_dir: folder of checkpoint.npz and summary.json (default outdir; walker folders are in outdir).
    """

    def __init__(
        self,
        walkers,
        provider,
        type_map,
        outdir,
        xp=np,
        models=(),
        checkpoint_every=600.0,
        checkpoint_steps=None,
        progress=True,
        stop_after=None,
        async_frames=None,
        state_dir=None,
    ):
        self.walkers = list(walkers)
        # the walkers' biases between the provider and the integrator (dpsnake.md.bias)
        self.biased = any(w.bias for w in self.walkers)
        self.provider = bias.BiasedProvider(provider) if self.biased else provider
        self.type_map = list(type_map)
        self.outdir = pathlib.Path(outdir)
        self.state_dir = self.outdir if state_dir is None else pathlib.Path(state_dir)
        self.xp = xp
        self.hash = spec_hash(self.walkers, list(models))
        self.checkpoint_every = checkpoint_every
        self.checkpoint_steps = checkpoint_steps
        self.progress = progress
        self.stop_after = stop_after  # testing/benchmarks: return after this many steps (as a kill would)
        self._term = False
        # frames are formatted in a helper process on GPUs: formatting 256 x 108 atoms takes ~70 ms
        # of host time, during which the GPU would wait (async_frames None: on for CuPy)
        if async_frames is None:
            async_frames = getattr(xp, "__name__", "") == "cupy"
        self.async_frames = async_frames
        self._pool = None
        self._writer = None
        # CUDA graphs of the integrator stages on CuPy, unless the engine settings leave out family 'graph'
        self._md_step = make_stepper(xp, getattr(provider, "settings", None))
        self._pending = []  # deviation steps whose host part is still to run
        self._hcache = None
        self._copy_stream = None

    # ---------------------------------------------------------------- setup
    def _fresh(self):
        self.step = 0
        self.status = {w.name: {"status": "running", "reason": None, "steps": 0} for w in self.walkers}
        self.cap_count = {w.name: 0 for w in self.walkers}
        self.max_devi = {w.name: 0.0 for w in self.walkers}
        self.st = start_state(self.walkers, self.structures, self.xp)
        self.outs = {w.name: _Out(self.outdir / w.name, biased=bool(w.bias)) for w in self.walkers}
        if self.biased:
            self.provider.step = 0
        out = self.provider(self.st, True)
        integrators.set_forces(self.st, out)
        update_converged(self.st)  # relax walkers: already relaxed at the start?
        self._deviation_step(out)

    def _resume(self, path: pathlib.Path) -> bool:
        """Load the checkpoint; False (start over) if it belongs to other inputs or cannot be used."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("hash") != self.hash:
                    print(f"dpsnake explore: {path} is from other walkers or models; starting over", file=sys.stderr)
                    return False
                arrays = {k[2:]: z[k] for k in z.files if k.startswith("s_")}
            for n, o in meta["offsets"].items():
                for k in o:
                    final = _FILES[k]
                    f = self.outdir / n / final
                    part = f.with_name(final + ".part")
                    size = part.stat().st_size if part.exists() else f.stat().st_size
                    if size < o[k]:
                        raise ValueError(f"{part} is shorter than the checkpoint says")
        except (OSError, KeyError, ValueError) as err:
            print(f"dpsnake explore: cannot resume from {path} ({err}); starting over", file=sys.stderr)
            return False
        self.step = meta["step"]
        self.status, self.cap_count, self.max_devi = meta["status"], meta["cap_count"], meta["max_devi"]
        self.st = BatchState.from_host(arrays, xp=self.xp) if arrays else None
        self.outs = {n: _Out(self.outdir / n, offsets=o) for n, o in meta["offsets"].items()}
        return True

    # ---------------------------------------------------------------- per deviation step
    # A deviation step has a device part (deviation columns, finiteness, snapshots of positions and
    # cells) queued at once, and a host part (files, stop checks) that the loop runs one step later,
    # while the device computes the next force call; anything that needs the statuses (a walker's
    # last step, a checkpoint, leaving) runs it at once.
    def _deviation_step(self, out) -> None:
        """Frames, deviation lines and stop checks of the walkers due at ``self.step``, now."""
        self._start_deviation(out)
        self._finish_deviations()

    def _host(self) -> dict:
        """Host copies of the state's fixed arrays (walker, natoms, pbc, atype), kept per state."""
        st = self.st
        if self._hcache is None or self._hcache[0] is not st.walker:
            h = {k: to_numpy(getattr(st, k)) for k in ("walker", "natoms", "pbc", "atype")}
            h["bounds"] = np.concatenate([[0], np.cumsum(h["natoms"])])  # atom offsets of the walkers
            h["symbols"] = np.array(self.type_map)[h["atype"]]
            self._hcache = (st.walker, h)
        return self._hcache[1]

    def _start_deviation(self, out) -> None:
        """Queue the device work of the deviation step ``self.step`` (no host synchronisation)."""
        st, xp, step, h = self.st, self.xp, self.step, self._host()
        widx = h["walker"]
        due = np.array([step % self.walkers[i].trj_freq == 0 for i in widx])
        dev, event = None, None
        if due.any():
            devi = batch_deviation(xp, out, st.system, st.natoms, st.nsys)
            finite = xp.isfinite(integrators.segsum(st, (st.pos + st.vel).sum(axis=1))) & xp.isfinite(st.energy)
            # every model's numbers, not only the driving one's: NaN in any model is a failed walker,
            # never a NaN row in model_devi.out
            finite &= xp.isfinite(devi).all(axis=1) & xp.isfinite(out["energy"]).all(axis=0)
            finite &= xp.isfinite(st.cells.reshape(-1, 9)).all(axis=1)
            need_md = any(self.walkers[i].min_dist for i in widx[due])
            dev = {"devi": devi, "finite": finite, "pos": st.pos.copy(), "cells": st.cells.copy()}
            dev["relaxed"] = st.fire_conv.copy()  # relax walkers below fmax: finished after this frame
            dev["fire_k"] = st.fire_k.copy()
            if st.b_out is not None:
                dev["bias"] = st.b_out.copy()
            if need_md:
                dev["mind"] = min_distances(xp, st.pos, st.cells, st.pbc, h["natoms"])
            if xp is not np:
                event = xp.cuda.Event()
                event.record()
        self._pending.append((step, widx, due, dev, event, h))

    def _to_host(self, dev: dict, event) -> dict:
        if event is None:
            return {k: to_numpy(v) for k, v in dev.items()}
        # a non-blocking stream: the copies wait for this step's event only, not for the force call
        # queued since on the default stream
        if self._copy_stream is None:
            self._copy_stream = self.xp.cuda.Stream(non_blocking=True)
        self._copy_stream.wait_event(event)
        return {k: v.get(stream=self._copy_stream) for k, v in dev.items()}

    def _finish_deviations(self, before=None) -> None:
        """The host part of the queued deviation steps (those before step ``before``; all if None)."""
        while self._pending and (before is None or self._pending[0][0] < before):
            step, widx, due, dev, event, h = self._pending.pop(0)
            if dev is not None:
                self._write_due(step, widx, due, self._to_host(dev, event), h)
            for i in widx:
                w = self.walkers[i]
                if self.status[w.name]["status"] == "running" and step >= w.nsteps:
                    self.status[w.name].update(status="finished", steps=step)
                    if w.ensemble == "relax":  # its frames are still candidates; the report says why it stopped
                        self.status[w.name]["reason"] = f"not relaxed below {w.fmax:g} eV/A in {w.nsteps} steps"

    def _write_due(self, step, widx, due, dev: dict, h: dict) -> None:
        """Statuses, model_devi.out lines and frames of a deviation step (host part)."""
        rows = self._update_status(step, widx, due, dev)
        if not len(rows):
            return
        outs = [self.outs[self.walkers[widx[s]].name] for s in rows]
        if "bias" in dev:  # small: written here (the writer thread writes only traj and devi)
            for o, s in zip(outs, rows):
                if "bias" in o.files:
                    row = f"{step:12d} {dev['bias'][s, 0]:17.10e} {dev['bias'][s, 1]:17.10e}\n"
                    o.files["bias"].write(row.encode())
        bundle = (h["symbols"], dev["pos"], dev["cells"], h["pbc"], step, h["bounds"], rows)
        if self._frame_pool() is None:
            _write_rows(None, outs, bundle, dev["devi"][rows])
        else:  # lines and frames written by the writer thread (frames formatted by the helper
            # process): ~3 MB of file writes per step at 256 walkers overlap the device's work
            task = self._writer.submit(_write_rows, self._pool, outs, bundle, dev["devi"][rows])
            for o in outs:
                o.busy = task

    def _update_status(self, step, widx, due, dev: dict) -> np.ndarray:
        """Stop checks of the due walkers; returns the rows (walker positions in the batch) whose
        frame and deviation line are written this step (running, finite numbers)."""
        devi, finite, mind = dev["devi"], dev["finite"], dev.get("mind")
        rows = []
        for s in np.nonzero(due)[0]:
            w = self.walkers[widx[s]]
            rec = self.status[w.name]
            if rec["status"] != "running":  # stopped at an earlier deviation step, not yet dropped
                continue
            rec["steps"] = step
            if not finite[s]:
                rec.update(status="failed", reason=f"non-finite numbers (NaN/inf) at step {step}")
                continue
            rows.append(s)
            self.max_devi[w.name] = max(self.max_devi[w.name], float(devi[s, 3]))
            if w.min_dist and mind[s] < w.min_dist:
                rec.update(
                    status="failed",
                    reason=f"atoms closer than min_dist {w.min_dist} A ({mind[s]:.3f} A) at step {step}",
                )
                continue
            if dev["relaxed"][s]:
                rec.update(
                    status="finished",
                    reason=f"relaxed: forces below {w.fmax:g} eV/A after {dev['fire_k'][s]} FIRE steps",
                )
                continue
            if w.max_devi_f_cap:
                self.cap_count[w.name] = self.cap_count[w.name] + 1 if devi[s, 3] > w.max_devi_f_cap else 0
                if self.cap_count[w.name] >= w.max_devi_f_patience:
                    rec.update(
                        status="failed",
                        reason=(
                            f"max_devi_f above cap {w.max_devi_f_cap} eV/A for {self.cap_count[w.name]} "
                            f"consecutive checks (last at step {step})"
                        ),
                    )
        return np.asarray(rows, dtype=np.int64)

    def _frame_pool(self):
        """The helper process formatting frames (None: format here)."""
        if self.async_frames and self._pool is None:
            try:
                ctx = multiprocessing.get_context("spawn")  # no fork of a process holding a CUDA context
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    1, mp_context=ctx, initializer=_helper_init, initargs=(os.getpid(),)
                )
                self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dpsnake-frames")
            except (OSError, ValueError) as err:
                print(f"dpsnake explore: no helper process for frames ({err}); formatting inline", file=sys.stderr)
                self.async_frames = False
        return self._pool

    def _drop_stopped(self) -> None:
        widx = self._host()["walker"]
        keep = np.array([self.status[self.walkers[i].name]["status"] == "running" for i in widx])
        for i in widx[~keep]:
            self.outs[self.walkers[i].name].close()
        if not keep.all():
            self.st = self.st.select(keep) if keep.any() else None

    # ---------------------------------------------------------------- checkpoints
    def checkpoint(self) -> None:
        if self._pending:  # statuses and files complete up to self.step
            self._finish_deviations()
            if self.st is not None:
                self._drop_stopped()
        path = self.state_dir / CHECKPOINT
        offsets = {n: o.offsets() for n, o in self.outs.items() if self.status[n]["status"] == "running"}
        meta = {
            "version": 1,
            "hash": self.hash,
            "step": self.step,
            "status": self.status,
            "cap_count": self.cap_count,
            "max_devi": self.max_devi,
            "offsets": offsets,
        }
        arrays = {} if self.st is None else {f"s_{k}": v for k, v in self.st.to_host().items()}
        with open_atomic(path, "wb", fsync=True) as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
        self._last_ckpt = (time.monotonic(), self.step)

    def _on_term(self, signum, frame):  # SLURM sends SIGTERM before the kill: save and leave
        self._term = True

    # ---------------------------------------------------------------- main loop
    def run(self) -> dict:
        """Run (or resume) to the end; returns the summary dict (also written to DIR/summary.json)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        summary_path = self.state_dir / SUMMARY
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            self._print_table(summary)
            return summary
        ck = self.prepare()
        old = signal.signal(signal.SIGTERM, self._on_term) if _main_thread() else None
        try:
            done = self.loop()
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)
        if not done:
            self.checkpoint()
            if self._term:
                raise SystemExit(143)
            return {}
        summary = {
            "walkers": {
                w.name: {
                    "status": self.status[w.name]["status"],
                    "reason": self.status[w.name]["reason"],
                    "steps": int(self.status[w.name]["steps"]),
                }
                for w in self.walkers
            }
        }
        self.checkpoint()  # all stopped: a rerun before summary.json lands finds nothing left to do
        write_json_atomic(summary_path, summary, fsync=True)
        ck.unlink(missing_ok=True)
        self._print_table(summary)
        return summary

    def prepare(self) -> pathlib.Path:
        """Read structures; resume from the checkpoint or start (step 0 evaluated and written)."""
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.structures = read_structures(self.walkers, self.type_map)
        ck = self.state_dir / CHECKPOINT
        if ck.exists() and self._resume(ck):
            print(f"dpsnake explore: resumed from {ck} at step {self.step}", file=sys.stderr, flush=True)
        else:
            self._fresh()
            self._drop_stopped()
        self._last_ckpt = (time.monotonic(), self.step)
        return ck

    def loop(self) -> bool:
        """Advance until every walker has stopped (True) or a stop was requested (False)."""
        from tqdm import tqdm

        total = max(w.nsteps for w in self.walkers)
        bar = tqdm(
            total=total,
            initial=self.step,
            unit="step",
            disable=not self.progress,
            file=sys.stderr,
            desc="explore",
            dynamic_ncols=True,
        )
        flags = self.st.flags() if self.st is not None else None
        freqs = None
        steps_run = 0
        try:
            while self.st is not None:
                if freqs is None:
                    active = [self.walkers[i] for i in self._host()["walker"]]
                    freqs = sorted({w.trj_freq for w in active})
                    ends = {w.nsteps for w in active}
                nxt = self.step + 1
                all_models = any(nxt % f == 0 for f in freqs)
                if self.biased:
                    self.provider.step = nxt  # the step of this force call's positions (steered, metadynamics)
                stepper = relax_step if flags["relax"] else self._md_step  # relax walkers: FIRE (eager)
                out = stepper(self.st, self.provider, self.step, flags, all_models)
                self.step = nxt
                steps_run += 1
                if all_models or nxt in ends:
                    self._start_deviation(out)
                t0, s0 = self._last_ckpt
                ckpt = time.monotonic() - t0 > self.checkpoint_every or (
                    self.checkpoint_steps and self.step - s0 >= self.checkpoint_steps
                )
                leave = self._term or (self.stop_after is not None and steps_run >= self.stop_after)
                if self._pending and self._pending[0][0] < self.step or nxt in ends or ckpt or leave:
                    # the host part of the last deviation step runs while the device computes this
                    # step's force call; a walker's end, a checkpoint or leaving need it at once
                    n0 = self.st.nsys
                    self._finish_deviations(None if (nxt in ends or ckpt or leave) else self.step)
                    self._drop_stopped()
                    if self.st is None or self.st.nsys != n0:
                        flags = self.st.flags() if self.st is not None else None
                        freqs = None
                    bar.update(self.step - bar.n)
                if self.st is not None and ckpt:
                    self.checkpoint()
                if leave:
                    return self.st is None
        finally:
            bar.close()
        return True

    def _print_table(self, summary: dict) -> None:
        rows = [("walker", "system", "ensemble", "T/K", "P/bar", "steps", "status", "max_devi_f", "reason")]
        for w in self.walkers:
            r = summary["walkers"].get(w.name, {})
            md = getattr(self, "max_devi", {}).get(w.name)
            rows.append(
                (
                    w.name,
                    w.system,
                    w.ensemble,
                    ramps.label(w.temperature_ramp) if w.temperature_ramp else f"{w.temperature:g}",
                    (ramps.label(w.pressure_ramp) if w.pressure_ramp else f"{w.pressure:g}") if w.barostat else "-",
                    str(r.get("steps", "")),
                    str(r.get("status", "")),
                    "-" if md is None else f"{md:.3g}",
                    r.get("reason") or "",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * wd for wd in widths))
        n_ok = sum(1 for r in summary["walkers"].values() if r["status"] == "finished")
        print("\n".join(lines) + f"\n{n_ok}/{len(summary['walkers'])} walkers finished", file=sys.stderr)
        n_ov = getattr(self.provider, "overflow_calls", 0)
        if n_ov:
            print(
                f"note: in {n_ov} of {self.provider.calls} force calls some atoms had more neighbours than "
                "the models' sel (extra neighbours dropped, as DeePMD-kit does)",
                file=sys.stderr,
            )


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
