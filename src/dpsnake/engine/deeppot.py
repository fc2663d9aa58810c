"""``DeepPot``: the interface of ``deepmd.infer.DeepPot`` on top of :class:`Ensemble`.

Scripts written for DeePMD-kit switch by changing one import::

    from dpsnake import DeepPot
    dp = DeepPot("model.dp")
    e, f, v = dp.eval(coords, cells, atom_types)
"""

from __future__ import annotations

import numpy as np

from dpsnake.engine.dispatch import make_ensemble
from dpsnake.engine.xp import array_namespace
from dpsnake.errors import UserError


def frames_to_flat(xp, coords, cells, atom_types):
    """DeePMD-kit frame arrays -> the flat batched layout.

    coords (nf, nat*3) or (nf, nat, 3); cells (nf, 9), (nf, 3, 3) or None (no PBC);
    atom_types (nat,) or (nf, nat). Returns coords (nf*nat, 3), atype, system, cells (nf, 3, 3),
    pbc (nf,), nf, nat.
    """
    atom_types = xp.asarray(atom_types)
    coords = xp.asarray(coords, dtype=xp.float64)
    nat = atom_types.shape[-1]
    if coords.size % (3 * max(nat, 1)):
        raise UserError(f"coords: size {coords.size} is not a multiple of 3 x {nat} atoms")
    if nat:
        nf = coords.size // (3 * nat)
    else:  # no atoms: frames counted by coords' first axis ((nf, 0) or (nf, 0, 3)), as DeePMD-kit
        nf = coords.shape[0] if coords.ndim else 0
    coords = coords.reshape(nf * nat, 3)
    if atom_types.ndim == 1:
        atype = xp.tile(atom_types, nf)
    else:
        atype = atom_types.reshape(-1)
        if atype.shape[0] != nf * nat:
            raise UserError(f"atom_types: shape {atom_types.shape} does not match {nf} frames")
    if cells is None:
        cl = xp.zeros((nf, 3, 3))
        pbc = xp.zeros(nf, dtype=bool)
    else:
        cl = xp.asarray(cells, dtype=xp.float64).reshape(nf, 3, 3)
        pbc = xp.ones(nf, dtype=bool)
    system = xp.repeat(xp.arange(nf), nat)
    return coords, atype, system, cl, pbc, nf, nat


class DeepPot:
    """One Deep Potential model with DeePMD-kit's ``DeepPot`` interface.

    model: path to a ``.dp`` file (se_e2_a or se_atten(_v2); or a loaded DPModel / AttnModel); precision "double" or "mixed"; keyword
    ``compress`` = {"min_nbor_dist": ..., "stride": 0.01, "extrapolate": 5} tabulates the embedding
    nets as ``dp compress`` does; ``chunk_atoms``, ``settings`` (an EngineSettings) and ``tf32`` as
    :class:`Ensemble`.
    """

    def __init__(self, model, precision: str = "double", **kwargs):
        self.ensemble = make_ensemble(
            [model],
            precision=precision,
            chunk_atoms=kwargs.get("chunk_atoms"),
            compress=kwargs.get("compress"),
            settings=kwargs.get("settings"),
            tf32=kwargs.get("tf32"),
        )

    def get_type_map(self) -> list[str]:
        return self.ensemble.type_map

    def get_rcut(self) -> float:
        return self.ensemble.rcut

    def get_ntypes(self) -> int:
        return self.ensemble.ntypes

    def get_dim_fparam(self) -> int:
        return 0

    def get_dim_aparam(self) -> int:
        return 0

    def eval(self, coords, cells, atom_types, atomic: bool = False, fparam=None, aparam=None, **kwargs):
        """Energy (nf, 1), force (nf, nat, 3), virial (nf, 9) [, atom_energy (nf, nat, 1),
        atom_virial (nf, nat, 9)] in eV, eV/A, eV; arrays of the namespace of ``coords``."""
        if fparam is not None or aparam is not None:
            raise UserError("fparam/aparam: this engine supports models without frame/atomic parameters")
        xp = array_namespace(coords)
        c, t, s, cl, pbc, nf, nat = frames_to_flat(xp, coords, cells, atom_types)
        out = self.ensemble.evaluate(c, t, s, cl, pbc, atomic=atomic)
        e = out["energy"][0].reshape(nf, 1)
        f = out["force"][0].reshape(nf, nat, 3)
        v = out["virial"][0].reshape(nf, 9)
        if not atomic:
            return e, f, v
        return (e, f, v, out["atom_energy"][0].reshape(nf, nat, 1), out["atom_virial"][0].reshape(nf, nat, 9))


__all__ = ["DeepPot", "frames_to_flat", "np"]
