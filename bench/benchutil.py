"""What the benchmark scripts share: where results go and how they are written, and a timer.

One current result per benchmark and device: ``bench/results/<benchmark>_<device>.json`` (device
``h100``, ``h200``, ``h200x2``, ``cpu``, ...); a new run replaces the file (git history keeps the
old ones). ``BENCH_RESULTS`` names another folder (the GPU drivers point it at ``$OUT``, whose files
come back from the device machine). Files are written atomically (a killed run leaves the old file).
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dpsnake.fsio import write_json_atomic  # noqa: E402


def results_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("BENCH_RESULTS") or ROOT / "bench" / "results")


def device_tag(name: str | None) -> str:
    """Short lower-case tag of a device name: "NVIDIA H100 80GB HBM3" -> "h100"; None -> "cpu"."""
    if not name:
        return "cpu"
    m = re.search(r"\b([A-Z]{1,3})[ -]?(\d{2,4}[A-Z]?)\b", name.upper())
    return (m.group(1) + m.group(2)).lower() if m else re.sub(r"[^a-z0-9]+", "", name.lower())[:16] or "gpu"


def xp_tag(xp) -> str:
    """device_tag of the array module's device (CuPy: device 0's name; NumPy: "cpu")."""
    if xp.__name__ != "cupy":
        return "cpu"
    name = xp.cuda.runtime.getDeviceProperties(0)["name"]
    return device_tag(name.decode() if isinstance(name, bytes) else name)


def results_path(json_arg: str | None, benchmark: str, device: str) -> pathlib.Path | None:
    """Where a script writes: ``--json`` if given ("" or "-": nowhere), else the results file."""
    if json_arg is not None:
        return None if json_arg in ("", "-") else pathlib.Path(json_arg)
    return results_dir() / f"{benchmark}_{device}.json"


def write_results(path: pathlib.Path | None, obj) -> None:
    if path is None:
        return
    write_json_atomic(path, obj)
    print(f"wrote {path}", flush=True)


def add_settings_arg(parser) -> None:
    """``--set NAME=VALUE`` (repeatable): an engine setting of the benchmark or profile run."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an engine setting (EngineSettings field, docs/engine.md), on top of the DPSNAKE_* variables",
    )


def engine_settings(items):
    """EngineSettings from the DPSNAKE_* variables (earlier runs' command lines) and then ``--set`` items."""
    import os

    from dpsnake.engine.settings import EngineSettings

    return EngineSettings.parse(items, EngineSettings.from_env(os.environ))


def timeit(fn, sync, n=5, warm=2, budget=60.0) -> float:
    """Median seconds per call of ``fn`` (``warm`` untimed calls first, ``sync()`` (the device) waited
    for around each call); stops early after ``budget`` seconds of timed calls."""
    import numpy as np

    for _ in range(warm):
        fn()
    sync()
    ts = []
    t_all = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
        if time.perf_counter() - t_all > budget:
            break
    return float(np.median(ts))
