"""Load DeePMD-kit 3.x ``.dp`` model files (HDF5 from ``dp convert-backend``) with h5py + json alone.

Supported: descriptor ``se_e2_a`` (alias ``se_a``) + fitting ``ener``; any number of types;
``type_one_side`` true/false; descriptor ``exclude_types``; model ``pair_exclude_types`` and
``atom_exclude_types`` (the fitting's own ``exclude_types`` is ignored, as DeePMD-kit does); residual
layers with/without ``idt``; every activation DeePMD-kit offers for these nets; FP64 and FP32 models.
Anything else fails at load with one :class:`~dpsnake.errors.UserError` line naming it, and so do
damaged files: every array must be readable, finite and of the shape the JSON implies
(:mod:`dpsnake.engine.validate`).
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field

import numpy as np

from dpsnake.engine.nets import Net
from dpsnake.engine.validate import ArrayReader, DamagedModelError
from dpsnake.errors import UserError


@dataclass
class DPModel:
    """One se_e2_a + ener Deep Potential, weights as NumPy arrays (host).

    Shapes: ``davg``/``dstd`` (ntypes, nnei, 4); ``bias`` (ntypes,) = bias_atom_e + out_bias (eV);
    ``embeddings[k]`` with k = t_neighbour (type_one_side) or t_center + ntypes * t_neighbour;
    ``fittings[t]`` one net per center type (input M1 * axis_neuron, output 1).
    """

    path: str
    type_map: list[str]
    rcut: float
    rcut_smth: float
    sel: list[int]
    neuron: list[int]
    axis_neuron: int
    type_one_side: bool
    env_protection: float
    precision: str  # "float64" or "float32": the precision the model was trained in
    davg: np.ndarray
    dstd: np.ndarray
    embeddings: list[Net | None]
    fittings: list[Net | None]
    bias: np.ndarray
    desc_exclude: np.ndarray  # (ntypes, ntypes) bool, symmetric: descriptor exclude_types
    pair_exclude: np.ndarray  # (ntypes, ntypes) bool, symmetric: model pair_exclude_types
    atom_exclude: np.ndarray  # (ntypes,) bool: model atom_exclude_types (as DeePMD-kit, not the fitting's)
    # descriptor exclude_types also zero the empty (padding) slots of an excluded block, as the
    # TensorFlow backend does; DeePMD-kit's PyTorch/NumPy backends keep padding at -davg/dstd there
    exclude_padding: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def ntypes(self) -> int:
        return len(self.type_map)

    @property
    def nnei(self) -> int:
        return int(sum(self.sel))

    @property
    def sec(self) -> list[int]:
        """Slot offsets of the per-type neighbour blocks: block t is sec[t]:sec[t+1]."""
        return [0, *np.cumsum(self.sel).tolist()]

    def embedding(self, t_center: int, t_neigh: int) -> Net | None:
        return self.embeddings[t_neigh if self.type_one_side else t_center + self.ntypes * t_neigh]

    def same_geometry(self, other: DPModel) -> bool:
        """Whether two models can share neighbour data (same rcut, sel, type_map, pair exclusions)."""
        return (
            self.type_map == other.type_map
            and self.rcut == other.rcut
            and list(self.sel) == list(other.sel)
            and np.array_equal(self.pair_exclude, other.pair_exclude)
        )


def _fail(path, msg):
    raise UserError(f"{path}: {msg}")


def _pairs(ntypes, pairs, path, key):
    m = np.zeros((ntypes, ntypes), dtype=bool)
    for p in pairs or []:
        if len(p) != 2 or not all(0 <= int(t) < ntypes for t in p):
            _fail(path, f"{key}: bad type pair {p!r}")
        m[int(p[0]), int(p[1])] = m[int(p[1]), int(p[0])] = True
    return m


def _energy_bias(rd: ArrayReader, fit: dict, m: dict, nt: int) -> np.ndarray:
    """The energy bias per type (ntypes,): the fitting's ``bias_atom_e`` (ntypes, 1) plus the model's
    ``out_bias`` (1, ntypes, 1), either absent = 0."""
    bias_e = rd.array(fit.get("@variables", {}).get("bias_atom_e"), "fitting bias_atom_e", nt, f"({nt}, 1)")
    bias = np.zeros(nt) if bias_e is None else np.asarray(bias_e, dtype=np.float64).reshape(nt)
    ob = rd.array(m.get("@variables", {}).get("out_bias"), "model out_bias", nt, f"(1, {nt}, 1)")
    if ob is not None:
        bias = bias + np.asarray(ob, dtype=np.float64).reshape(nt)
    return bias


def _atom_exclusion(m: dict, nt: int, path) -> np.ndarray:
    """(ntypes,) bool: the model's ``atom_exclude_types``. DeePMD-kit's atomic model replaces the
    fitting's own exclude_types by these (DPAtomicModel: fitting_net.reinit_exclude(atom_exclude_types)),
    so the fitting's list is ignored, in every backend."""
    atom_ex = np.zeros(nt, dtype=bool)
    for t in m.get("atom_exclude_types") or []:
        if not 0 <= int(t) < nt:
            _fail(path, f"atom_exclude_types: type {t!r} is not in 0..{nt - 1}")
        atom_ex[int(t)] = True
    return atom_ex


