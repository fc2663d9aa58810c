"""Which force provider explores: dpsnake's built-in engine or DeePMD-kit's PyTorch models.

``explore.engine``: ``builtin`` (fastest; se_e2_a and se_atten / se_atten_v2 energy models), ``deepmd`` (every energy model
DeePMD-kit's PyTorch backend evaluates: se_e2_a, se_e2_r, se_e3, se_atten(_v2), DPA-2, DPA-3, hybrid,
...), ``auto`` (builtin where it supports every model of the ensemble, else deepmd). The choice and its
reason go to the explore log and ``DIR/engine.json`` (the report shows them).
"""

from __future__ import annotations

from dpsnake.errors import UserError

ENGINES = ("auto", "builtin", "deepmd")
BUILTIN_DESCRIPTORS = ("se_e2_a", "se_a")
ATTN_DESCRIPTORS = ("se_atten", "se_atten_v2", "dpa1")  # dpsnake.engine.attn


def builtin_unsupported(model: dict) -> str | None:
    """Why the built-in engine cannot run models trained from DeePMD-kit input ``model`` section
    (``train.input.model``); None when it can. Checks what the input says; the model files are
    checked again when exploration loads them (``dpsnake.engine.model.load_model``)."""
    desc = model.get("descriptor") or {}
    fit = model.get("fitting_net") or {}
    dtype = desc.get("type", "se_e2_a")
    if dtype in ATTN_DESCRIPTORS:
        why = _attn_unsupported(desc)
        if why:
            return why
    elif dtype not in BUILTIN_DESCRIPTORS:
        runs = " / ".join(BUILTIN_DESCRIPTORS + ATTN_DESCRIPTORS[:2])
        return f"descriptor type {dtype!r} (the built-in engine runs {runs})"
    elif model.get("type_embedding") is not None:
        return "a type_embedding with se_e2_a (the built-in engine runs se_e2_a without type embedding)"
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


def _attn_unsupported(desc: dict) -> str | None:
    """Why the built-in se_atten path (``dpsnake.engine.attn``) cannot run such a descriptor, or None."""
    dtype = desc["type"]
    if int(desc.get("lmax", 1)) != 1:
        return f"{dtype} lmax={desc['lmax']}"
    if desc.get("use_econf_tebd"):
        return f"{dtype} use_econf_tebd"
    if desc.get("attn_mask"):
        return f"{dtype} attn_mask"
    mode = desc.get("tebd_input_mode", "concat")
    if dtype != "se_atten_v2" and mode not in ("concat", "strip"):
        return f"{dtype} tebd_input_mode {mode!r}"
    if desc.get("spin"):
        return "a spin model"
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


def _check_attn_compressible(desc: dict) -> None:
    """explore.compress on the built-in engine's se_atten path: what attn.descriptor.check_compressible
    refuses at load (after training), as one line at check time."""
    if desc.get("type") != "se_atten_v2" and desc.get("tebd_input_mode", "concat") != "strip":
        raise UserError(
            f"explore.compress: train.input.model.descriptor: {desc['type']} with tebd_input_mode "
            f"{desc.get('tebd_input_mode', 'concat')!r} cannot be tabulated (use strip, se_atten_v2, or compress: null)"
        )
    if desc.get("resnet_dt"):
        raise UserError(
            "explore.compress: train.input.model.descriptor.resnet_dt: true cannot be tabulated (as in DeePMD-kit)"
        )


def check_config(cfg: dict, model: dict) -> None:
    """``explore.engine`` against the normalized DeePMD-kit ``model`` section the loop trains: one
    UserError line when the chosen engine cannot explore such models."""
    engine = cfg["explore"].get("engine", "auto")
    why = builtin_unsupported(model)
    dtype = (model.get("descriptor") or {}).get("type")
    if not why and dtype in ATTN_DESCRIPTORS and cfg["train"].get("backend", "tf") == "tf":
        # the attention path reads files of DeePMD-kit's PyTorch/NumPy layout; TensorFlow-written
        # se_atten files differ (smooth_type_embedding) and DeePMD-kit itself cannot convert them
        why = f"{dtype} models trained by the TensorFlow backend (train.backend: pt)"
    if engine == "builtin" and why:
        raise UserError(f"explore.engine: builtin cannot explore train.input.model: {why}; use auto or deepmd")
    if cfg["explore"].get("compress") is not None and engine != "deepmd" and not why and dtype in ATTN_DESCRIPTORS:
        _check_attn_compressible(model["descriptor"])
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
    from dpsnake.engine.dispatch import load_any
    from dpsnake.engine.validate import DamagedModelError

    models = []
    for p in model_paths:
        try:
            models.append(load_any(p))
        except DamagedModelError:  # a damaged file is an error, not a reason to switch engines
            raise
        except UserError as err:
            if engine == "builtin":
                raise
            return "deepmd", f"the built-in engine cannot run {err}", None
    kinds = sorted({_kind(m) for m in models})
    if len(kinds) > 1:
        why = f"models of {' and '.join(kinds)} together (they cannot share neighbour lists)"
        if engine == "builtin":
            raise UserError(f"explore.engine: builtin cannot run {why}")
        return "deepmd", f"the built-in engine cannot run {why}", None
    if engine == "builtin":
        return "builtin", "explore.engine is builtin", models
    kind = f" ({kinds[0]})" if kinds else ""
    return "builtin", f"the built-in engine supports every model of the ensemble{kind}", models


def _kind(model) -> str:
    """The descriptor family of a loaded model, as the built-in engine names it."""
    meta = getattr(model, "meta", None) or {}
    if getattr(model, "kind", "") != "se_atten":
        return "se_e2_a"
    return {"dpa1": "se_atten"}.get(str(meta.get("type")), str(meta.get("type") or "se_atten"))
