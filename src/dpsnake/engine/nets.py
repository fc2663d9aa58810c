"""Dense networks of DeePMD-kit (embedding and fitting nets): forward with a cache, and the
backward pass for the input gradient only (weights are fixed at inference).

Layer: ``y = act(x W + b) * idt + residual(x)`` with residual ``x`` when out == in and
``concat(x, x)`` when out == 2 * in (only if ``resnet``), exactly as ``deepmd.dpmodel.utils.network``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dpsnake.engine.cuda import elementwise as ew

_GELU_C = math.sqrt(2.0 / math.pi)


def _sigmoid(xp, x):
    return 1.0 / (1.0 + xp.exp(-x))


def _act(xp, name: str, z):
    """Return (act(z), act'(z)) for DeePMD-kit's activation ``name``."""
    if name == "tanh":
        y = xp.tanh(z)
        return y, 1.0 - y * y
    if name in ("none", "linear"):
        return z, None
    if name == "relu":
        m = (z > 0).astype(z.dtype)
        return z * m, m
    if name == "relu6":
        return xp.clip(z, 0.0, 6.0), ((z > 0) & (z < 6)).astype(z.dtype)
    if name == "softplus":
        e = xp.exp(-xp.abs(z))
        y = xp.where(z > 0, z + xp.log(1 + e), xp.log(1 + e))
        return y, _sigmoid(xp, z)
    if name == "sigmoid":
        s = _sigmoid(xp, z)
        return s, s * (1 - s)
    if name in ("gelu", "gelu_tf"):
        t = xp.tanh(_GELU_C * (z + 0.044715 * z**3))
        y = 0.5 * z * (1 + t)
        return y, 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * z * z)
    if name == "silu":
        s = _sigmoid(xp, z)
        return z * s, s * (1 + z * (1 - s))
    if name.startswith(("silut", "custom_silu")):
        thr = float(name.split(":")[-1]) if ":" in name else 3.0
        sg = 1 / (1 + math.exp(-thr))
        slope, const = sg + thr * sg * (1 - sg), thr * sg
        s = _sigmoid(xp, z)
        t = xp.tanh(slope * (z - thr))
        lo = z < thr
        return xp.where(lo, z * s, t + const), xp.where(lo, s * (1 + z * (1 - s)), slope * (1 - t * t))
    raise ValueError(f"unsupported activation {name!r}")


ACTIVATIONS = {"tanh", "none", "linear", "relu", "relu6", "softplus", "sigmoid", "gelu", "gelu_tf", "silu"}


@dataclass
class Layer:
    """One dense layer; ``w`` (in, out), ``b`` (out,) or None, ``idt`` (out,) or None."""

    w: object
    b: object
    idt: object
    activation: str
    resnet: bool

    @property
    def nin(self) -> int:
        return self.w.shape[0]

    @property
    def nout(self) -> int:
        return self.w.shape[1]


def _imul(a, b):
    a *= b
    return a


class Net:
    """A stack of :class:`Layer` s."""

    def __init__(self, layers: list[Layer]):
        self.layers = layers

    @property
    def nin(self) -> int:
        return self.layers[0].nin

    @property
    def nout(self) -> int:
        return self.layers[-1].nout

    def to(self, xp, dtype) -> Net:
        """Copy with weights as ``xp`` arrays of ``dtype`` (cast from the stored precision)."""

        def cv(a):
            return None if a is None else xp.asarray(np.asarray(a), dtype=dtype)

        return Net([Layer(cv(l.w), cv(l.b), cv(l.idt), l.activation, l.resnet) for l in self.layers])

    def forward(self, xp, x, keep: bool = True, ctx=None):
        """x (..., nin) -> y (..., nout); with ``keep`` also the cache for :meth:`backward`.
        ``ctx``: the EngineContext whose ``nets`` kernels may run (None: the array code alone)."""
        cache = []
        fast = ctx is not None and ctx.fast(xp, "nets")
        for l in self.layers:
            if fast and l.activation == "tanh":  # CuPy: one fused kernel per layer
                out = ctx.guarded("nets", ew.dense_tanh, xp, l, x, keep)
                if out is not None:
                    x, dy = out
                    if keep:
                        cache.append(dy)
                    continue
                fast = False
            if l.nin == 1:  # outer product: cheaper than a K=1 GEMM
                z = x * l.w[0]
            else:  # one 2-D GEMM (a stack of small ones is slow in NumPy)
                z = (x.reshape(-1, l.nin) @ l.w).reshape(*x.shape[:-1], l.nout)
            if l.b is not None:
                z += l.b
            if l.activation == "tanh":  # in place: z is a fresh array (saves temporaries)
                y = xp.tanh(z, out=z)
                dy = y * y
                xp.subtract(1.0, dy, out=dy)
            else:
                y, dy = _act(xp, l.activation, z)
            if l.idt is not None:
                y = y * l.idt if y is x else _imul(y, l.idt)
                dy = l.idt if dy is None else _imul(dy, l.idt)
            if l.resnet and l.nout == l.nin:
                y = y + x
            elif l.resnet and l.nout == 2 * l.nin:
                y = y.copy() if y is x else y
                y[..., : l.nin] += x
                y[..., l.nin :] += x
            if keep:
                cache.append(dy)
            x = y
        return x, cache

    def backward(self, xp, gy, cache, ctx=None):
        """Input gradient: gy = dL/dy (..., nout) -> dL/dx (..., nin) (``ctx`` as :meth:`forward`)."""
        fast = ctx is not None and ctx.fast(xp, "nets")
        for l, dy in zip(reversed(self.layers), reversed(cache)):
            gz = gy if dy is None else gy * dy
            if l.nin == 1:  # a GEMV instead of a product + reduction
                gx = (gz.reshape(-1, l.nout) @ l.w[0]).reshape(*gz.shape[:-1], 1)
            else:
                gx = (gz.reshape(-1, l.nout) @ l.w.T).reshape(*gz.shape[:-1], l.nin)
            if l.resnet and l.nout == l.nin:
                gx += gy
            elif l.resnet and l.nout == 2 * l.nin:
                if not (fast and l.nin > 1 and ctx.guarded("nets", ew.add_concat_grad, xp, gx, gy, l.nin) is not None):
                    gx += gy[..., : l.nin]
                    gx += gy[..., l.nin :]
            gy = gx
        return gy
