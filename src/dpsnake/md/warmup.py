"""``dpsnake explore-warmup``: compile the exploration's GPU kernels while iteration 0 trains.

    dpsnake explore-warmup --config results/config.json --walkers explore/walkers.json --out explore/warmup.json
                           [--engine ...] [--device ...] [--precision ...] [--tf32] [--compress ...]
                           [--compile on|auto --compile-cache results/cache/torchinductor]

The built-in engine's CUDA kernels are generated per network shape and compiled by CuPy (NVRTC) the first
time they run, then kept in CuPy's kernel cache on disk (``CUPY_CACHE_DIR``, default
``~/.cupy/kernel_cache``); on a new machine the first exploration job spends ~20 s compiling (H200,
the demo's model; docs/benchmarks.md). The kernels depend on the architecture and the walkers, not on the
weights: this command builds an untrained model of the architecture iteration 0 trains (DeePMD-kit's own
``deepmd.dpmodel`` from the config's ``train.input.model``, normalized as ``dp train`` does) and runs the
iteration's walkers for two deviation intervals with an ensemble of ``train.numb_models`` copies of it, as
``dpsnake explore`` would, in a scratch folder of the system's temporary directory: every kernel the
exploration uses is in the cache by the time the trained models are there.

With ``explore.compile`` (engine deepmd, DPA-3) the same holds for torch.compile: TorchInductor's graphs
do not depend on the weights either, and the untrained model's land in ``--compile-cache``, where the
exploration jobs load them (H200: an explore job's first call 74.6 s compiling, 31.2 s from the cache).
The untrained model is written by a child process (:func:`untrained_model_in_child`, which says why).

A warm-up never fails the run: no GPU, engine deepmd without compile, or any error is written to
``--out`` as ``skipped`` (with the reason; an error's traceback also goes to the log) and the command exits 0
(the exploration then compiles its kernels itself, as without the warm-up).
"""

from __future__ import annotations

import copy
import os
import pathlib
import shutil
import tempfile
import time
import traceback

STEP_INTERVALS = 2  # deviation intervals per walker: the deviation kernels run at least twice


def add_arguments(parser) -> None:
    from dpsnake.md.explore import add_compile_arguments

    parser.add_argument("--config", required=True, help="the run's resolved config (results/config.json)")
    parser.add_argument("--walkers", required=True, help="walkers.json of the iteration (dpsnake plan)")
    parser.add_argument("--out", required=True, help="warmup.json: what was compiled, or why nothing was")
    parser.add_argument("--engine", choices=("auto", "builtin", "deepmd"), default="auto")
    parser.add_argument("--device", choices=("cpu", "gpu", "auto"), default="auto")
    parser.add_argument("--precision", choices=("double", "mixed"), default="double")
    parser.add_argument("--tf32", action="store_true")
    add_compile_arguments(parser)
    parser.add_argument("--compress", default=None, metavar="MIN_NBOR_DIST")
    parser.add_argument("--compress-data", nargs="+", default=None, metavar="DIR")


def kernel_cache_dir() -> pathlib.Path:
    """CuPy's on-disk kernel cache (cupy/cuda/compiler.py's default)."""
    return pathlib.Path(os.environ.get("CUPY_CACHE_DIR") or os.path.expanduser("~/.cupy/kernel_cache"))


def untrained_model(cfg: dict, path: pathlib.Path) -> pathlib.Path:
    """Write to ``path`` (.dp) a model of the architecture iteration 0 trains (a fine-tuned run: the
    pretrained model's), with DeePMD-kit's initial weights."""
    import deepmd
    from deepmd.dpmodel.model.model import get_model
    from deepmd.dpmodel.utils.serialization import save_dp_model

    from dpsnake.workflow.train_input import check_train

    model_params = check_train(copy.deepcopy(cfg))
    model = get_model(copy.deepcopy(model_params))
    save_dp_model(
        str(path),
        {
            "model": model.serialize(),
            "model_def_script": model_params,
            "software": "deepmd-kit",
            "version": deepmd.__version__,
        },
    )
    return path


def untrained_model_in_child(cfg: dict, path: pathlib.Path) -> pathlib.Path:
    """:func:`untrained_model` in a child process. Why: on the H200, a process that had built DeePMD-kit's
    NumPy model before compiling DPA-3's layers stored its graphs under other TorchInductor keys than the
    explore jobs, which only load models (the weights' entries of the keys differed), so the exploration
    compiled them again."""
    import json
    import subprocess
    import sys

    code = (
        "import json, pathlib, sys\n"
        "from dpsnake.md.warmup import untrained_model\n"
        "untrained_model(json.load(sys.stdin), pathlib.Path(sys.argv[1]))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(path)], input=json.dumps(cfg), capture_output=True, text=True
    )  # the config on stdin: no file to write and remove
    if p.returncode:
        raise RuntimeError(
            f"the untrained model's process failed: {(p.stderr.strip().splitlines() or ['no output'])[-1]}"
        )
    return path


