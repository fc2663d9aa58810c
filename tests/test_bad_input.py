"""Every bad input is one clear line naming what is wrong (issue 19): the probes of tests/bad_inputs/."""

from __future__ import annotations

import importlib
import pkgutil

import bad_inputs
import pytest

PROBES = [
    p for m in pkgutil.iter_modules(bad_inputs.__path__) for p in importlib.import_module(f"bad_inputs.{m.name}").PROBES
]


@pytest.mark.parametrize("probe", [pytest.param(p, id=p.id) for p in PROBES])
def test_bad_input(probe, tmp_path):
    rc, text = probe.run(tmp_path)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines, f"no message (exit {rc})"
    assert (rc != 0) if probe.rc is None else (rc == probe.rc), f"exit {rc}: {text[-2000:]}"
    assert "Traceback" not in text, text[-2000:]
    if probe.one_line:
        assert len(lines) == 1, text
    assert probe.names in lines[-1], lines[-1]
