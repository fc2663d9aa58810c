"""Atomic file and folder writes: every file dpsnake writes for another step (or a person) to read.

A kill, a full disk or an exception never leaves half a file or half a dataset under the final name:
everything is written under a temporary name in the same folder (same file system, so the rename is
atomic) and renamed into place when complete; on an error the temporary file or folder is removed and
whatever was at the final name before is left untouched.

- ``write_text_atomic(path, text)``, ``write_bytes_atomic(path, data)``, ``write_json_atomic(path, obj)``
  (``indent=1``, a final newline; NumPy scalars and arrays as plain values).
- ``open_atomic(path, mode="w")``: a file object for writers that take one (``np.savez``, QE's
  ``write_espresso_in``).
- ``atomic_path(path, suffix="")``: a temporary path for writers that take a file name
  (``ase.io.write``, ``torch.save``, dpdata); ``suffix`` ends the temporary name (a format some writers
  tell by the extension).
- ``atomic_dir(path)``: a fresh temporary folder renamed into place (replacing what was there) when the
  block ends without error; ``temp_dir_for`` + ``replace_dir`` are its two halves, for a caller that moves
  only a part of its temporary folder.

``fsync=True`` also flushes the file to disk before the rename (the exploration's checkpoint and summary:
a crash of the machine then leaves the old or the new file, never an empty one). Temporary names start
with ``.<name>.tmp`` and are created with the permissions of an ordinary ``open`` (the umask applies).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
import shutil


def _temp_name(path: pathlib.Path, suffix: str = "") -> pathlib.Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _fsync_path(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, suffix: str = "", *, fsync: bool = False):
    """Yield a temporary path next to ``path``; when the block ends without error, the file written
    there is renamed to ``path``. On an error the temporary file is removed and ``path`` is unchanged."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, suffix)
    try:
        yield tmp
        if fsync:
            _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def open_atomic(path, mode: str = "w", *, fsync: bool = False, **kwargs):
    """``open`` a temporary file next to ``path`` for writing (``mode`` "w" or "wb"); renamed to ``path``
    when the block ends without error."""
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"open_atomic: mode {mode!r}: only 'w', 'wt' and 'wb'")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())


def write_text_atomic(path, text: str, *, fsync: bool = False) -> None:
    """Write ``text`` to ``path`` atomically."""
    with open_atomic(path, "w", fsync=fsync) as f:
        f.write(text)


def write_bytes_atomic(path, data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically."""
    with open_atomic(path, "wb", fsync=fsync) as f:
        f.write(data)


def _plain(o):
    """NumPy scalars and arrays (e.g. from extxyz ``info``) as plain JSON values."""
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def write_json_atomic(path, obj, *, fsync: bool = False) -> None:
    """``obj`` as JSON (``indent=1``, a final newline) to ``path`` atomically. The text is made before
    anything is written, so an object that is not JSON leaves no file."""
    write_text_atomic(path, json.dumps(obj, indent=1, default=_plain) + "\n", fsync=fsync)


def temp_dir_for(path) -> pathlib.Path:
    """A fresh temporary folder next to ``path`` (same file system, so the final rename is atomic);
    temporary folders of ``path`` left by a killed attempt are removed first."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp*"):
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


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a fresh temporary folder next to ``path``; when the block ends without error it replaces
    ``path`` (a folder), else it is removed and ``path`` is unchanged."""
    tmp = temp_dir_for(path)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)
