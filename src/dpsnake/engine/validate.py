"""Reading a ``.dp`` file's arrays with checks: each array readable, floating point, finite, and of
the shape the model's JSON implies (a net's layers chain from its input width to its output width).

A file whose weights were overwritten (0xff bytes read as NaN), cut short, or edited by hand fails
here with one :class:`DamagedModelError` line (a UserError) naming the file and the array, e.g.
``model.dp: /variable_0006 (fitting net 0 layer 0 w): 256 of 256 values are not finite (NaN/inf)``,
instead of NaN energies or a reshape traceback deep in the engine.
"""

from __future__ import annotations

import numpy as np

from dpsnake.engine.nets import ACTIVATIONS, Layer, Net
from dpsnake.errors import UserError

# Bounds no trained model comes near (DeePMD-kit keeps dstd >= 1e-2; energies of heavy elements
# in all-electron codes are ~1e5-1e6 eV): beyond them a float is damage (e.g. 0x7f bytes), and
# would overflow to inf/NaN in the nets
HUGE = 1e12
TINY = 1e-12


class DamagedModelError(UserError):
    """A ``.dp`` file that cannot be read as written (damaged bytes, wrong shapes, bad JSON), as
    opposed to a readable model with a feature the engine lacks (plain UserError): another engine
    would read the same damage, so callers choosing an engine should not fall back on this."""


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())  # HDF5 messages can span lines
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class ArrayReader:
    """The arrays of one open ``.dp`` file (``h5``: an h5py File; ``path``: its name in messages)."""

    def __init__(self, h5, path: str):
        self.h5 = h5
        self.path = path
        self.read = set()  # refs read so far (``others`` checks the rest)

    def fail(self, msg: str):
        raise DamagedModelError(f"{self.path}: {msg}")

    def array(self, ref, what: str, size: int | None = None, shape_text: str = "", positive=False):
        """The dataset ``ref`` (the JSON's path string, e.g. "/variable_0003") as a NumPy array, or
        None for a null ref. ``what`` names it in messages ("descriptor davg"); ``size``: the number
        of elements the model needs (``shape_text`` says which shape); ``positive``: no values
        near zero (dstd divides)."""
        if ref is None:
            return None
        if not isinstance(ref, str):
            self.fail(f"{what}: {ref!r} is not an array path")
        import h5py  # here: importing dpsnake.engine.model stays free of h5py, as before

        name = f"{ref} ({what})"
        self.read.add(ref)
        try:
            node = self.h5[ref] if ref in self.h5 else None
        except Exception as err:  # h5py raises KeyError/OSError/RuntimeError on damaged metadata
            self.fail(f"{name}: cannot read ({_one_line(err)})")
        if node is None:
            self.fail(f"{name}: missing from the HDF5 file")
        if not isinstance(node, h5py.Dataset):
            self.fail(f"{name}: an HDF5 {type(node).__name__.lower()}, not an array")
        try:
            a = np.array(node)
        except Exception as err:  # damaged chunks or type headers (RuntimeError), failing filters
            self.fail(f"{name}: cannot read ({_one_line(err)})")
        if a.dtype.kind != "f":
            self.fail(f"{name}: {a.dtype} values, expected floating point")
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            self.fail(f"{name}: {bad} of {a.size} values are not finite (NaN/inf)")
        big = float(np.abs(a).max()) if a.size else 0.0
        if big > HUGE:
            self.fail(
                f"{name}: values up to {big:.3g} in magnitude (over {HUGE:g}: not trained weights; a damaged file?)"
            )
        if size is not None and a.size != size:
            self.fail(f"{name}: shape {a.shape}, expected {shape_text or (size,)}")
        if positive and a.size and float(np.abs(a).min()) < TINY:
            self.fail(
                f"{name}: {int(np.count_nonzero(np.abs(a) < TINY))} of {a.size} values are below "
                f"{TINY:g} in magnitude (it divides)"
            )
        return a

    def net(self, netd, what: str, nin: int, nout: int) -> Net | None:
        """One dense net from its JSON dict; its layers must chain nin -> ... -> nout:
        w (in, out), b (out,), idt (out,)."""
        if netd is None:
            return None
        if not isinstance(netd, dict):
            self.fail(f"{what}: {type(netd).__name__} where a network is expected")
        layers = []
        width = nin
        lds = netd.get("layers") or []
        if not lds:
            self.fail(f"{what}: no layers")
        # each layer's output width from the net's own description: neuron (+ out_dim for a
        # fitting net's last layer); None where it does not say (the layers must still chain)
        outs = [int(n) for n in netd.get("neuron") or []]
        if len(outs) + 1 == len(lds):
            outs.append(int(netd.get("out_dim", nout)))
        outs = outs if len(outs) == len(lds) else [None] * len(lds)
        for k, ld in enumerate(lds):
            lw = f"{what} layer {k}"
            if ld.get("@class", "Layer") != "Layer":
                self.fail(f"{lw}: unsupported layer class {ld.get('@class')!r}")
            act = str(ld.get("activation_function", "tanh")).lower()
            if act not in ACTIVATIONS and not act.startswith(("silut", "custom_silu")):
                self.fail(f"{lw}: unsupported activation_function {act!r}")
            v = ld.get("@variables") or {}
            w = self.array(v.get("w"), f"{lw} w")
            if w is None:
                self.fail(f"{lw}: no weight matrix w")
            if w.ndim != 2 or w.shape[0] != width or outs[k] not in (None, w.shape[1]):
                self.fail(f"{v['w']} ({lw} w): shape {w.shape}, expected ({width}, {outs[k] or 'n'})")
            out = int(w.shape[1])
            vec = f"({out},)"
            b = self.array(v.get("b"), f"{lw} b", out, vec) if ld.get("bias", True) else None
            idt = (
                self.array(v.get("idt"), f"{lw} idt", out, vec)
                if ld.get("use_timestep", False) or v.get("idt")
                else None
            )
            for a in (b, idt):
                if a is not None:
                    a.shape = (out,)  # same size: (1, out) stored as (out,)
            layers.append(Layer(w=w, b=b, idt=idt, activation=act, resnet=bool(ld.get("resnet", False))))
            width = out
        if width != nout:
            self.fail(
                f"{lds[-1]['@variables']['w']} ({what} layer {len(lds) - 1} w): output width {width}, expected {nout}"
            )
        return Net(layers)

    def others(self, tree, where: str = "model") -> None:
        """Check the arrays of ``tree`` (the JSON's model dict) that the engine does not use (e.g.
        ``out_std``) as :meth:`array` does: a damaged one means a damaged file."""
        if isinstance(tree, dict):
            for k, v in tree.items():
                if k == "@variables" and isinstance(v, dict):
                    for name, ref in v.items():
                        if isinstance(ref, str) and ref not in self.read:
                            self.array(ref, f"{where} {name}")
                else:
                    self.others(v, f"{where} {k}")
        elif isinstance(tree, list):
            for i, v in enumerate(tree):
                self.others(v, f"{where}[{i}]")
