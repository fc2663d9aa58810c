"""The engine's CUDA kernels (CuPy) and their sources.

Static kernels are ``.cu`` files shipped as package data, read with :func:`load` and compiled with
their sizes and types as ``-D`` options (:func:`options`); the fused embedding kernels (fused.py) are
generated per network. Modules:

- ``selection.py`` (``select_nb.cu``, ``select_nb_warp.cu``): distance-sorted, type-split neighbour
  selection (RawKernel).
- ``elementwise.py`` (``elementwise.cu``): fused elementwise kernels (ElementwiseKernel) of the nets,
  env matrix, scatter, descriptor and compaction; ``nbr.py`` (``nbr.cu``): those of the neighbour
  build.
- ``desc.py`` (``desc.cu``): descriptor D = gr^T gr[:, :axis] and its backward, block per centre.
- ``tab.py`` (``tab.cu``): tabulated embedding nets.
- ``fused.py``: fused embedding nets (generated source).
- ``attn_rows.py``, ``attn_norm.py``, ``strip_gate.py`` (``.cu`` of the same names): se_atten's warp-per-row
  kernels, compiled and launched through :class:`WarpKernels`.

The NumPy/CuPy array code elsewhere in the engine is the reference each kernel is tested against
(tests compile these sources with g++ and with NVRTC; no GPU needed).

``.cu`` conventions read by this loader: ``#include "x.cuh"`` of a sibling file is inlined (the
loaded text is self-contained, for NVRTC and for the tests' g++ builds); a file of elementwise
kernels holds sections ``// @kernel NAME``, ``// @in PARAMS``, ``// @out PARAMS``, then the body
(:func:`elementwise_kernels`).
"""

from __future__ import annotations

import functools
import importlib.resources
import re

_INCLUDE = re.compile(r'^[ \t]*#include "([\w.]+)"[ \t]*$', re.M)


@functools.cache
def load(name: str) -> str:
    """Text of the packaged CUDA source ``name`` with its local ``#include "..."`` inlined (cached:
    the files do not change while the package is loaded)."""
    text = importlib.resources.files(__name__).joinpath(name).read_text()
    return _INCLUDE.sub(lambda m: load(m.group(1)), text)


def options(**defines) -> tuple:
    """NVRTC options for a static kernel: C++14 and ``-DNAME=value`` per define."""
    return ("-std=c++14", *(f"-D{k}={v}" for k, v in defines.items()))


def with_defines(text: str, **defines) -> str:
    """``text`` preceded by ``#define`` lines: the source :func:`options` compiles, as one text
    (for compilers given no options, e.g. the tests' g++ builds)."""
    return "".join(f"#define {k} {v}\n" for k, v in defines.items()) + text


def real(dtype: str) -> str:
    """C type of a NumPy float dtype name."""
    return "float" if dtype == "float32" else "double"


def elementwise_kernels(name: str) -> dict:
    """{kernel name: (in params, out params, body)} of a file of ElementwiseKernel sections."""
    out = {}
    for sec in re.split(r"^// @kernel ", load(name), flags=re.M)[1:]:
        head, _, rest = sec.partition("\n")
        ins = outs = None
        lines = rest.split("\n")
        while lines and lines[0].startswith("// @"):
            tag, _, val = lines.pop(0)[4:].partition(" ")
            if tag == "in":
                ins = val.strip()
            elif tag == "out":
                outs = val.strip()
        if ins is None or outs is None:
            raise ValueError(f"{name}: kernel {head.strip()!r} lacks // @in or // @out")
        out[head.strip()] = (ins, outs, "\n".join(lines).rstrip() + "\n")
    return out


@functools.cache
def _raw_functions(name: str, kernels: tuple, defines: tuple) -> tuple[dict, int]:
    """({kernel: CuPy RawKernel} of the packaged source ``name`` compiled with ``defines`` ((NAME, value)
    pairs), the device's SM count); one module per distinct set of defines, cached."""
    import cupy

    mod = cupy.RawModule(code=load(name), options=options(**dict(defines)))
    return {k: mod.get_function(k) for k in kernels}, cupy.cuda.Device().attributes["MultiProcessorCount"]


class WarpKernels:
    """The kernels ``kernels`` of the packaged source ``name`` whose threads work one warp per unit (a
    row, a neighbour slot) in a grid-stride loop, ``wpb`` warps per block: each set of compile-time
    constants (``-D`` defines) is its own module, compiled on first use and cached."""

    def __init__(self, name: str, kernels: tuple, wpb: int):
        self.name, self.kernels, self.wpb = name, tuple(kernels), int(wpb)

    def source(self, **defines) -> str:
        """The source with ``defines`` as ``#define`` lines (one self-contained text, for the tests)."""
        return with_defines(load(self.name), **defines)

    def build(self, **defines) -> dict:
        """{kernel: RawKernel} for ``defines`` (compiled now unless cached; raises what NVRTC raises)."""
        return _raw_functions(self.name, self.kernels, tuple(defines.items()))[0]

    def launch(self, kernel: str, units: int, args: tuple, **defines) -> None:
        """Run ``kernel`` over ``units`` warps' work (nothing for 0): at most 64 blocks per SM, the
        kernel loops over the rest."""
        if units:
            fns, nsm = _raw_functions(self.name, self.kernels, tuple(defines.items()))
            fns[kernel]((int(max(1, min(-(-units // self.wpb), nsm * 64))),), (32 * self.wpb,), args)
