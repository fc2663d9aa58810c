"""Which engine path a model takes: ``load_any`` reads a ``.dp`` file as an se_e2_a
:class:`~dpsnake.engine.model.DPModel` or an se_atten(_v2) :class:`~dpsnake.engine.attn.model.AttnModel`,
``make_ensemble`` builds the matching ensemble (``Ensemble`` or ``AttnEnsemble``). Kept apart from
``engine/model.py`` so the se_e2_a modules never import the attention path (no import cycle).
"""

from __future__ import annotations

import pathlib

from dpsnake.engine.model import DPModel, load_model
from dpsnake.errors import UserError


def load_any(path, exclusion: str | None = None):
    """A model of any descriptor the built-in engine runs: :class:`DPModel` (se_e2_a, via
    :func:`load_model`) or :class:`~dpsnake.engine.attn.model.AttnModel` (se_atten / se_atten_v2).
    Loaded models are returned as they are. One UserError line for anything else."""
    from dpsnake.engine.attn.model import ATTN_TYPES, AttnModel, descriptor_type, load_attn_model

    if isinstance(path, (DPModel, AttnModel)):
        return path
    if pathlib.Path(str(path)).suffix == ".dp" and descriptor_type(path) in ATTN_TYPES:
        return load_attn_model(path)
    return load_model(path, exclusion=exclusion)


def make_ensemble(models, **kw):
    """The ensemble of ``models`` (paths or loaded models, :func:`load_any`): an
    :class:`~dpsnake.engine.ensemble.Ensemble` for se_e2_a models, an
    :class:`~dpsnake.engine.attn.ensemble.AttnEnsemble` for se_atten(_v2) ones (same constructor
    keywords, same ``evaluate``). Models of both kinds together: one UserError line."""
    from dpsnake.engine.attn.ensemble import AttnEnsemble
    from dpsnake.engine.attn.model import AttnModel
    from dpsnake.engine.ensemble import Ensemble

    loaded = [load_any(m) for m in models]
    kinds = {isinstance(m, AttnModel) for m in loaded}
    if len(kinds) > 1:
        raise UserError("models: se_e2_a and se_atten models cannot form one ensemble (they share neighbour lists)")
    return (AttnEnsemble if kinds == {True} else Ensemble)(loaded, **kw)
