"""Label with any ASE calculator, named by import path or by a short name (EMT is the default)."""

from __future__ import annotations

import importlib
import inspect
import pathlib

import numpy as np

from dpsnake.errors import UserError
from dpsnake.labelers.base import LabelResult

SHORT_NAMES = {
    "EMT": "ase.calculators.emt.EMT",
    "LennardJones": "ase.calculators.lj.LennardJones",
    "MorsePotential": "ase.calculators.morse.MorsePotential",
}


def import_calculator(name: str):
    """'EMT' or 'package.module.Class' -> the calculator class; one clear error if it is not there."""
    if not isinstance(name, str):
        raise UserError(
            f"label.calculator: give a short name ({', '.join(SHORT_NAMES)}) or a 'module.Class' path, got {name!r}"
        )
    path = SHORT_NAMES.get(name, name)
    module, _, cls = path.rpartition(".")
    if not module:
        raise UserError(
            f"label.calculator: {name!r} is neither a known short name "
            f"({', '.join(SHORT_NAMES)}) nor a 'module.Class' path"
        )
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as err:
        raise UserError(f"label.calculator: cannot import {path!r}: {err}") from None


def check_kwargs(cls, kwargs: dict, name: str) -> None:
    """``label.kwargs`` the calculator does not take, as one UserError line (no instance is built:
    constructing e.g. a machine-learned calculator can load a model).

    A constructor without ``**kwargs`` says exactly what it takes. An ASE ``Calculator`` with
    ``default_parameters`` passes its ``**kwargs`` to ``set()``, which stores any name silently: its
    parameters are the defaults' names plus the named arguments of the constructors it inherits.
    Other constructors with ``**kwargs`` (file-based calculators, custom classes) cannot be checked.
    """
    if not isinstance(kwargs, dict):
        raise UserError(f"label.kwargs: give a mapping of keyword arguments, got {kwargs!r}")
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):  # a builtin or C extension: nothing to look at
        return
    try:
        sig.bind(**kwargs)
    except TypeError as err:
        raise UserError(f"label.kwargs: {name}: {err}; its parameters: {', '.join(sig.parameters)}") from None
    try:
        from ase.calculators.calculator import Calculator
    except ImportError:
        return
    defaults = dict(getattr(cls, "default_parameters", None) or {})
    if not (isinstance(cls, type) and issubclass(cls, Calculator) and defaults):
        return
    known = set(defaults)
    for klass in cls.__mro__:  # named arguments of every constructor up the chain (restart, label, ...)
        init = klass.__dict__.get("__init__")
        if init is not None:
            known.update(p for p in inspect.signature(init).parameters if p != "self")
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise UserError(
            f"label.kwargs: {name} does not take {unknown} (ASE would accept and ignore "
            f"them); its parameters: {', '.join(sorted(defaults))}"
        )


class ASELabeler:
    """Runs ``atoms.calc = Calculator(**kwargs)`` and reads energy, forces and (if periodic) stress."""

    def __init__(self, calculator: str = "EMT", kwargs: dict | None = None):
        self.name = f"ase:{calculator}"
        self.cls = import_calculator(calculator)
        check_kwargs(self.cls, kwargs or {}, calculator)
        self.kwargs = dict(kwargs or {})

    def label(self, atoms, workdir: pathlib.Path) -> LabelResult:
        atoms = atoms.copy()
        try:
            atoms.calc = self.cls(**self.kwargs)
            energy = float(atoms.get_potential_energy())
            forces = np.array(atoms.get_forces())
            virial = None
            if atoms.pbc.all():
                # ASE stress (Voigt, eV/A^3) -> virial = -stress * volume (DeePMD-kit / dpdata convention)
                virial = -atoms.get_stress(voigt=False) * atoms.get_volume()
        except Exception as err:  # a calculator failure is a failed label, not a crash of the job
            return LabelResult.failed(f"{type(err).__name__}: {err}")
        return LabelResult(ok=True, energy=energy, forces=forces, virial=virial)
