"""Atomic file and folder writes: a kill never leaves half a file or a half-written dataset."""

from __future__ import annotations

import json
import os
import pathlib
import shutil


def atomic_write_text(path, text: str) -> None:
    """Write to a temporary name in the same folder, then rename."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _plain(o):
    """NumPy scalars and arrays (e.g. from extxyz ``info``) as plain JSON values."""
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=_plain) + "\n")


def tmp_dir_for(path) -> pathlib.Path:
    """A fresh temporary folder next to ``path`` (same file system, so the final rename is atomic)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a killed attempt
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp, path) -> None:
    """Move a finished temporary folder into place, replacing what was there."""
    path = pathlib.Path(path)
    if path.exists():
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
