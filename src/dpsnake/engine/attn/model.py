"""Load DeePMD-kit 3.x se_atten / se_atten_v2 (DPA-1) ``.dp`` models with h5py + json alone.

Supported: descriptor ``se_atten`` (alias ``dpa1``) and ``se_atten_v2`` + fitting ``ener`` (mixed
types: one net; or one per type); ``tebd_input_mode`` concat and strip (``se_atten_v2``: strip with
``smooth_type_embedding``); ``smooth_type_embedding``; ``type_one_side``; ``concat_output_tebd``;
``attn_layer`` 0..n (the attention layers: :mod:`dpsnake.engine.attn.attention`); descriptor
``exclude_types``; ``set_davg_zero`` (davg stored as zeros); ``env_protection``; model
``pair_exclude_types`` / ``atom_exclude_types``; FP64 and FP32 models. Anything else (lmax > 1,
spin, fparam/aparam, electronic-configuration type embeddings, compressed models, an activation
DeePMD-kit's nets lack, ...) fails at load with one :class:`~dpsnake.errors.UserError` line naming
the file and the feature; damaged arrays as :mod:`dpsnake.engine.validate` says.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field

import numpy as np

from dpsnake.engine.model import _atom_exclusion, _energy_bias, _fail, _pairs
from dpsnake.engine.nets import ACTIVATIONS, Net
from dpsnake.engine.validate import ArrayReader, DamagedModelError
from dpsnake.errors import UserError

ATTN_TYPES = {"se_atten", "dpa1", "se_atten_v2"}


@dataclass
class AttnModel:
    """One se_atten(_v2) + ener Deep Potential, weights as NumPy arrays (host).

    ``davg``/``dstd`` (ntypes, nnei, 4) per centre type; ``tebd`` (ntypes + 1, tebd_dim) the type
    embeddings (last row: padding, zeros); ``embedding`` the net on [s, tebd_j(, tebd_i)] (concat)
    or on s alone (strip); ``strip_table`` (strip) the type net's output per type pair,
    ((ntypes + 1)^2, M1) indexed by t_centre * (ntypes + 1) + t_neighbour (type_one_side:
    (ntypes + 1, M1) by t_neighbour); ``attention`` the attention layers
    (:class:`~dpsnake.engine.attn.attention.AttentionLayers`; None for attn_layer 0); ``fittings``
    one net (mixed types) or one per type.
    """

    path: str
    type_map: list[str]
    rcut: float
    rcut_smth: float
    nnei: int
    neuron: list[int]
    axis_neuron: int
    tebd_dim: int
    tebd_mode: str  # "concat" or "strip"
    smooth: bool
    type_one_side: bool
    concat_output_tebd: bool
    env_protection: float
    precision: str
    attn_layer: int
    davg: np.ndarray
    dstd: np.ndarray
    tebd: np.ndarray
    embedding: Net
    strip_table: np.ndarray | None
    attention: object  # AttentionLayers or None
    fittings: list[Net]
    fit_mixed: bool
    bias: np.ndarray
    desc_exclude: np.ndarray
    pair_exclude: np.ndarray
    atom_exclude: np.ndarray
    meta: dict = field(default_factory=dict)

    kind = "se_atten"

    @property
    def ntypes(self) -> int:
        return len(self.type_map)

    @property
    def sel(self) -> list[int]:
        return [self.nnei]

    def fitting(self, t: int) -> Net:
        return self.fittings[0 if self.fit_mixed else t]

    def same_geometry(self, other) -> bool:
        """Whether two models can share neighbour data (same type_map, rcut, nnei, pair exclusions)."""
        return (
            isinstance(other, AttnModel)
            and self.type_map == other.type_map
            and self.rcut == other.rcut
            and self.nnei == other.nnei
            and np.array_equal(self.pair_exclude, other.pair_exclude)
        )


def descriptor_type(path) -> str | None:
    """The descriptor type a ``.dp`` file's JSON names (None if it cannot be read: the loaders say why)."""
    try:
        import h5py

        with h5py.File(str(path), "r") as h5:
            root = json.loads(h5.attrs["json"])
        return str(root["model"]["descriptor"]["type"])
    except Exception:  # noqa: BLE001 (any damage: the full loader reports it)
        return None


def load_attn_model(path) -> AttnModel:
    """Read a se_atten / se_atten_v2 ``.dp`` file into an :class:`AttnModel` (one UserError line
    naming the file and the feature or array at fault otherwise)."""
    import h5py

    path = str(path)
    if not pathlib.Path(path).is_file():
        _fail(path, "model file not found")
    try:
        h5 = h5py.File(path, "r")
    except Exception as err:
        raise DamagedModelError(f"{path}: not a readable HDF5 .dp model file ({' '.join(str(err).split())})") from None
    with h5:
        try:
            root = json.loads(h5.attrs["json"])
        except Exception:
            raise DamagedModelError(f"{path}: no readable 'json' attribute: not a DeePMD-kit .dp file") from None
        if not isinstance(root, dict):
            raise DamagedModelError(f"{path}: the 'json' attribute is not a model description")
        try:
            return _read(ArrayReader(h5, path), root, path)
        except UserError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            raise DamagedModelError(
                f"{path}: malformed model description in the 'json' attribute ({type(err).__name__}: {err})"
            ) from None


