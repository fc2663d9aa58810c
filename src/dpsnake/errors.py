"""Exceptions shared by all modules, and the one-line causes the command line prints.

Every ``dpsnake <command>`` failure ends with one line ``dpsnake <command>: error: <cause>`` (the last
line of the rule's log, which Snakemake shows in its error summary). Helpers here turn what went wrong
into that cause:

- :func:`last_error_line`: the cause in a child program's output (``dp train``, ``pw.x``...): the
  exception of its last Python traceback, else its last line that says "error", else its last line.
- :func:`os_error_message`: an ``OSError`` (permission denied, disk full...) as the path and what to do.
"""

from __future__ import annotations

import errno
import os
import re


class UserError(Exception):
    """Bad input (config key, file, frame): reported as one line naming what is wrong."""


def one_line(text: str, limit: int = 600) -> str:
    """``text`` as one line (its non-empty lines joined by " | "), at most ``limit`` characters."""
    parts = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    line = " | ".join(parts)
    return line if len(line) <= limit else line[: limit - 3] + "..."


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# "dargs.dargs.ArgumentKeyError: ...", "RuntimeError: ...", "KeyboardInterrupt"
_EXC = re.compile(
    r"^(?P<name>[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Failure|Warning)|[A-Za-z_][\w.]*\.[A-Z]\w*)"
    r"(: (?P<msg>.*))?$"
)
# lines that name an error but are not the cause: MPI's abort boilerplate, CUDA stub loaders, separators
_NOISE = re.compile(
    r"MPI_ABORT|MPI_COMM_WORLD|errorcode|You may or may not see output|implib-gen|"
    r"^[-=%*#~_ ]+$|^\(most recent call last\)|^stopping \.\.\.$|^Aborted( \(core dumped\))?$",
    re.IGNORECASE,
)
_ERROR_WORD = re.compile(r"\b(error|errors|fatal|failed|failure|exception|abort(ed)?)\b", re.IGNORECASE)


def _lines(text: str) -> list[str]:
    return [_ANSI.sub("", ln).rstrip() for ln in text.replace("\r", "\n").splitlines()]


def _traceback_cause(lines: list[str]) -> str | None:
    """The exception line of the last Python traceback in ``lines`` (module path dropped), or None."""
    starts = [i for i, ln in enumerate(lines) if ln.lstrip().startswith("Traceback (most recent call last)")]
    if not starts:
        return None
    for i in range(starts[-1] + 1, len(lines)):
        ln = lines[i]
        if not ln.strip() or ln.startswith((" ", "\t")):  # frames ("  File ...") and their code lines
            continue
        m = _EXC.match(ln.strip())
        if not m:
            continue
        name = m.group("name").rsplit(".", 1)[-1]
        msg = (m.group("msg") or "").strip()
        if msg.endswith(":") and i + 1 < len(lines) and lines[i + 1].strip():
            msg += " " + lines[i + 1].strip()  # "ValueError: bad input:" + the detail on the next line
        return f"{name}: {msg}" if msg else name
    return None


def last_error_line(text: str, limit: int = 400) -> str:
    """The last meaningful error line of a child program's output (its log or stderr), as one line.

    In order: the exception of the last Python traceback (``ArgumentKeyError: [at location
    `model/descriptor`] undefined key `rcut_smthh` ...``; noise printed after it, such as CUDA stub
    messages, is skipped); else the last line that says error/failed/fatal (a Fortran "Error in routine X:"
    is joined with the detail on the next line), MPI abort boilerplate skipped; else the last non-empty
    line. "" for empty output.
    """
    lines = _lines(text or "")
    cause = _traceback_cause(lines)
    if cause is None:
        clean = [(i, ln.strip()) for i, ln in enumerate(lines) if ln.strip() and not _NOISE.search(ln.strip())]
        flagged = [(i, ln) for i, ln in clean if _ERROR_WORD.search(ln)]
        if flagged:
            i, cause = flagged[-1]
            if cause.endswith(":"):  # QE: "Error in routine read_cards (1):" then "unknown card: FOO"
                nxt = [ln for j, ln in clean if j > i]
                if nxt:
                    cause += " " + nxt[0]
        elif clean:
            cause = clean[-1][1]
        else:
            cause = ""
    return one_line(cause, limit)


def _nearest_existing(path: str) -> str:
    """``path`` or its nearest existing parent folder (relative paths stay relative)."""
    p = os.path.normpath(path)
    while not os.path.lexists(p):
        parent = os.path.dirname(p)
        if parent in ("", p):
            return parent or "."
        p = parent
    return p


def os_error_message(err: OSError) -> str:
    """An ``OSError`` as one line: the path and what to do (``chmod``, free space...), no traceback."""
    path = err.filename if err.filename is not None else None
    where = f"{path}: " if path is not None else ""
    if err.filename2 is not None:
        where = f"{path} -> {err.filename2}: "
    code = err.errno
    if code in (errno.EACCES, errno.EPERM):
        target = _nearest_existing(str(path)) if path is not None else None
        if target is None:
            todo = "check the permissions of the files it uses and rerun"
        elif os.path.isdir(target):
            todo = f"make {target} writable (chmod u+rwx {target}) and rerun"
        else:
            todo = f"make {target} readable and writable (chmod u+rw {target}) and rerun"
        made = "" if path is None or os.path.lexists(str(path)) else " (cannot create it)"
        return f"{where}permission denied{made}; {todo}"
    if code in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
        return f"{where}{what}; free space (or raise the quota) and rerun: finished jobs are not redone"
    if code == errno.EROFS:
        return f"{where}read-only file system; run the workflow in a writable folder"
    if code in (errno.EMFILE, errno.ENFILE):
        return f"{where}too many open files; raise the limit (ulimit -n) or run fewer jobs at once, and rerun"
    if code == errno.ENOENT:
        return f"{where}no such file or directory"
    if code == errno.ENOTDIR:
        return f"{where}a part of this path is a file, not a folder; move that file away and rerun"
    if code == errno.EEXIST:
        return f"{where}already exists and is in the way (a file where a folder is needed?); move it away and rerun"
    if code == errno.EISDIR:
        return f"{where}is a folder where a file is expected; move it away and rerun"
    why = err.strerror or str(err) or type(err).__name__
    return f"{where}{one_line(why)}"
