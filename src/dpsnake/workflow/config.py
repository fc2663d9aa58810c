"""Load, validate and resolve a run config: one clear line naming the key or file when it is wrong.

The schema (``workflow/schemas/config.schema.yaml``) gives types, allowed keys and defaults; the checks
here add what a schema cannot say: referenced files exist, every element belongs to the global
``type_map``, trust levels are ordered, the exploration plan names known systems, the labeler exists
with the keys it takes and its program, and the start structures suit exploration and the descriptor
(``check_structures``: periodicity, npt on periodic cells, neighbours within sel).
"""

from __future__ import annotations

import copy
import json
import os
import pathlib

from dpsnake.errors import UserError

SCHEMA = pathlib.Path(__file__).resolve().parents[3] / "workflow" / "schemas" / "config.schema.yaml"


def schema_path() -> pathlib.Path:
    if not SCHEMA.is_file():
        raise UserError(f"schema: {SCHEMA}: not found (run from a checkout of dpsnake)")
    return SCHEMA


def _key(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _with_defaults(cls):
    """A jsonschema validator class that also fills ``default`` values (the jsonschema FAQ recipe)."""
    from jsonschema import validators

    validate_props = cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return validators.extend(cls, {"properties": set_defaults})


def _one_line(err) -> str:
    """A jsonschema error as 'key: what is wrong'."""
    import jsonschema

    # descend into the most specific sub-error of oneOf/anyOf (e.g. a bad stage inside a list)
    if err.context:
        err = jsonschema.exceptions.best_match(err.context)
    key = _key(err.absolute_path)
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        allowed = ", ".join(err.schema.get("properties", {})) or "none"
        name = f"{key}.{extra[0]}" if err.absolute_path else (extra[0] if extra else key)
        return f"{name}: unknown key (allowed here: {allowed})"
    if err.validator == "required":
        return f"{key}: {err.message}"
    if err.validator == "oneOf" and "structure" in key:
        return f"{key}: give exactly one of 'file' or 'builder'"
    if err.validator == "propertyNames" or "propertyNames" in err.schema_path:
        return f"{key}: name {err.instance!r} may only hold letters, digits, '_' and '-'"
    return f"{key}: {err.message}"


def validate_schema(config: dict) -> dict:
    """Validate against the schema and fill defaults (in a copy). Raises UserError(one line)."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(schema_path().read_text())
    cls = _with_defaults(jsonschema.Draft202012Validator)
    config = copy.deepcopy(config)
    errors = list(cls(schema).iter_errors(config))
    if errors:
        raise UserError(_one_line(jsonschema.exceptions.best_match(errors)))
    # label: defaults of the workflow-level keys (the labeler-specific keys are free-form)
    config["label"].setdefault("max_force", None)
    config["label"].setdefault("max_failed_fraction", 0.2)
    return config


def _check_file(key: str, path: str, base: pathlib.Path, folder_ok: bool = False) -> None:
    p = pathlib.Path(path)
    p = p if p.is_absolute() else base / p
    if not (p.is_file() or (folder_ok and p.is_dir())):
        raise UserError(f"{key}: {path}: no such {'file or folder' if folder_ok else 'file'}")


def _data_type_map(path: pathlib.Path) -> list[str] | None:
    """Element names of a deepmd/npy folder (type_map.raw) or deepmd/hdf5 file, None if it has none."""
    if path.is_dir():
        f = path / "type_map.raw"
        if not (path / "type.raw").is_file():
            raise UserError(f"{path}: not a deepmd/npy folder (no type.raw)")
        return f.read_text().split() if f.is_file() else None
    import h5py

    try:
        with h5py.File(path, "r") as h:
            groups = [h] if "type_map.raw" in h else [h[k] for k in h if isinstance(h[k], h5py.Group)]
            names = set()
            for g in groups:
                if "type_map.raw" in g:
                    names.update(x.decode() if isinstance(x, bytes) else str(x) for x in g["type_map.raw"][()])
            return sorted(names) or None
    except OSError as err:
        raise UserError(f"{path}: not a deepmd/hdf5 file ({err})") from None


def check(config: dict, base: pathlib.Path | str = ".") -> dict:
    """Schema validation + semantic checks; returns the resolved config (defaults filled)."""
    from dpsnake.workflow.structures import build_structure

    base = pathlib.Path(base)
    cfg = validate_schema(config)
    tmap = cfg["type_map"]
    for el in cfg["masses"]:
        if el not in tmap:
            raise UserError(f"masses.{el}: element not in type_map {tmap}")
    model_tmap = cfg["train"]["input"].get("model", {}).get("type_map")
    if model_tmap is not None and list(model_tmap) != list(tmap):
        raise UserError(
            f"train.input.model.type_map: {model_tmap} differs from the global type_map {tmap} "
            "(leave it out: the workflow fills it in)"
        )
    model = _check_train(cfg, base)
    atoms_of = {}
    for name, sysc in cfg["systems"].items():
        key = f"systems.{name}"
        st = sysc["structure"]
        if "file" in st:
            _check_file(f"{key}.structure.file", st["file"], base)
        for el in sysc.get("type_map") or []:
            if el not in tmap:
                raise UserError(f"{key}.type_map: element {el!r} not in the global type_map {tmap}")
        atoms = atoms_of[name] = build_structure(st, base, key=f"{key}.structure")
        bad = sorted(set(atoms.get_chemical_symbols()) - set(tmap))
        if bad:
            raise UserError(f"{key}.structure: elements {bad} not in the global type_map {tmap}")
        if sysc.get("type_map"):
            bad = sorted(set(atoms.get_chemical_symbols()) - set(sysc["type_map"]))
            if bad:
                raise UserError(f"{key}.type_map: the structure also holds {bad}")
        if sysc.get("init_data"):
            _check_file(f"{key}.init_data", sysc["init_data"], base, folder_ok=True)
            p = pathlib.Path(sysc["init_data"])
            names = _data_type_map(p if p.is_absolute() else base / p)
            bad = sorted(set(names or []) - set(tmap))
            if bad:
                raise UserError(
                    f"{key}.init_data: {sysc['init_data']}: elements {bad} not in the global type_map {tmap}"
                )
        _check_trust(f"{key}.trust", sysc.get("trust"))
    _check_trust("trust", cfg["trust"])
    from dpsnake.workflow.stages import resolve_stages

    resolve_stages(cfg)  # groups of walkers per stage, complete; unknown systems, trj_freq > nsteps
    for i, e in enumerate(cfg["test_data"]):
        _check_file(f"test_data[{i}]", e if isinstance(e, str) else e["path"], base, folder_ok=True)
    from dpsnake.workflow.check_structures import check_structures

    check_structures(cfg, {n: s["structure"] for n, s in cfg["systems"].items()}, atoms_of, model)
    from dpsnake.labelers import make_labeler, preflight

    # unknown labeler, unknown or missing keys, then its program: one UserError line naming label.<key>
    preflight(make_labeler(cfg["label"]), sorted({s for a in atoms_of.values() for s in a.get_chemical_symbols()}))
    return cfg


def _check_train(cfg: dict, base: pathlib.Path) -> dict:
    """train.input through DeePMD-kit's own checker, the backend and fine-tuning setup, and whether the
    chosen exploration engine can run such models; returns the normalized ``model`` section."""
    from dpsnake.md.engines import check_config
    from dpsnake.workflow.train_input import check_train

    model = check_train(cfg, base)
    check_config(cfg, model)
    return model


def _check_trust(key: str, trust: dict | None) -> None:
    for kind in ("force", "virial"):
        pair = (trust or {}).get(kind)
        if pair is not None and not pair[0] < pair[1]:
            raise UserError(f"{key}.{kind}: theta_low {pair[0]} must be below theta_high {pair[1]}")


def load(path: str | os.PathLike, base: str | os.PathLike | None = None) -> dict:
    """Read a YAML/JSON config file and check it; files are resolved against ``base`` (default cwd)."""
    import yaml

    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of config keys")
    return check(raw, base or ".")


def read_resolved(path: str | os.PathLike) -> dict:
    """The run's resolved config (results/config.json) as written by the workflow."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"--config: {path}: no such file (the workflow writes results/config.json)")
    return json.loads(path.read_text())


def write_if_changed(cfg: dict, path: str | os.PathLike) -> bool:
    """Write ``cfg`` as JSON atomically unless the file already holds the same content."""
    from dpsnake.fsio import write_text_atomic

    text = json.dumps(cfg, indent=1, sort_keys=True) + "\n"
    path = pathlib.Path(path)
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
    return True


def system_trust(cfg: dict, system: str) -> dict:
    """Trust levels of one system: {'force': [lo, hi], 'virial': [lo, hi] | None} (system overrides global)."""
    out = {"force": list(cfg["trust"]["force"]), "virial": cfg["trust"].get("virial")}
    own = cfg["systems"][system].get("trust") or {}
    out.update({k: v for k, v in own.items()})
    return out