def short_walkers(walkers: list) -> list:
    """The walkers cut to ``STEP_INTERVALS`` deviation intervals, with a tenth of their time step (an
    untrained model's forces are arbitrary; the kernels do not depend on dt or the step count)."""
    out = []
    for w in walkers:
        w = copy.copy(w)
        w.nsteps = min(w.nsteps, STEP_INTERVALS * w.trj_freq)
        w.dt = w.dt / 10
        out.append(w)
    return out


def warm_up(
    cfg: dict,
    walkers_file,
    scratch: pathlib.Path,
    xp,
    engine: str = "auto",
    precision: str = "double",
    compress: float | None = None,
    tf32: bool = False,
    compile: bool = False,
) -> dict:
    """Run the walkers of ``walkers_file`` briefly on ``xp`` with ``train.numb_models`` copies of an
    untrained model of the config's architecture, in ``scratch`` (removed afterwards). Returns what ran:
    {"engine", "reason", "walkers", "steps", "models"} or {"skipped": why} where nothing compiles ahead:
    engine deepmd without ``compile`` or without a DPA-3 model (``compile``: DeePMD-kit's DPA-3 with
    torch.compile'd layers, into TorchInductor's cache: :func:`~dpsnake.md.deepmd_provider.use_compile_cache`)."""
    from dpsnake.md.engines import choose
    from dpsnake.md.explore import make_provider
    from dpsnake.md.explorer import Explorer
    from dpsnake.md.walkers import load_walkers

    walkers = short_walkers(load_walkers(walkers_file))
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    try:
        path = untrained_model_in_child(cfg, scratch / "untrained.dp")
        chosen, reason, loaded = choose(engine, [str(path)])
        n = int(cfg["train"]["numb_models"])
        if chosen == "builtin":
            provider, type_map = make_provider(loaded * n, precision, xp, compress, tf32=tf32)
        elif not compile:
            return {"skipped": f"engine {chosen} ({reason}) without explore.compile: nothing to compile ahead"}
        else:
            from dpsnake.md.deepmd_provider import DeepmdProvider

            provider = DeepmdProvider([str(path)] * n, xp, compile=True)
            if not provider.compiled:
                return {"skipped": f"engine {chosen}: explore.compile compiles DPA-3 models only"}
            type_map = provider.type_map
        Explorer(
            walkers,
            provider,
            type_map,
            scratch / "explore",
            xp=xp,
            models=[str(path)] * n,
            progress=False,
            state_dir=scratch / "explore",
        ).run()
        return {
            "engine": chosen,
            "reason": reason,
            "walkers": len(walkers),
            "steps": max(w.nsteps for w in walkers),
            "models": n,
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args) -> int:
    from dpsnake.fsio import write_json_atomic
    from dpsnake.md.explore import compile_on, compress_distance, pick_xp
    from dpsnake.workflow.config import read_resolved

    t0 = time.time()
    out = pathlib.Path(args.out)
    result: dict = {"device": args.device}
    try:
        xp = None if args.device == "cpu" else pick_xp(args.device)
        if xp is None or xp.__name__ != "cupy":
            result["skipped"] = "no GPU: the CPU engine (NumPy) compiles nothing"
        else:
            compiling = compile_on(args.compile, xp)
            if compiling and args.compile_cache:
                from dpsnake.md.deepmd_provider import use_compile_cache

                result["compile_cache"] = use_compile_cache(args.compile_cache)
            cache = kernel_cache_dir()
            before = sum(1 for _ in cache.rglob("*")) if cache.is_dir() else 0
            compress = compress_distance(args.compress, args.compress_data)
            result.update(
                warm_up(
                    read_resolved(args.config),
                    args.walkers,
                    # not under results/: a killed warm-up leaves nothing next to the exploration's files
                    pathlib.Path(tempfile.mkdtemp(prefix="dpsnake-warmup-")),
                    xp,
                    args.engine,
                    args.precision,
                    compress,
                    args.tf32,
                    compiling,
                )
            )
            after = sum(1 for _ in cache.rglob("*")) if cache.is_dir() else 0
            result.update(kernel_cache=str(cache), new_cache_files=after - before)
            if result.get("engine") == "deepmd":  # torch.compile's graphs: compiled, or found in the cache
                from dpsnake.md.deepmd_provider import compile_cache_counts

                result["graphs"] = compile_cache_counts()
    except Exception as err:  # the exploration compiles its kernels itself then: never stop the run here
        traceback.print_exc()
        result["skipped"] = f"failed: {type(err).__name__}: {err}"
    result["seconds"] = round(time.time() - t0, 1)
    if "skipped" in result:
        print(f"dpsnake explore-warmup: skipped: {result['skipped']} (the exploration compiles its own kernels)")
    else:
        what = (
            f"{result['new_cache_files']} new files in {result['kernel_cache']}"
            if "graphs" not in result
            else f"torch.compile: {result['graphs']['compiled']} graphs compiled, {result['graphs']['loaded']} "
            f"loaded, in {result.get('compile_cache', 'the default cache')}"
        )
        print(
            f"dpsnake explore-warmup: {result['walkers']} walkers x {result['steps']} steps, {result['models']} "
            f"untrained models, engine {result['engine']}: {what} in {result['seconds']} s"
        )
    write_json_atomic(out, result)
    return 0
