"""``dpsnake explore``: run all walkers of an iteration as one batch on a force provider.

    dpsnake explore --models m0.dp m1.dp ... --walkers walkers.json --outdir DIR
                    [--engine auto|builtin|deepmd] [--device cpu|gpu|auto] [--precision double|mixed]
                    [--compress MIN_NBOR_DIST | --compress auto --compress-data DIR ...]
                    [--shard K --shards-file explore/shards.json]

Model 0 drives every trajectory; all models are evaluated every ``trj_freq`` steps for the deviation.
Rerunning the same command resumes from DIR/checkpoint.npz; DIR/summary.json is written last.
With ``--shard K`` only shard K's walkers run (dpsnake.workflow.shards); its checkpoint, summary.json
and engine.json are in DIR/shards/shard.K/, the walker folders in DIR as without shards.
"""

from __future__ import annotations

import pathlib

from dpsnake.errors import UserError


def add_compile_arguments(parser) -> None:
    """--compile and --compile-cache (DPA-3 through torch.compile), as explore and explore-warmup take them."""
    parser.add_argument(
        "--compile",
        nargs="?",
        const="on",
        default="off",
        choices=("on", "auto", "off"),
        help="engine deepmd: DPA-3 models' repflow layers through torch.compile (2.4x per force call on a GPU; "
        "the first call compiles, ~75 s on an H200, or loads them from --compile-cache; a failure falls back "
        "to TorchScript); --compile = on; auto: on a GPU only; no effect on other models",
    )
    parser.add_argument(
        "--compile-cache",
        default=None,
        metavar="DIR",
        help="with --compile: TorchInductor's on-disk cache folder (TORCHINDUCTOR_CACHE_DIR); a later job "
        "with the same folder loads the compiled layers instead of compiling them (default: TorchInductor's "
        "own, in the system's temporary folder)",
    )


def add_arguments(parser) -> None:
    parser.add_argument("--models", nargs="+", required=True, help="ensemble models (.dp); the first drives MD")
    parser.add_argument("--walkers", required=True, help="walkers.json (see docs/md.md)")
    parser.add_argument("--outdir", required=True, help="output folder (per-walker folders, summary.json)")
    parser.add_argument(
        "--engine",
        choices=("auto", "builtin", "deepmd"),
        default="auto",
        help="builtin: dpsnake's engine (se_e2_a); deepmd: DeePMD-kit's PyTorch models "
        "(every energy model); auto: builtin where it runs every model (default)",
    )
    parser.add_argument("--head", default=None, help="branch of multitask .pt checkpoints (engine deepmd)")
    parser.add_argument(
        "--device",
        choices=("cpu", "gpu", "auto"),
        default="auto",
        help="cpu: NumPy; gpu: CuPy; auto: CuPy when a GPU is usable (default)",
    )
    parser.add_argument(
        "--precision", choices=("double", "mixed"), default="double", help="engine precision (default double)"
    )
    parser.add_argument(
        "--tf32",
        action="store_true",
        help="with --precision mixed on a GPU: FP32 GEMMs on TF32 tensor cores (se_e2_a: the fitting nets; "
        "se_atten: the attention and nets; faster; accuracy in docs/benchmarks.md)",
    )
    add_compile_arguments(parser)
    parser.add_argument(
        "--compress",
        default=None,
        metavar="MIN_NBOR_DIST",
        help="tabulate the embedding nets as `dp compress` does, for neighbours no "
        "closer than MIN_NBOR_DIST (A), or 'auto': the closest pair of --compress-data",
    )
    parser.add_argument(
        "--compress-data",
        nargs="+",
        default=None,
        metavar="DIR",
        help="deepmd/npy datasets (folders with type.raw, searched below DIR) for --compress auto",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="seconds between checkpoints (default 300)",
    )
    parser.add_argument("--checkpoint-steps", type=int, default=None, metavar="N", help="also checkpoint every N steps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--shard",
        type=int,
        default=None,
        metavar="K",
        help="run only shard K of --shards-file (on a node with several GPUs: GPU K modulo their count)",
    )
    parser.add_argument("--shards-file", default=None, help="shards.json of `dpsnake plan` (with --shard)")
    parser.add_argument(
        "--async-frames",
        choices=("auto", "on", "off"),
        default="auto",
        help="format trajectory frames in a helper process (auto: on GPUs, where the host would "
        "otherwise hold the device up; same files either way)",
    )


