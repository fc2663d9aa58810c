"""DP-GEN's ``fp_style`` and its keys as dpsnake's ``label`` section (docs/labelers.md).

- ``vasp``: ``fp_pp_path`` + ``fp_pp_files`` -> ``potcar_dir`` + ``potcars``; ``fp_incar`` (read) or
  ``user_fp_params`` / the old ``fp_params`` (DP-GEN's own INCAR recipe) -> ``incar``; ``KSPACING`` /
  ``KGAMMA`` stay in the INCAR (the labeler honours KSPACING).
- ``pwscf``: ``fp_pp_*`` -> ``pseudo_dir`` + ``pseudopotentials``; ``user_fp_params`` namelists (minus what
  the labeler sets) and ``kspacing``, or ``fp_params`` (ecut, ediff, smearing, sigma, kspacing).
- ``cp2k``: ``user_fp_params`` (DP-GEN's nested input) -> cutoffs, basis / potential per element, files,
  xc, SCF, charge, multiplicity; ``external_input_path`` is a template with DP-GEN's markers: table.
- ``abacus``: ``fp_pp_*`` / ``fp_orb_files`` -> pseudopotentials / orbitals; ``user_fp_params`` or
  ``fp_incar`` (INPUT) -> ``ecutwfc``, ``basis_type``, smearing and the rest as ``input``; ``k_points``.
- ``gaussian``: ASE's Gaussian calculator (``type: ase``) with method, basis, charge, multiplicity, nproc.
- anything else (siesta, pwmat, cpx, amber/diff, custom): no labeler; give one with ``--labeler``.

``fp_command`` from machine.json becomes ``command`` (DP-GEN's input file names replaced by ``{input}``).
"""

from __future__ import annotations

import re

from dpsnake.importers.dpgen_common import Context, unused_subkeys

FP_KEYS = (
    "fp_pp_path",
    "fp_pp_files",
    "fp_incar",
    "fp_params",
    "user_fp_params",
    "fp_orb_files",
    "k_points",
    "fp_kpt_file",
    "external_input_path",
)


def _pp(ctx: Context, type_map: list[str]) -> tuple[str, dict]:
    path = ctx.get("fp_pp_path")
    files = ctx.get("fp_pp_files") or []
    if path is None:
        raise ctx.error("fp_pp_path", f"required for fp_style {ctx.param.get('fp_style')}")
    if len(files) == 1 and len(type_map) > 1:
        raise ctx.error("fp_pp_files", "one file for several elements (a concatenated POTCAR?): give one per element")
    if files and len(files) < len(type_map):
        raise ctx.error("fp_pp_files", f"{len(files)} files for the {len(type_map)} elements of type_map")
    return str(ctx.resolve(path).resolve()), {el: str(f) for el, f in zip(type_map, files)}


def read_incar(ctx: Context, key: str, path) -> dict:
    """An INCAR file as {TAG: value} (numbers and .TRUE./.FALSE. converted)."""
    p = ctx.resolve(path)
    if not p.is_file():
        raise ctx.error(key, f"{p}: no such file")
    out = {}
    for line in p.read_text().splitlines():
        for part in line.split("#")[0].split("!")[0].split(";"):
            if "=" in part:
                tag, value = part.split("=", 1)
                out[tag.strip().upper()] = _scalar(value.strip())
    return out


