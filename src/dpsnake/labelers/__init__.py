"""Labelers: one interface (``make_labeler(spec).label(atoms, workdir)``) over ASE calculators and DFT codes."""

from __future__ import annotations

import importlib

from dpsnake.errors import UserError
from dpsnake.labelers.base import LabelResult, Labeler, sanity_check

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
    return getattr(importlib.import_module(module), factory)(**spec)


__all__ = ["LabelResult", "Labeler", "make_labeler", "sanity_check", "REGISTRY"]
