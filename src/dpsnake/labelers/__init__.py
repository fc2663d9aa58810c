"""Labelers: one interface (``make_labeler(spec).label(atoms, workdir)``) over ASE calculators and DFT codes."""

from __future__ import annotations

import importlib
import inspect

from dpsnake.errors import UserError
from dpsnake.labelers.base import Labeler, LabelResult, sanity_check

# label.type -> (module, factory); DFT modules are added by their own files and imported lazily
REGISTRY = {
    "ase": ("dpsnake.labelers.ase_calc", "ASELabeler"),
    "qe": ("dpsnake.labelers.qe", "QELabeler"),
    "cp2k": ("dpsnake.labelers.cp2k", "CP2KLabeler"),
    "vasp": ("dpsnake.labelers.vasp", "VASPLabeler"),
    "abacus": ("dpsnake.labelers.abacus", "ABACUSLabeler"),
    "pyscf": ("dpsnake.labelers.pyscf_labeler", "PySCFLabeler"),
}


def make_labeler(spec: dict) -> Labeler:
    """Build a labeler from the config's ``label`` section: ``{"type": ..., <type-specific keys>}``."""
    spec = dict(spec or {"type": "ase", "calculator": "EMT"})
    kind = spec.pop("type", "ase")
    for key in ("max_force", "max_failed_fraction", "group_size"):  # workflow-level keys, not the labeler's
        spec.pop(key, None)
    if kind not in REGISTRY:
        raise UserError(f"label.type: unknown labeler {kind!r}; known: {', '.join(sorted(REGISTRY))}")
    module, factory = REGISTRY[kind]
    cls = getattr(importlib.import_module(module), factory)
    _check_keys(cls, kind, spec)
    try:
        return cls(**spec)
    except (TypeError, ValueError, AttributeError, KeyError) as err:  # a value of the wrong kind, e.g. kpts: 3
        raise UserError(
            f"label: a value of label.type {kind!r} is not what it takes ({type(err).__name__}: "
            f"{err}); docs/labelers.md lists the keys"
        ) from None


def _check_keys(cls, kind: str, spec: dict) -> None:
    """Unknown and missing keys of a labeler as one line naming them (instead of Python's TypeError)."""
    params = [
        p for p in inspect.signature(cls).parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    named = [p.name for p in params]
    takes_more = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(cls).parameters.values())
    unknown = sorted(k for k in spec if k not in named)
    if unknown and not takes_more:  # labelers with **run_keys check the shared keys themselves
        raise UserError(
            f"label: unknown key(s) {unknown} for label.type {kind!r} (its keys: {', '.join(named)}; docs/labelers.md)"
        )
    for p in params:
        if p.default is inspect.Parameter.empty and p.name not in spec:
            raise UserError(f"label.{p.name}: required for label.type {kind!r} (docs/labelers.md)")


def preflight(labeler, elements=()) -> None:
    """Check-time checks that need more than the spec: the code's executable exists, every element of
    the systems (``elements``) has its pseudopotential / POTCAR / basis. One UserError line; run by
    ``dpsnake check-config`` and before any Snakemake job, not per frame."""
    check = getattr(labeler, "preflight", None)
    if check is not None:
        check()
    check = getattr(labeler, "check_elements", None)
    if check is not None and elements:
        check(elements)


__all__ = ["LabelResult", "Labeler", "make_labeler", "preflight", "sanity_check", "REGISTRY"]