def _scalar(text: str):
    low = text.lower().strip(".")
    if low in ("true", "t"):
        return True
    if low in ("false", "f"):
        return False
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _vasp(ctx: Context, type_map: list[str]) -> dict:
    potcar_dir, potcars = _pp(ctx, type_map)
    label = {"type": "vasp", "potcar_dir": potcar_dir, "potcars": potcars}
    if ctx.has("fp_incar"):
        incar = read_incar(ctx, "fp_incar", ctx.get("fp_incar"))
        ctx.source("label", "label.incar <- fp_incar (read)")
    elif ctx.has("user_fp_params"):
        incar = {str(k).upper(): v for k, v in ctx.get("user_fp_params").items() if not str(k).startswith("_")}
        ctx.source("label", "label.incar <- user_fp_params")
    elif ctx.has("fp_params"):
        incar = _vasp_fp_params(ctx, ctx.get("fp_params"))
        ctx.source("label", "label.incar <- fp_params (DP-GEN's make_vasp_incar_user_dict recipe)")
    else:
        raise ctx.error("fp_incar", "fp_style vasp needs fp_incar, user_fp_params or fp_params")
    for tag in ("NSW", "IBRION"):  # the labeler fixes them (single points); DP-GEN INCARs say the same
        incar.pop(tag, None)
    if "KSPACING" not in incar:
        raise ctx.error("fp_incar", "no KSPACING: DP-GEN requires it (the labeler takes it from the INCAR)")
    label["incar"] = incar
    if "KGAMMA" in incar:
        label["gamma"] = bool(incar["KGAMMA"])
    for key, why in (
        ("fp_aniso_kspacing", "anisotropic k-spacing: the labeler takes one kspacing"),
        ("cvasp", "custodian error handling: the labeler records a failed frame instead"),
        ("fp_skip_bad_box", "dpsnake's select filters cells by min_cell_angle and volume_range instead"),
    ):
        if ctx.has(key):
            ctx.note(key, ctx.get(key), why)
    ctx.source("label", "label.potcar_dir, potcars <- fp_pp_path, fp_pp_files (in type_map order)")
    return label


def _vasp_fp_params(ctx: Context, fp: dict) -> dict:
    """DP-GEN's INCAR recipe for ``fp_params`` (dpgen/generator/lib/vasp.py, make_vasp_incar_user_dict)."""
    incar = {"PREC": "A", "ENCUT": fp.get("ecut"), "ISYM": 0, "ALGO": "fast", "EDIFF": fp.get("ediff")}
    incar.update({"LREAL": "A", "NPAR": fp.get("npar"), "KPAR": fp.get("kpar"), "NELMIN": 4, "ISIF": 2})
    smearing = str(fp.get("smearing") or "")
    if smearing:
        method = smearing.split(":")[0].lower()
        order = {"gauss": 0, "fd": -1}.get(method, int(smearing.split(":")[1]) if ":" in smearing else 1)
        incar["ISMEAR"] = order
    if fp.get("sigma") is not None:
        incar["SIGMA"] = fp["sigma"]
    incar.update({"LWAVE": False, "LCHARG": False, "PSTRESS": 0, "KSPACING": fp.get("kspacing"), "KGAMMA": False})
    if fp.get("metagga") not in (None, "NONE"):
        incar.update({"LASPH": True, "METAGGA": fp["metagga"]})
    incar.update({str(k).upper(): v for k, v in (fp.get("user_vasp_params") or {}).items()})
    known = {"ecut", "ediff", "npar", "kpar", "smearing", "sigma", "kspacing", "metagga", "user_vasp_params"}
    unused_subkeys(ctx, "fp_params", fp, known, "not a key of DP-GEN's VASP recipe")
    return {k: v for k, v in incar.items() if v is not None}


QE_OWNED = {
    "control": ("calculation", "tprnfor", "tstress", "outdir", "pseudo_dir", "prefix"),
    "system": ("nat", "ntyp", "ibrav"),
}
QE_SMEARING = {"gauss": "gaussian", "mp": "mp", "fd": "fd"}