def _resolve(rd: ArrayReader, tree, what: str):
    """A copy of a serialized tree with each ``@variables`` reference read as a NumPy array."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            if k == "@variables" and isinstance(v, dict):
                out[k] = {n: (rd.array(r, f"{what} {n}") if isinstance(r, str) else r) for n, r in v.items()}
            else:
                out[k] = _resolve(rd, v, f"{what} {k}")
        return out
    if isinstance(tree, list):
        return [_resolve(rd, v, f"{what}[{i}]") for i, v in enumerate(tree)]
    return tree


def _check_model(path, root, m, desc, fit):
    """Features outside what the engine runs: one line each."""
    if m.get("type", "standard") != "standard":
        _fail(path, f"model type {m.get('type')!r} is unsupported (only standard energy models)")
    if m.get("spin") or desc.get("spin"):
        _fail(path, "spin models are unsupported")
    if str(root.get("backend", "")).lower() == "tensorflow":
        _fail(path, f"{desc.get('type')} models written by the TensorFlow backend are unsupported (PyTorch's are)")
    if fit.get("type") != "ener":
        _fail(path, f"fitting type {fit.get('type')!r} is unsupported (only ener)")
    for key in ("numb_fparam", "numb_aparam", "dim_case_embd"):
        if int(fit.get(key) or 0):
            _fail(path, f"fitting {key}={fit.get(key)} is unsupported")
    if fit.get("atom_ener") and any(x is not None for x in fit["atom_ener"]):
        _fail(path, "fitting atom_ener is unsupported")
    if int(fit.get("dim_out", 1)) != 1:
        _fail(path, f"fitting dim_out={fit.get('dim_out')} is unsupported")
    if int(desc.get("lmax", 1)) != 1:
        _fail(path, f"descriptor lmax={desc.get('lmax')} is unsupported (only 1)")
    if desc.get("attn_mask"):
        _fail(path, "descriptor attn_mask=true is unsupported")
    if (desc.get("env_mat") or {}).get("use_exp_switch"):
        _fail(path, "descriptor env_mat use_exp_switch=true is unsupported")
    if desc.get("compress") or "compress" in desc.get("@variables", {}):
        _fail(path, "compressed (tabulated) se_atten models are unsupported: use the uncompressed model")
    te = desc.get("type_embedding") or {}
    if te.get("use_econf_tebd") or desc.get("use_econf_tebd"):
        _fail(path, "descriptor use_econf_tebd=true (electronic-configuration type embedding) is unsupported")
    if not te.get("padding", True):
        _fail(path, "a type embedding without padding is unsupported")
    precision = str(desc.get("precision", "float64"))
    if precision not in ("float64", "float32"):
        _fail(path, f"descriptor precision {precision!r} is unsupported (float64 or float32)")
    nets = [("embedding net", n) for n in (desc.get("embeddings") or {}).get("networks") or []]
    nets += [("embeddings_strip net", n) for n in (desc.get("embeddings_strip") or {}).get("networks") or []]
    nets += [("type embedding net", te.get("embedding"))]
    nets += [("fitting net", n) for n in (fit.get("nets") or {}).get("networks") or []]
    for what, net in nets:  # an activation the engine lacks is a feature, not damage
        for k, ld in enumerate((net or {}).get("layers") or [] if isinstance(net, dict) else []):
            act = str(ld.get("activation_function", "tanh")).lower()
            if act not in ACTIVATIONS and not act.startswith(("silut", "custom_silu")):
                _fail(path, f"{what} layer {k}: unsupported activation_function {act!r}")


def _read(rd: ArrayReader, root: dict, path: str) -> AttnModel:
    m = root.get("model", {})
    desc, fit = m.get("descriptor", {}), m.get("fitting", {})
    dtype = desc.get("type")
    if dtype not in ATTN_TYPES:
        _fail(path, f"descriptor type {dtype!r} is not se_atten / se_atten_v2")
    _check_model(path, root, m, desc, fit)
    if dtype == "se_atten_v2":
        mode, smooth = "strip", True
    else:
        mode = str(desc.get("tebd_input_mode", "concat"))
        if desc.get("stripped_type_embedding") is not None:
            mode = "strip" if desc["stripped_type_embedding"] else "concat"
        smooth = bool(desc.get("smooth_type_embedding", True))
    if mode not in ("concat", "strip"):
        _fail(path, f"descriptor tebd_input_mode {mode!r} is unsupported (concat or strip)")
    type_map = list(m.get("type_map") or desc.get("type_map"))
    nt = len(type_map)
    sel = desc["sel"]
    nnei = int(sum(sel) if isinstance(sel, list) else sel)
    rcut, rcut_smth = float(desc["rcut"]), float(desc["rcut_smth"])
    if not 0 <= rcut_smth < rcut:
        _fail(path, f"descriptor rcut_smth {rcut_smth} and rcut {rcut}: need 0 <= rcut_smth < rcut")
    neuron, axis = [int(n) for n in desc["neuron"]], int(desc["axis_neuron"])
    if not neuron or not 0 < axis <= neuron[-1]:
        _fail(path, f"descriptor axis_neuron {axis} with neuron {neuron}: need 0 < axis_neuron <= neuron[-1]")
    M1 = neuron[-1]
    tebd_dim = int(desc.get("tebd_dim", 8))
    tos = bool(desc.get("type_one_side", False))
    dv = desc.get("@variables", {})
    shape = f"({nt}, {nnei}, 4) = (ntypes, sel, 4)"
    davg, dstd = (
        rd.array(dv.get(k), f"descriptor {k}", nt * nnei * 4, shape, positive=k == "dstd") for k in ("davg", "dstd")
    )
    if davg is None or dstd is None:
        _fail(path, "descriptor @variables: davg and dstd are required")
    # the type embedding table (constants: computed once here, in FP64), padding row of zeros
    te = desc.get("type_embedding") or {}
    tnet = rd.net(te.get("embedding"), "type embedding net", nt, tebd_dim)
    if tnet is None:
        _fail(path, "descriptor type_embedding: no embedding net")
    tebd = np.concatenate([tnet.forward(np, np.eye(nt), keep=False)[0], np.zeros((1, tebd_dim))])
    nets = (desc.get("embeddings") or {}).get("networks") or []
    if len(nets) != 1:
        _fail(path, f"descriptor has {len(nets)} embedding nets, expected 1")
    tin = tebd_dim if tos else 2 * tebd_dim
    embedding = rd.net(nets[0], "embedding net", 1 + tin if mode == "concat" else 1, M1)
    strip_table = None
    if mode == "strip":
        snets = (desc.get("embeddings_strip") or {}).get("networks") or []
        if len(snets) != 1:
            _fail(path, f"descriptor has {len(snets)} embeddings_strip nets, expected 1")
        snet = rd.net(snets[0], "embeddings_strip net", tin, M1)
        if tos:
            pair_in = tebd
        else:  # row t_centre * (nt + 1) + t_neighbour: [tebd_neighbour, tebd_centre]
            k = nt + 1
            pair_in = np.concatenate([np.tile(tebd[None], (k, 1, 1)), np.tile(tebd[:, None], (1, k, 1))], axis=2)
            pair_in = pair_in.reshape(k * k, 2 * tebd_dim)
        strip_table = snet.forward(np, pair_in, keep=False)[0]
    n_attn = int(desc.get("attn_layer", 0))
    attention = None
    if n_attn:
        from dpsnake.engine.attn.attention import AttentionLayers

        raw = _resolve(rd, desc.get("attention_layers"), "attention_layers")
        layers = (raw or {}).get("attention_layers") or []
        if len(layers) != n_attn:
            _fail(path, f"descriptor attn_layer={n_attn} but {len(layers)} attention layers are stored")
        try:
            attention = AttentionLayers.from_serialized(raw)
        except UserError as err:  # one line, naming the file
            _fail(path, f"descriptor {err}")
        if attention.nnei != nnei:  # the attention counts the slots a chunk leaves out from its nnei
            _fail(path, f"descriptor attention_layers nnei={attention.nnei} but sel sums to {nnei}")
    mixed = bool(fit.get("mixed_types", True))
    fnets = (fit.get("nets") or {}).get("networks") or []
    if len(fnets) != (1 if mixed else nt):
        _fail(path, f"fitting has {len(fnets)} nets, expected {1 if mixed else nt}")
    concat_out = bool(desc.get("concat_output_tebd", True))
    nd = M1 * axis + (tebd_dim if concat_out else 0)
    fittings = [rd.net(n, f"fitting net {k}", nd, 1) for k, n in enumerate(fnets)]
    bias = _energy_bias(rd, fit, m, nt)
    rd.others(m)
    return AttnModel(
        path=path,
        type_map=type_map,
        rcut=rcut,
        rcut_smth=rcut_smth,
        nnei=nnei,
        neuron=neuron,
        axis_neuron=axis,
        tebd_dim=tebd_dim,
        tebd_mode=mode,
        smooth=smooth,
        type_one_side=tos,
        concat_output_tebd=concat_out,
        env_protection=float(desc.get("env_protection", 0.0) or 0.0),
        precision=str(desc.get("precision", "float64")),
        attn_layer=n_attn,
        davg=np.asarray(davg, dtype=np.float64).reshape(nt, nnei, 4),
        dstd=np.asarray(dstd, dtype=np.float64).reshape(nt, nnei, 4),
        tebd=tebd,
        embedding=embedding,
        strip_table=strip_table,
        attention=attention,
        fittings=fittings,
        fit_mixed=mixed,
        bias=bias,
        desc_exclude=_pairs(nt, desc.get("exclude_types"), path, "descriptor exclude_types"),
        pair_exclude=_pairs(nt, m.get("pair_exclude_types"), path, "pair_exclude_types"),
        atom_exclude=_atom_exclusion(m, nt, path),
        meta={"version": root.get("version"), "backend": root.get("backend"), "type": desc.get("type")},
    )
