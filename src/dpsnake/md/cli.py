"""``dpsnake explore``: run all walkers of an iteration as one batch on the engine.

    dpsnake explore --models m0.dp m1.dp ... --walkers walkers.json --outdir DIR
                    [--device cpu|gpu|auto] [--precision double|mixed]

Model 0 drives every trajectory; all models are evaluated every ``trj_freq`` steps for the deviation.
Rerunning the same command resumes from DIR/checkpoint.npz; DIR/summary.json is written last.
"""

from __future__ import annotations

import pathlib

from dpsnake.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--models", nargs="+", required=True, help="ensemble models (.dp); the first drives MD")
    parser.add_argument("--walkers", required=True, help="walkers.json (see docs/md.md)")
    parser.add_argument("--outdir", required=True, help="output folder (per-walker folders, summary.json)")
    parser.add_argument("--device", choices=("cpu", "gpu", "auto"), default="auto",
                        help="cpu: NumPy; gpu: CuPy; auto: CuPy when a GPU is usable (default)")
    parser.add_argument("--precision", choices=("double", "mixed"), default="double",
                        help="engine precision (default double)")
    parser.add_argument("--compress", type=float, default=None, metavar="MIN_NBOR_DIST",
                        help="tabulate the embedding nets as `dp compress` does, for neighbours no "
                             "closer than MIN_NBOR_DIST (A; the training data's closest pair)")
    parser.add_argument("--checkpoint-every", type=float, default=300.0, metavar="SECONDS",
                        help="seconds between checkpoints (default 300)")
    parser.add_argument("--checkpoint-steps", type=int, default=None, metavar="N",
                        help="also checkpoint every N steps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def pick_xp(device: str):
    """numpy or cupy for --device; 'gpu' without a usable CuPy is a one-line error."""
    import numpy as np

    if device == "cpu":
        return np
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
        cupy.zeros(1).sum()
        return cupy
    except Exception as err:  # no CuPy, no driver, no device
        if device == "gpu":
            raise UserError(f"--device gpu: CuPy cannot use a GPU here ({type(err).__name__}: {err})") from None
        return np


def make_provider(model_paths, precision: str, xp, compress: float | None = None):
    """(EnsembleProvider, type_map) for the given model files; ``compress``: min_nbor_dist (A) to
    run tabulated embedding nets, or None."""
    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.engine.model import load_model
    from dpsnake.md.providers import EnsembleProvider

    models = []
    for p in model_paths:
        if not pathlib.Path(p).is_file():
            raise UserError(f"--models: file not found: {p}")
        models.append(load_model(p))
    ens = Ensemble(models, precision=precision, xp=xp,
                   compress=None if compress is None else {"min_nbor_dist": compress})
    return EnsembleProvider(ens), list(models[0].type_map)


def run(args) -> int:
    from dpsnake.md.runner import Explorer
    from dpsnake.md.walkers import load_walkers

    walkers = load_walkers(args.walkers)
    xp = pick_xp(args.device)
    provider, type_map = make_provider(args.models, args.precision, xp, args.compress)
    Explorer(walkers, provider, type_map, args.outdir, xp=xp, models=[str(pathlib.Path(m).resolve()) for m in args.models],
             checkpoint_every=args.checkpoint_every, checkpoint_steps=args.checkpoint_steps,
             progress=not args.no_progress).run()
    return 0