def _pwscf(ctx: Context, type_map: list[str]) -> dict:
    pseudo_dir, pps = _pp(ctx, type_map)
    label = {"type": "qe", "pseudo_dir": pseudo_dir, "pseudopotentials": pps}
    if ctx.has("user_fp_params"):
        user = dict(ctx.get("user_fp_params"))
        for nl in ("control", "system", "electrons"):
            section = {k: v for k, v in (user.pop(nl, None) or {}).items() if not k.startswith("_")}
            for key in QE_OWNED.get(nl, ()):
                if key in section:  # the labeler sets them; DP-GEN's values are the same single-point setup
                    section.pop(key)
            if nl == "system":
                for key in ("ecutwfc", "ecutrho", "smearing", "degauss"):
                    if key in section:
                        label[key] = section.pop(key)
                if section.get("occupations") == "smearing":
                    section.pop("occupations")
            if section:
                label[nl] = section
        if "kspacing" in user:
            label["kspacing"] = user.pop("kspacing")
        unused_subkeys(ctx, "user_fp_params", user, set(), "not a pw.x namelist the labeler writes")
        ctx.source("label", "label.<namelists>, ecutwfc, kspacing <- user_fp_params")
        if ctx.has("fp_params"):
            ctx.note("fp_params", ctx.get("fp_params"), "ignored: user_fp_params takes precedence (in DP-GEN too)")
    elif ctx.has("fp_params"):
        fp = ctx.get("fp_params")
        label.update({"ecutwfc": fp.get("ecut"), "kspacing": fp.get("kspacing")})
        if fp.get("ediff") is not None:
            label["electrons"] = {"conv_thr": fp["ediff"]}
        if fp.get("smearing"):
            label["smearing"] = QE_SMEARING.get(str(fp["smearing"]).split(":")[0].lower(), fp["smearing"])
            label["degauss"] = fp.get("sigma")
        known = {"ecut", "ediff", "smearing", "sigma", "kspacing"}
        unused_subkeys(ctx, "fp_params", fp, known, "not a key of DP-GEN's pwscf recipe")
        ctx.source("label", "label.ecutwfc, electrons.conv_thr, smearing, degauss, kspacing <- fp_params")
    else:
        raise ctx.error("user_fp_params", "fp_style pwscf needs user_fp_params or fp_params")
    if label.get("ecutwfc") is None:
        raise ctx.error("user_fp_params", "no ecutwfc (system.ecutwfc or fp_params.ecut)")
    return {k: v for k, v in label.items() if v is not None}


def _find(tree: dict, *path):
    """A value deep in a nested dict, case-insensitive keys; None if absent."""
    node = tree
    for part in path:
        if not isinstance(node, dict):
            return None
        node = next((v for k, v in node.items() if str(k).upper() == part), None)
    return node


def _cp2k(ctx: Context, type_map: list[str]) -> dict:
    label = {"type": "cp2k"}
    if ctx.has("external_input_path"):
        ctx.note(
            "external_input_path",
            ctx.get("external_input_path"),
            "a CP2K input with DP-GEN's conventions: turn it into a dpsnake template ({{CELL}}, {{COORD}}, "
            "{{KINDS}} markers, docs/labelers.md) and set label.template",
        )
    user = ctx.get("user_fp_params") or ctx.get("fp_params") or {}
    taken = {
        ("FORCE_EVAL", "DFT", "BASIS_SET_FILE_NAME"): "basis_set_file",
        ("FORCE_EVAL", "DFT", "POTENTIAL_FILE_NAME"): "potential_file",
        ("FORCE_EVAL", "DFT", "MGRID", "CUTOFF"): "cutoff",
        ("FORCE_EVAL", "DFT", "MGRID", "REL_CUTOFF"): "rel_cutoff",
        ("FORCE_EVAL", "DFT", "CHARGE"): "charge",
        ("FORCE_EVAL", "DFT", "MULTIPLICITY"): "multiplicity",
        ("FORCE_EVAL", "DFT", "SCF", "EPS_SCF"): "eps_scf",
        ("FORCE_EVAL", "DFT", "SCF", "MAX_SCF"): "max_scf",
        ("FORCE_EVAL", "DFT", "XC", "XC_FUNCTIONAL", "_"): "xc",
    }
    for path, key in taken.items():
        value = _find(user, *path)
        if value is not None and not isinstance(value, dict):
            label[key] = value
    kinds = _find(user, "FORCE_EVAL", "SUBSYS", "KIND") or {}
    elements = kinds.get("_") or []
    elements = elements if isinstance(elements, list) else [elements]
    for dp_key, key in (("BASIS_SET", "basis"), ("POTENTIAL", "potential")):
        values = kinds.get(dp_key)
        if values is not None:
            values = values if isinstance(values, list) else [values]
            label[key] = {el: v for el, v in zip(elements, values)}
    _cp2k_leftovers(ctx, user, set(taken) | {("FORCE_EVAL", "SUBSYS", "KIND")})
    if user:
        ctx.source("label", "label.cutoff, rel_cutoff, basis, potential, files, xc, SCF <- user_fp_params (CP2K tree)")
    return label