_DESC_OK = {"se_e2_a", "se_a"}


def load_model(path, exclusion: str | None = None) -> DPModel:
    """Read a ``.dp`` file (DeePMD-kit 3.x, ``dp convert-backend``) into a :class:`DPModel`.

    exclusion: how descriptor ``exclude_types`` treat empty neighbour slots: "tf" (zeroed, as the
    TensorFlow backend's frozen .pb computes), "v3" (kept at -davg/dstd, as DeePMD-kit's PyTorch and
    NumPy backends compute), or None: the semantics of the backend that wrote the file ("backend"
    in its JSON). The two agree for models without descriptor exclude_types.
    Raises UserError (one line naming the file, and the array where one is at fault) for a missing or
    unreadable file, an unsupported model feature, or an array that cannot be read, holds NaN/inf,
    or has a shape other than the model's description implies.
    """
    import h5py

    path = str(path)
    p = pathlib.Path(path)
    if not p.is_file():
        _fail(path, "model file not found")
    if p.suffix in (".pb", ".pth", ".pt"):
        _fail(path, f"{p.suffix} models are not read directly: run `dp convert-backend {p.name} model.dp`")
    try:
        h5 = h5py.File(path, "r")
    except Exception as err:  # OSError for most damage; h5py raises others for some
        raise DamagedModelError(f"{path}: not a readable HDF5 .dp model file ({' '.join(str(err).split())})") from None
    with h5:
        try:
            root = json.loads(h5.attrs["json"])
        except Exception:  # missing attribute, damaged bytes (OSError, UnicodeDecodeError), bad JSON
            raise DamagedModelError(f"{path}: no readable 'json' attribute: not a DeePMD-kit .dp file") from None
        if not isinstance(root, dict):
            raise DamagedModelError(f"{path}: the 'json' attribute is not a model description")
        try:
            return _read(ArrayReader(h5, path), root, path, exclusion)
        except UserError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            # a JSON of the wrong structure (hand-edited, another program's file)
            raise DamagedModelError(
                f"{path}: malformed model description in the 'json' attribute ({type(err).__name__}: {err})"
            ) from None


