"""Bad-input probes (issue 19), one module per area; ``tests/test_bad_input.py`` runs them all.

Each module defines ``PROBES``: a list of :class:`Probe`. A probe provokes one mistake a user makes
(a config key, a file, a frame, a fault) and returns what the user sees: the exit code and the text
(the command's stderr, or the end of the rule's log for failures inside a Snakemake job).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Probe:
    """One mistake. ``run(tmp_path) -> (exit code, text)``; the last non-empty line of text must contain
    ``names`` (the key, file or frame at fault); ``rc``: the expected exit code (None: any non-zero);
    ``one_line``: the whole text is that one line (CLI stderr); False for a job log whose last line counts."""

    id: str
    run: Callable[[pathlib.Path], tuple[int, str]]
    names: str
    rc: int | None = 2
    one_line: bool = True


def dpsnake(
    *args: str, cwd: pathlib.Path | str | None = None, env: dict | None = None, timeout: float = 600
) -> tuple[int, str]:
    """Run ``dpsnake ARGS`` in a fresh interpreter; returns (exit code, stderr)."""
    e = dict(os.environ, **(env or {}))
    p = subprocess.run(
        [sys.executable, "-m", "dpsnake.cli", *map(str, args)],
        cwd=cwd,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return p.returncode, p.stderr
