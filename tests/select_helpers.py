"""Helpers of the selection tests (tests/test_select*.py): a resolved one-system Cu config, the CLI."""

from __future__ import annotations

import subprocess
import sys


def dpsnake_cli(cwd, *args: str) -> subprocess.CompletedProcess:
    """``dpsnake ARGS`` run in ``cwd`` as the rules run it (this Python's ``dpsnake.cli``), output kept."""
    return subprocess.run([sys.executable, "-m", "dpsnake.cli", *args], capture_output=True, text=True, cwd=cwd)


def cu_config(tmp_path, **over):
    """A resolved config (schema defaults filled) for one Cu system."""
    from dpsnake.workflow.config import check

    raw = {
        "type_map": ["Cu"],
        "systems": {
            "Cu": {
                "structure": {
                    "builder": "bulk",
                    "repeat": [2, 2, 2],
                    "kwargs": {"name": "Cu", "crystalstructure": "fcc", "a": 3.61, "cubic": True},
                }
            }
        },
        "explore": {
            "stages": [{"temperatures": [300.0], "ensemble": "nvt", "nsteps": 40, "trj_freq": 5, "max_iterations": 2}]
        },
        "train": {"numb_models": 2},
    }
    raw.update(over)
    return check(raw, tmp_path)