def _read(rd: ArrayReader, root: dict, path: str, exclusion) -> DPModel:
    """The model of an open file: supported features, then arrays read and checked by ``rd``."""
    m = root.get("model", {})
    mtype = m.get("type", "standard")
    if mtype != "standard":
        _fail(path, f"model type {mtype!r} is unsupported (only standard energy models)")
    if m.get("spin"):
        _fail(path, "spin models are unsupported")
    desc, fit = m.get("descriptor", {}), m.get("fitting", {})
    dtype = desc.get("type")
    if dtype not in _DESC_OK:
        _fail(path, f"descriptor type {dtype!r} is unsupported (only se_e2_a)")
    ftype = fit.get("type")
    if ftype != "ener":
        _fail(path, f"fitting type {ftype!r} is unsupported (only ener)")
    for key in ("numb_fparam", "numb_aparam", "dim_case_embd"):
        if int(fit.get(key) or 0):
            _fail(path, f"fitting {key}={fit.get(key)} is unsupported")
    if fit.get("atom_ener"):
        if any(x is not None for x in fit["atom_ener"]):
            _fail(path, "fitting atom_ener is unsupported")
    if fit.get("mixed_types"):
        _fail(path, "fitting mixed_types=true is unsupported")
    if int(fit.get("dim_out", 1)) != 1:
        _fail(path, f"fitting dim_out={fit.get('dim_out')} is unsupported")
    envd = desc.get("env_mat", {})
    if envd.get("use_exp_switch"):
        _fail(path, "descriptor env_mat use_exp_switch=true is unsupported")
    if desc.get("spin"):
        _fail(path, "descriptor spin is unsupported")
    if desc.get("compress") or "compress" in desc.get("@variables", {}):
        _fail(path, "compressed (tabulated) models are unsupported: use the uncompressed model")
    precision = str(desc.get("precision", "float64"))
    if precision not in ("float64", "float32"):
        _fail(path, f"descriptor precision {precision!r} is unsupported (float64 or float32)")
    if exclusion is None:
        exclusion = "tf" if str(root.get("backend", "")).lower() == "tensorflow" else "v3"
    if exclusion not in ("tf", "v3"):
        _fail(path, f"exclusion={exclusion!r} is not 'tf' or 'v3'")
    type_map = list(m.get("type_map") or desc.get("type_map"))
    nt = len(type_map)
    sel = [int(s) for s in (desc["sel"] if isinstance(desc["sel"], list) else [desc["sel"]])]
    if len(sel) != nt:
        _fail(path, f"descriptor sel has {len(sel)} entries for {nt} types")
    rcut, rcut_smth = float(desc["rcut"]), float(desc["rcut_smth"])
    if not 0 <= rcut_smth < rcut:
        _fail(path, f"descriptor rcut_smth {rcut_smth} and rcut {rcut}: need 0 <= rcut_smth < rcut")
    neuron, axis = [int(n) for n in desc["neuron"]], int(desc["axis_neuron"])
    if not neuron or not 0 < axis <= neuron[-1]:
        _fail(path, f"descriptor axis_neuron {axis} with neuron {neuron}: need 0 < axis_neuron <= neuron[-1]")
    nnei = sum(sel)
    dv = desc.get("@variables", {})
    shape = f"({nt}, {nnei}, 4) = (ntypes, sum(sel), 4)"
    davg, dstd = (
        rd.array(dv.get(k), f"descriptor {k}", nt * nnei * 4, shape, positive=k == "dstd") for k in ("davg", "dstd")
    )
    if davg is None or dstd is None:
        _fail(path, "descriptor @variables: davg and dstd are required")
    nets = desc.get("embeddings", {}).get("networks", [])
    tos = bool(desc.get("type_one_side", False))
    need = nt if tos else nt * nt
    if len(nets) != need:
        _fail(path, f"descriptor has {len(nets)} embedding nets, expected {need}")
    # embedding nets map s(r) (1 column) to neuron[-1]; fitting nets map the descriptor to 1 energy
    embeddings = [rd.net(n, f"embedding net {k}", 1, neuron[-1]) for k, n in enumerate(nets)]
    fnets = fit.get("nets", {}).get("networks", [])
    if len(fnets) != nt:
        _fail(path, f"fitting has {len(fnets)} nets, expected {nt}")
    fittings = [rd.net(n, f"fitting net {k}", neuron[-1] * axis, 1) for k, n in enumerate(fnets)]
    bias = _energy_bias(rd, fit, m, nt)
    rd.others(m)  # arrays the engine does not use (out_std, ...): damage there is damage too
    return DPModel(
        path=path,
        type_map=type_map,
        rcut=rcut,
        rcut_smth=rcut_smth,
        sel=sel,
        neuron=neuron,
        axis_neuron=axis,
        type_one_side=tos,
        env_protection=float(desc.get("env_protection", 0.0) or 0.0),
        precision=precision,
        davg=np.asarray(davg, dtype=np.float64).reshape(nt, nnei, 4),
        dstd=np.asarray(dstd, dtype=np.float64).reshape(nt, nnei, 4),
        embeddings=embeddings,
        fittings=fittings,
        bias=bias,
        desc_exclude=_pairs(nt, desc.get("exclude_types"), path, "descriptor exclude_types"),
        pair_exclude=_pairs(nt, m.get("pair_exclude_types"), path, "pair_exclude_types"),
        atom_exclude=_atom_exclusion(m, nt, path),
        exclude_padding=exclusion == "tf",
        meta={"version": root.get("version"), "backend": root.get("backend")},
    )