def _cp2k_leftovers(ctx: Context, tree: dict, taken: set, path=()) -> None:
    for k, v in (tree or {}).items():
        here = path + (str(k).upper(),)
        if here in taken or str(k).startswith("_"):
            continue
        if any(here == t[: len(here)] for t in taken) and isinstance(v, dict):
            _cp2k_leftovers(ctx, v, taken, here)
        else:
            ctx.note(
                "user_fp_params." + ".".join(here), v, "a CP2K input entry the labeler does not take (its template)"
            )


ABACUS_OWNED = ("suffix", "calculation", "cal_force", "cal_stress", "pseudo_dir", "orbital_dir", "stru_file")
ABACUS_OWNED += ("kpoint_file", "ntype")


def _abacus(ctx: Context, type_map: list[str]) -> dict:
    pseudo_dir, pps = _pp(ctx, type_map)
    label = {"type": "abacus", "pseudo_dir": pseudo_dir, "pseudopotentials": pps}
    if ctx.has("user_fp_params"):
        params = {k: v for k, v in ctx.get("user_fp_params").items() if not k.startswith("_")}
        ctx.source("label", "label.ecutwfc, basis_type, smearing_*, input <- user_fp_params")
    elif ctx.has("fp_incar"):
        params = _read_abacus_input(ctx, ctx.get("fp_incar"))
        ctx.source("label", "label.ecutwfc, basis_type, smearing_*, input <- fp_incar (INPUT, read)")
    else:
        raise ctx.error("user_fp_params", "fp_style abacus needs user_fp_params or fp_incar")
    for key in ("ecutwfc", "basis_type", "smearing_method", "smearing_sigma"):
        if key in params:
            label[key] = params.pop(key)
    for key in ABACUS_OWNED:
        params.pop(key, None)  # the labeler writes them
    if params:
        label["input"] = params
    if ctx.has("fp_orb_files"):
        label["orbital_dir"] = pseudo_dir
        label["orbitals"] = {el: str(f) for el, f in zip(type_map, ctx.get("fp_orb_files"))}
    kpts = ctx.get("k_points")
    if kpts and "kspacing" not in params and not params.get("gamma_only"):
        label["kpts"] = [int(k) for k in kpts[:3]]
        if any(kpts[3:6]):
            ctx.note("k_points", kpts, "a shifted mesh: the labeler writes Gamma-centred meshes")
    for key, why in (
        ("fp_kpt_file", "a KPT file: give label.kpts instead"),
        ("fp_dpks_descriptor", "DeePKS: not in the labeler"),
    ):
        if ctx.has(key):
            ctx.note(key, ctx.get(key), why)
    if label.get("ecutwfc") is None:
        raise ctx.error("user_fp_params", "no ecutwfc")
    return label


def _read_abacus_input(ctx: Context, path) -> dict:
    p = ctx.resolve(path)
    if not p.is_file():
        raise ctx.error("fp_incar", f"{p}: no such file")
    out = {}
    for line in p.read_text().splitlines():
        words = line.split("#")[0].split()
        if len(words) >= 2 and words[0] != "INPUT_PARAMETERS":
            out[words[0]] = _scalar(" ".join(words[1:]))
    return out


