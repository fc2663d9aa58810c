"""Load DeePMD-kit 3.x ``.dp`` model files (HDF5 from ``dp convert-backend``) with h5py + json alone.

Supported: descriptor ``se_e2_a`` (alias ``se_a``) + fitting ``ener``; any number of types;
``type_one_side`` true/false; descriptor ``exclude_types``; model ``pair_exclude_types`` and
``atom_exclude_types`` (and the fitting's ``exclude_types``); residual layers with/without ``idt``;
every activation DeePMD-kit offers for these nets; FP64 and FP32 models.
Anything else fails at load with one :class:`~dpsnake.errors.UserError` line naming it.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field

import numpy as np

from dpsnake.errors import UserError
from dpsnake.engine.nets import ACTIVATIONS, Layer, Net


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
    atom_exclude: np.ndarray  # (ntypes,) bool: model atom_exclude_types + fitting exclude_types
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

    def same_geometry(self, other: "DPModel") -> bool:
        """Whether two models can share neighbour data (same rcut, sel, type_map, pair exclusions)."""
        return (self.type_map == other.type_map and self.rcut == other.rcut
                and list(self.sel) == list(other.sel)
                and np.array_equal(self.pair_exclude, other.pair_exclude))


def _fail(path, msg):
    raise UserError(f"{path}: {msg}")


def _var(h5, ref, path):
    if ref is None:
        return None
    if not isinstance(ref, str) or ref not in h5:
        _fail(path, f"missing array {ref!r} in the HDF5 file")
    return np.array(h5[ref])


def _net(h5, netd, path, what) -> Net | None:
    if netd is None:
        return None
    layers = []
    for k, ld in enumerate(netd.get("layers", [])):
        if ld.get("@class", "Layer") != "Layer":
            _fail(path, f"{what} layer {k}: unsupported layer class {ld.get('@class')!r}")
        act = str(ld.get("activation_function", "tanh")).lower()
        if act not in ACTIVATIONS and not act.startswith(("silut", "custom_silu")):
            _fail(path, f"{what} layer {k}: unsupported activation_function {act!r}")
        v = ld.get("@variables", {})
        w = _var(h5, v.get("w"), path)
        b = _var(h5, v.get("b"), path) if ld.get("bias", True) else None
        idt = _var(h5, v.get("idt"), path) if ld.get("use_timestep", False) or v.get("idt") else None
        layers.append(Layer(w=w, b=b, idt=idt, activation=act, resnet=bool(ld.get("resnet", False))))
    return Net(layers)


def _pairs(ntypes, pairs, path, key):
    m = np.zeros((ntypes, ntypes), dtype=bool)
    for p in pairs or []:
        if len(p) != 2 or not all(0 <= int(t) < ntypes for t in p):
            _fail(path, f"{key}: bad type pair {p!r}")
        m[int(p[0]), int(p[1])] = m[int(p[1]), int(p[0])] = True
    return m


_DESC_OK = {"se_e2_a", "se_a"}


def load_model(path, exclusion: str | None = None) -> DPModel:
    """Read a ``.dp`` file (DeePMD-kit 3.x, ``dp convert-backend``) into a :class:`DPModel`.

    exclusion: how descriptor ``exclude_types`` treat empty neighbour slots: "tf" (zeroed, as the
    TensorFlow backend's frozen .pb computes), "v3" (kept at -davg/dstd, as DeePMD-kit's PyTorch and
    NumPy backends compute), or None: the semantics of the backend that wrote the file ("backend"
    in its JSON). The two agree for models without descriptor exclude_types.
    Raises UserError (one line) for a missing/unreadable file or an unsupported model feature.
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
    except OSError as err:
        _fail(path, f"not an HDF5 .dp model file ({err})")
    with h5:
        try:
            root = json.loads(h5.attrs["json"])
        except (KeyError, ValueError):
            _fail(path, "no 'json' attribute: not a DeePMD-kit .dp file")
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
        if m.get("pair_exclude_types") is None:
            m["pair_exclude_types"] = []
        type_map = list(m.get("type_map") or desc.get("type_map"))
        nt = len(type_map)
        sel = [int(s) for s in (desc["sel"] if isinstance(desc["sel"], list) else [desc["sel"]])]
        if len(sel) != nt:
            _fail(path, f"descriptor sel has {len(sel)} entries for {nt} types")
        dv = desc.get("@variables", {})
        davg, dstd = _var(h5, dv.get("davg"), path), _var(h5, dv.get("dstd"), path)
        emb = desc.get("embeddings", {})
        nets = emb.get("networks", [])
        tos = bool(desc.get("type_one_side", False))
        need = nt if tos else nt * nt
        if len(nets) != need:
            _fail(path, f"descriptor has {len(nets)} embedding nets, expected {need}")
        embeddings = [_net(h5, n, path, f"embedding net {k}") for k, n in enumerate(nets)]
        fnets = fit.get("nets", {}).get("networks", [])
        if len(fnets) != nt:
            _fail(path, f"fitting has {len(fnets)} nets, expected {nt}")
        fittings = [_net(h5, n, path, f"fitting net {k}") for k, n in enumerate(fnets)]
        fv = fit.get("@variables", {})
        bias_e = _var(h5, fv.get("bias_atom_e"), path)
        bias = np.zeros(nt) if bias_e is None else np.asarray(bias_e, dtype=np.float64).reshape(nt, -1)[:, 0]
        mv = m.get("@variables", {})
        ob = _var(h5, mv.get("out_bias"), path)
        if ob is not None:
            bias = bias + np.asarray(ob, dtype=np.float64).reshape(-1, nt)[0]
    atom_ex = np.zeros(nt, dtype=bool)
    for t in list(m.get("atom_exclude_types") or []) + list(fit.get("exclude_types") or []):
        atom_ex[int(t)] = True
    precision = str(desc.get("precision", "float64"))
    if precision not in ("float64", "float32"):
        _fail(path, f"descriptor precision {precision!r} is unsupported (float64 or float32)")
    if exclusion is None:
        exclusion = "tf" if str(root.get("backend", "")).lower() == "tensorflow" else "v3"
    if exclusion not in ("tf", "v3"):
        _fail(path, f"exclusion={exclusion!r} is not 'tf' or 'v3'")
    nnei = sum(sel)
    davg = np.asarray(davg, dtype=np.float64).reshape(nt, nnei, 4)
    dstd = np.asarray(dstd, dtype=np.float64).reshape(nt, nnei, 4)
    return DPModel(
        path=path, type_map=type_map, rcut=float(desc["rcut"]), rcut_smth=float(desc["rcut_smth"]),
        sel=sel, neuron=list(desc["neuron"]), axis_neuron=int(desc["axis_neuron"]), type_one_side=tos,
        env_protection=float(desc.get("env_protection", 0.0) or 0.0), precision=precision,
        davg=davg, dstd=dstd, embeddings=embeddings, fittings=fittings, bias=bias,
        desc_exclude=_pairs(nt, desc.get("exclude_types"), path, "descriptor exclude_types"),
        pair_exclude=_pairs(nt, m.get("pair_exclude_types"), path, "pair_exclude_types"),
        atom_exclude=atom_ex, exclude_padding=exclusion == "tf", meta={"version": root.get("version"), "backend": root.get("backend")},
    )