def pick_xp(device: str, shard: int | None = None):
    """numpy or cupy for --device; 'gpu' without a usable CuPy is a one-line error. A shard on a
    job that sees several GPUs takes GPU ``shard`` modulo their count (a SLURM job that asked for one
    GPU sees one)."""
    import numpy as np

    if device == "cpu":
        return np
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
        if shard is not None and count > 1:
            cupy.cuda.Device(shard % count).use()
        cupy.zeros(1).sum()
        return cupy
    except Exception as err:  # no CuPy, no driver, no device
        if device == "gpu":
            raise UserError(f"--device gpu: CuPy cannot use a GPU here ({type(err).__name__}: {err})") from None
        return np


# A (the DeePMD-kit provider's default, half LAMMPS's metal-units one): the CPU demo's 600 NPT steps rebuilt
# the kept neighbour candidates 11 times at 300-600 K and 32 times at 900-1200 K
MD_SKIN = 1.0


def make_provider(model_paths, precision: str, xp, compress: float | None = None, tf32: bool = False):
    """(EnsembleProvider, type_map) for the given model files (or models already loaded with
    ``load_model`` / ``load_any``: se_e2_a or se_atten(_v2)); ``compress``: min_nbor_dist (A) to run tabulated embedding nets, or None;
    ``tf32``: the engine setting (FP32 GEMMs on TF32 tensor cores, CuPy only). On CPUs the ensemble
    keeps its neighbour candidates between steps (settings ``skin`` :data:`MD_SKIN`)."""
    from dpsnake.engine.dispatch import load_any, make_ensemble
    from dpsnake.engine.settings import EngineSettings
    from dpsnake.md.providers import EnsembleProvider

    models = []
    for p in model_paths:
        if isinstance(p, (str, pathlib.Path)) and not pathlib.Path(p).is_file():
            raise UserError(f"--models: file not found: {p}")
        models.append(load_any(p))
    ens = make_ensemble(
        models,
        precision=precision,
        xp=xp,
        compress=None if compress is None else {"min_nbor_dist": compress},
        tf32=tf32,
        settings=EngineSettings(skin=MD_SKIN) if xp.__name__ == "numpy" else None,
    )
    return EnsembleProvider(ens), list(models[0].type_map)


def min_nbor_dist(paths) -> float:
    """Closest interatomic distance (A, minimum image) over every frame of the deepmd/npy datasets
    found at or below ``paths``: what `dp compress` tabulates from (DeePMD-kit's min_nbor_dist)."""
    import dpdata
    import numpy as np

    from dpsnake.md.deviation import min_distances

    folders = []
    for p in map(pathlib.Path, paths):
        if not p.exists():
            raise UserError(f"--compress-data: not found: {p}")
        folders += [p] if (p / "type.raw").is_file() else sorted(t.parent for t in p.rglob("type.raw"))
    best = np.inf
    for f in folders:
        s = dpdata.System(str(f), fmt="deepmd/npy")
        nf, na = s.get_nframes(), s.get_natoms()
        if nf == 0 or na < 2:
            continue
        pbc = np.full(nf, not s.nopbc)
        cells = s["cells"] if not s.nopbc else np.tile(np.eye(3), (nf, 1, 1))
        d = min_distances(np, s["coords"].reshape(-1, 3), cells, pbc, np.full(nf, na))
        best = min(best, float(d.min()))
    if not np.isfinite(best):
        raise UserError(f"--compress auto: no frames with two or more atoms in {' '.join(map(str, paths))}")
    return best


def compress_distance(value, data) -> float | None:
    """--compress as a distance: a number, or 'auto' (min_nbor_dist of --compress-data); None: off."""
    if value is None:
        return None
    if value == "auto":
        if not data:
            raise UserError("--compress auto needs --compress-data (the training datasets)")
        d = min_nbor_dist(data)
        print(f"dpsnake explore: tabulated embedding nets, min_nbor_dist {d:.4f} A from the training data")
        return d
    try:
        return float(value)
    except ValueError:
        raise UserError(f"--compress: {value!r} is neither a distance (A) nor 'auto'") from None


def compile_on(mode: str, xp) -> bool:
    """Whether --compile ``mode`` ("on", "auto", "off") compiles DPA-3 models on ``xp``: auto on GPUs only
    (on a CPU torch.compile's C++ build takes longer than most explore jobs win back)."""
    return mode == "on" or (mode == "auto" and xp.__name__ == "cupy")


