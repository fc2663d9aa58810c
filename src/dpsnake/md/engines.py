"""Which force provider explores: dpsnake's built-in engine or DeePMD-kit's PyTorch models.

``explore.engine``: ``builtin`` (fastest; se_e2_a energy models), ``deepmd`` (every energy model
DeePMD-kit's PyTorch backend evaluates: se_e2_a, se_e2_r, se_e3, se_atten(_v2), DPA-2, DPA-3, hybrid,
...), ``auto`` (builtin where it supports every model of the ensemble, else deepmd). The choice and its
reason go to the explore log and ``DIR/engine.json`` (the report shows them).
"""

from __future__ import annotations

from dpsnake.errors import UserError

ENGINES = ("auto", "builtin", "deepmd")
BUILTIN_DESCRIPTORS = ("se_e2_a", "se_a")


def builtin_unsupported(model: dict) -> str | None:
    """Why the built-in engine cannot run models trained from DeePMD-kit input ``model`` section
    (``train.input.model``); None when it can. Checks what the input says; the model files are
    checked again when exploration loads them (``dpsnake.engine.model.load_model``)."""
    desc = model.get("descriptor") or {}
    fit = model.get("fitting_net") or {}
    dtype = desc.get("type", "se_e2_a")
    if dtype not in BUILTIN_DESCRIPTORS:
        return f"descriptor type {dtype!r} (the built-in engine runs {' / '.join(BUILTIN_DESCRIPTORS)})"
    if model.get("type_embedding") is not None:
        return "a type_embedding (the built-in engine runs se_e2_a without type embedding)"
    if fit.get("type", "ener") != "ener":
        return f"fitting_net type {fit.get('type')!r}"
    for key in ("numb_fparam", "numb_aparam", "dim_case_embd"):
        if int(fit.get(key) or 0):
            return f"fitting_net {key}={fit[key]}"
    if model.get("spin"):
        return "a spin model"
    if (desc.get("env_mat") or {}).get("use_exp_switch") or desc.get("use_exp_switch"):
        return "descriptor use_exp_switch"
    return None


def deepmd_missing() -> str | None:
    """Why DeePMD-kit's PyTorch models cannot run here (None: they can), without importing torch."""
    import importlib.metadata
    import importlib.util

    for mod in ("torch", "deepmd"):
        if importlib.util.find_spec(mod) is None:
            return f"DeePMD-kit's PyTorch backend is not installed (no module {mod!r}: pip install 'deepmd-kit[torch]')"
    try:  # deepmd.pt asks for the mpich distribution (it has no module of that name)
        importlib.metadata.distribution("mpich")
    except importlib.metadata.PackageNotFoundError:
        return "DeePMD-kit's PyTorch backend needs the mpich package (pip install mpich)"
    return None


def check_config(cfg: dict, model: dict) -> None:
    """``explore.engine`` against the normalized DeePMD-kit ``model`` section the loop trains: one
    UserError line when the chosen engine cannot explore such models."""
    engine = cfg["explore"].get("engine", "auto")
    why = builtin_unsupported(model)
    if engine == "builtin" and why:
        raise UserError(f"explore.engine: builtin cannot explore train.input.model: {why}; use auto or deepmd")
    if engine == "deepmd" or (engine == "auto" and why):
        missing = deepmd_missing()
        if missing:
            reason = "explore.engine is deepmd" if engine == "deepmd" else f"the built-in engine cannot run {why}"
            raise UserError(
                f"explore.engine: {engine}: exploration needs DeePMD-kit's models ({reason}), but {missing}"
            )


def choose(engine: str, model_paths) -> tuple[str, str, list | None]:
    """(engine name, reason, the built-in engine's loaded models or None) for the model files;
    ``builtin`` with an unsupported model is one UserError line (the built-in loader's, naming the
    file and the feature). The loaded models are handed on, so no file is read twice."""
    if engine not in ENGINES:
        raise UserError(f"--engine: {engine!r} is not one of {', '.join(ENGINES)}")
    if engine == "deepmd":
        return "deepmd", "explore.engine is deepmd", None
    from dpsnake.engine.model import load_model
    from dpsnake.engine.validate import DamagedModelError

    models = []
    for p in model_paths:
        try:
            models.append(load_model(p))
        except DamagedModelError:  # a damaged file is an error, not a reason to switch engines
            raise
        except UserError as err:
            if engine == "builtin":
                raise
            return "deepmd", f"the built-in engine cannot run {err}", None
    if engine == "builtin":
        return "builtin", "explore.engine is builtin", models
    return "builtin", "the built-in engine supports every model of the ensemble", models