def _gaussian(ctx: Context, type_map: list[str]) -> dict:
    fp = ctx.get("fp_params") or ctx.get("user_fp_params") or {}
    keywords = fp.get("keywords")
    if isinstance(keywords, list):
        ctx.note("fp_params.keywords", keywords, "several Gaussian steps: only the first is used")
        keywords = keywords[0] if keywords else ""
    words = str(keywords or "").split()
    method = next((w for w in words if "/" in w), None)
    extra = [w for w in words if w != method and w.lower() not in ("force", "forces")]
    kwargs = {}
    if method:
        kwargs["method"], kwargs["basis"] = method.split("/", 1)
    if fp.get("basis_set"):
        kwargs["basis"] = fp["basis_set"]
    if extra:
        kwargs["extra"] = " ".join(extra)
    if fp.get("nproc"):
        kwargs["nprocshared"] = int(fp["nproc"])
    kwargs["charge"] = int(fp.get("charge", 0))
    mult = fp.get("multiplicity", "auto")
    if mult == "auto":
        ctx.note("fp_params.multiplicity", mult, "no automatic multiplicity in ASE's Gaussian: 1 is used")
        mult = 1
    kwargs["mult"] = int(mult)
    known = {"keywords", "nproc", "charge", "multiplicity", "basis_set"}
    unused_subkeys(ctx, "fp_params", fp, known, "no equivalent in ASE's Gaussian calculator")
    for key in ("use_clusters", "cluster_cutoff", "cluster_cutoff_hard", "cluster_minify"):
        if ctx.has(key):
            ctx.note(key, ctx.get(key), "cluster extraction for labels: not in dpsnake")
    ctx.source("label", "label: ASE's Gaussian calculator <- fp_params (keywords, nproc, charge, multiplicity)")
    return {"type": "ase", "calculator": "ase.calculators.gaussian.Gaussian", "kwargs": kwargs}


STYLES = {"vasp": _vasp, "pwscf": _pwscf, "cp2k": _cp2k, "abacus": _abacus, "gaussian": _gaussian}


def fp_command(style: str, command: str) -> str:
    """machine.json's fp command as the labeler's command template."""
    cmd = command.strip()
    if style == "pwscf":
        cmd = re.sub(r"\s*<\s*input\b", "", cmd)
        return cmd if "{input}" in cmd else f"{cmd} -in {{input}}"
    if style == "cp2k":
        cmd = re.sub(r"\binput\.inp\b", "{input}", cmd)
        cmd = re.sub(r"\s*1?>\s*output\b", "", cmd)
        return cmd if "{input}" in cmd else f"{cmd} -i {{input}}"
    return re.sub(r"\s*1?>\s*\S+\s*$", "", cmd)  # vasp, abacus: the labeler captures stdout itself


def build_label(ctx: Context, type_map: list[str], override: dict | None, command: str | None) -> dict:
    """The ``label`` section from ``fp_style`` (or ``override``, from --labeler)."""
    style = ctx.require("fp_style")
    if override is not None:
        for key in FP_KEYS:
            if ctx.has(key):
                ctx.note(key, ctx.get(key), "replaced by --labeler")
        ctx.source("label", f"label <- --labeler (instead of fp_style {style})")
        label = dict(override)
    elif style in STYLES:
        label = STYLES[style](ctx, type_map)
        ctx.source("label", f"label.type {label['type']} <- fp_style {style}")
        if command and style != "gaussian":
            label["command"] = fp_command(style, command)
            ctx.source("label", "label.command <- machine.json fp command")
    else:
        raise ctx.error(
            "fp_style", f"{style!r}: dpsnake has no labeler for it; give one with --labeler (docs/labelers.md)"
        )
    for key in FP_KEYS:
        if ctx.has(key) and key not in ctx.used:
            ctx.note(key, ctx.get(key), f"not used with fp_style {style}")
    ratio = ctx.get("ratio_failed")
    if ratio is not None:
        label["max_failed_fraction"] = float(ratio)
        ctx.source("label", "label.max_failed_fraction <- ratio_failed")
    return label
