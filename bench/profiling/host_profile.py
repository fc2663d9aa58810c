"""Host (Python) time per function of batched force calls and of exploration steps, by cProfile.

The GPU runs behind the host in most of a batched call (bench/profiling/timeline_engine.py), so the host's
own time decides the wall time; this shows where it goes, without synchronising anything.
Prints the top functions by own time (tottime) for: ``--calls`` force calls on 256 x 108 atoms,
and, with ``--explore``, that many exploration steps (NPT) of the same batch.

    python bench/profiling/host_profile.py MODELS_DIR [--compress 2.0] [--calls 50] [--explore] [--top 30]
        [--set NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pathlib
import pstats
import sys
import tempfile
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/: bench_engine
from benchutil import add_settings_arg, engine_settings  # noqa: E402


def _report(prof, title, top, ncalls, by="tottime"):
    s = io.StringIO()
    st = pstats.Stats(prof, stream=s)
    total = st.total_tt
    print(f"\n## {title}: {1e3 * total / ncalls:.2f} ms host time per call (cProfile adds its own), by {by}\n")
    st.sort_stats(by).print_stats(top)
    print(s.getvalue())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models")
    ap.add_argument("--compress", type=float, default=None)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--explore", action="store_true")
    add_settings_arg(ap)
    args = ap.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)
    import cupy as cp
    from bench_engine import batch_frames

    from dpsnake.engine.deeppot import frames_to_flat
    from dpsnake.engine.ensemble import Ensemble

    comp = None if args.compress is None else {"min_nbor_dist": args.compress}
    models = [f"{args.models}/cu_float32_{k}/model.dp" for k in (1, 2, 3, 4)]
    settings = engine_settings(args.set)
    ens = Ensemble(models[:1], precision="mixed", compress=comp, settings=settings)
    c, b, t = batch_frames()
    flat = frames_to_flat(cp, cp.asarray(c), cp.asarray(b), cp.asarray(t))[:5]
    for _ in range(3):
        ens.evaluate(*flat)
    cp.cuda.Device().synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        ens.evaluate(*flat)
    prof.disable()
    cp.cuda.Device().synchronize()
    _report(prof, "force call, 1 model, 256 x 108 atoms", args.top, args.calls)
    if not args.explore:
        return
    from ase.build import bulk

    from dpsnake.md.explore import make_provider
    from dpsnake.md.explorer import Explorer
    from dpsnake.md.walkers import parse_walkers

    provider, tmap = make_provider(models, "mixed", cp, args.compress)
    e0 = provider.ensemble  # the same models with these settings (as bench_md.py does)
    provider.ensemble = Ensemble(e0.models, precision=e0.precision, xp=cp, compress=e0.compress, settings=settings)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="host_profile_"))
    bulk("Cu", "fcc", a=3.634, cubic=True).repeat(3).write(tmp / "cu.extxyz", format="extxyz")
    walkers = parse_walkers(
        [
            dict(
                name=f"w{k}",
                structure=str(tmp / "cu.extxyz"),
                ensemble="npt",
                temperature=300.0,
                pressure=1.0,
                nsteps=args.calls + 40,
                dt=0.001,
                trj_freq=10,
                seed=k,
            )
            for k in range(256)
        ]
    )
    ex = Explorer(walkers, provider, tmap, tmp / "run", xp=cp, progress=False, checkpoint_every=1e9, stop_after=20)
    ex.prepare()
    ex.loop()
    ex.stop_after = args.calls
    cp.cuda.Device().synchronize()
    prof = cProfile.Profile()
    prof.enable()
    ex.loop()
    prof.disable()
    cp.cuda.Device().synchronize()
    title = "exploration step, 256 walkers x 108 atoms, NPT, deviation every 10"
    _report(prof, title, args.top, args.calls)
    _report(prof, title, args.top, args.calls, by="cumulative")


if __name__ == "__main__":
    main()