def run(args) -> int:
    from dpsnake.fsio import write_json_atomic
    from dpsnake.md.engines import choose
    from dpsnake.md.explorer import Explorer
    from dpsnake.md.walkers import load_walkers

    walkers = load_walkers(args.walkers)
    out = pathlib.Path(args.outdir)
    state = out
    if (args.shard is None) != (args.shards_file is None):
        raise UserError("--shard and --shards-file go together")
    if args.shard is not None:
        from dpsnake.workflow.shards import shard_walkers, state_dir

        names = set(shard_walkers(args.shards_file, args.shard))
        unknown = sorted(names - {w.name for w in walkers})
        if unknown:
            raise UserError(f"--shards-file {args.shards_file}: walker '{unknown[0]}' is not in {args.walkers}")
        walkers = [w for w in walkers if w.name in names]
        state = state_dir(out, args.shard)
    for p in args.models:
        if not pathlib.Path(p).is_file():
            raise UserError(f"--models: file not found: {p}")
    engine, reason, loaded = choose(args.engine, args.models)
    xp = pick_xp(args.device, args.shard)
    print(
        f"dpsnake explore: engine {engine} ({reason}); device {'gpu' if xp.__name__ == 'cupy' else 'cpu'}"
        + ("" if args.shard is None else f"; shard {args.shard}: {len(walkers)} walkers"),
        flush=True,
    )
    precision = "as trained"  # engine deepmd: DeePMD-kit's models run in their own precision
    if engine == "deepmd":
        from dpsnake.md.deepmd_provider import DeepmdProvider

        ignored = [
            o
            for o, on in (
                ("--compress", args.compress is not None),
                ("--precision mixed", args.precision == "mixed"),
                ("--tf32", args.tf32),
            )
            if on
        ]
        if ignored:
            print(
                f"dpsnake explore: {', '.join(ignored)}: built-in engine options, ignored by DeePMD-kit's "
                "models (they run in the precision they were trained in)",
                flush=True,
            )
        compiling = compile_on(args.compile, xp)
        if compiling and args.compile_cache:
            from dpsnake.md.deepmd_provider import use_compile_cache

            print(f"dpsnake explore: --compile: cache {use_compile_cache(args.compile_cache)}", flush=True)
        # compile None: DPSNAKE_DEEPMD_COMPILE decides (the benchmarks' switch)
        provider = DeepmdProvider(args.models, xp, head=args.head, compile=True if compiling else None)
        if compiling:
            print(f"dpsnake explore: --compile: {provider.compiled} of {len(args.models)} models compiled", flush=True)
        type_map = provider.type_map
    else:
        if args.compile == "on":
            print("dpsnake explore: --compile: an option of engine deepmd, ignored by the built-in engine", flush=True)
        compress = compress_distance(args.compress, args.compress_data)
        provider, type_map = make_provider(loaded, args.precision, xp, compress, tf32=args.tf32)
        ens = provider.ensemble  # the engine says where its TF32 setting applies (mixed: FP32 GEMMs)
        tf32 = ens.ctx.tf32_on(xp, "float32" if ens.precision == "mixed" else "float64")
        if args.tf32 and not tf32:
            print("dpsnake explore: --tf32: TF32 needs --precision mixed on a GPU; ignored here", flush=True)
        precision = args.precision + (" + TF32" if tf32 else "")
    state.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        state / "engine.json",
        {
            "engine": engine,
            "reason": reason,
            "device": "gpu" if xp.__name__ == "cupy" else "cpu",
            "precision": precision,
            "requested": args.engine,
        },
    )
    Explorer(
        walkers,
        provider,
        type_map,
        args.outdir,
        xp=xp,
        models=[str(pathlib.Path(m).resolve()) for m in args.models],
        checkpoint_every=args.checkpoint_every,
        checkpoint_steps=args.checkpoint_steps,
        progress=not args.no_progress,
        async_frames={"auto": None, "on": True, "off": False}[args.async_frames],
        state_dir=state,
    ).run()
    if engine == "deepmd" and provider.compiled:
        from dpsnake.md.deepmd_provider import compile_cache_counts

        n = compile_cache_counts()
        print(
            f"dpsnake explore: torch.compile: {n['loaded']} graphs loaded from the cache, {n['compiled']} compiled"
            + (f" ({n['uncacheable']} not storable in the cache)" if n["uncacheable"] else "")
        )
    return 0
