"""Engine settings (:class:`EngineSettings`, frozen) and the state one ensemble's calls share
(:class:`EngineContext`).

An :class:`~dpsnake.engine.ensemble.Ensemble` owns one context made from its settings and passes it
down (neighbour build, runtime models, nets); nothing in the engine reads the environment. The
table of every setting is in docs/engine.md. :meth:`EngineSettings.from_env` reads the former
``DPSNAKE_*`` variables from a mapping the caller gives (the bench scripts pass the process environment).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass, field

import numpy as np

FAMILIES = ("nets", "env", "scatter", "desc", "nbr", "graph", "attn", "attn_core", "attn_layer")
# attn_core is off by default: 1.07x slower than cuBLAS + the row kernels on an H200 (docs/benchmarks.md);
# attn_layer (tf32 only) is on: a force call 2.209 vs 2.496 us/atom on an H200 (session 34; 2.652 vs 2.947 on an
# H100, session 33), 0.4x the memory pool
DEFAULT_FAST = frozenset(FAMILIES) - {"attn_core"}
_CHOICES = {
    "select": ("warp", "thread"),
    "fused": ("auto", "on", "off"),
    "desc": ("block", "elementwise"),
    "widths": ("auto", "exact", "guess"),
}


@dataclass(frozen=True)
class EngineSettings:
    """How the engine runs; every field has the default that the benchmarks found best.

    Accuracy choices are ``tf32`` (and the Ensemble's ``precision`` and ``compress``); ``chunk_mb``
    bounds memory; the others switch kernels for ablations (bench scripts) and never change results
    beyond rounding.
    """

    tf32: bool = False
    """FP32 cuBLAS GEMMs on TF32 tensor cores (mixed precision on CuPy only): se_e2_a's fitting nets;
    se_atten's whole force call (attention, descriptor, the nets that no fused kernel runs). Accuracy
    in docs/benchmarks.md. Was ``DPSNAKE_TF32=1``."""
    chunk_mb: float | None = None
    """Work memory per chunk of centres in MB; None: 64 on CPUs (cache-sized chunks: 1.2x faster
    than 2048 there), a third of the free device memory on GPUs (an Ensemble's ``chunk_atoms``
    overrides it). Was ``DPSNAKE_CHUNK_MB``."""
    keep_heap: bool = True
    """On CPUs (NumPy), let glibc keep freed work memory in the process (``xp.keep_freed_memory``,
    process-wide, set at an ensemble's first NumPy call): 2x per force call on the development
    machine, where returning each temporary to the kernel cost half the time in page faults."""
    cpu_workers: int | None = None
    """Threads that run chunks of centres at once on CPUs (NumPy releases the GIL in its loops), BLAS
    single-threaded inside them; None: as many as BLAS has threads (OMP_NUM_THREADS and the like, as
    the caller set them), 1: chunks one after the other with BLAS's own threads. Results do not
    depend on it (each chunk's sums are added in chunk order). With None, a call of less than 128 MB of
    work memory (ensemble.CPU_POOL_MIN_MB: the demo's 256 atoms are 49) runs its chunks one after the other."""
    skin: float = 0.0
    """On CPUs (NumPy): keep each batch's neighbour candidates within rcut + skin (A) between calls and
    rebuild them only when an atom may have come within rcut unseen (a Verlet list, engine/verlet.py);
    for MD, where positions move little per call (the explorer sets 1.0 on CPUs). 0: a full search
    every call (calls on unrelated frames would rebuild every time)."""
    kernels: bool = True
    """The engine's CUDA kernels for CuPy arrays (selection, fused and tabulated embedding nets);
    False: CuPy runs the array code. Was ``DPSNAKE_KERNELS=0``."""
    fast: frozenset = DEFAULT_FAST
    """Families of fused elementwise kernels used on CuPy (subset of :data:`FAMILIES`: nets, env,
    scatter, desc, nbr; graph = the MD integrator as CUDA graphs; attn = the row kernels of DPA-1's
    attention, cuda/attn_rows.py; attn_core = with attn on, FP64 layers as one fused kernel per direction,
    cuda/attn_core.py, not in the default: slower so far; attn_layer = with attn on and ``tf32`` in mixed
    precision, each whole attention layer as one TF32 kernel per direction, cuda/attn_layer.py). "all"
    (``parse``, ``DPSNAKE_FAST=1``) is every family. Was ``DPSNAKE_FAST``."""
    select: str = "warp"
    """Neighbour-selection kernel: "warp" (a 32-thread block per centre) or "thread" (a thread per
    centre). Was ``DPSNAKE_SELECT``."""
    fused: str = "auto"
    """Fused embedding-net kernels (cuda/fused.py; se_atten's strip-mode net: cuda/strip_net.py, FP32 with "auto",
    not in small FP64 chunks): "auto" (FP32 nets; FP64 nets in chunks of at most
    ``fused_fp64_atoms`` centres), "on" (FP64 too, always), "off" (cuBLAS array code). Was
    ``DPSNAKE_FUSED`` (auto/1/0)."""
    fused_fp64_atoms: int = 1024
    """With ``fused`` "auto": FP64 nets run the fused kernels in chunks of at most this many centres,
    where a call is bound by kernel launches (the GPU demo's 256 atoms: 1.1-1.6x per force call on an
    H200 for embedding nets from [8, 16] to [25, 50, 100], 1.08-1.22x at 1,024); larger chunks keep cuBLAS
    (the FP64 backward kernel's 255 registers: [25, 50, 100] 0.89x at 2,048 atoms, 0.53-0.62x from 4,096).
    0: never."""
    tab_kernels: bool = True
    """CUDA kernels of tabulated embedding nets (cuda/tab.py; se_atten with attention layers:
    cuda/strip_tab.py); False: tabulate.py's array code.
    ``DPSNAKE_FUSED=0`` turned these off too."""
    strip_tc: bool = False
    """se_atten strip mode with ``tf32`` (and the fused nets): the geometric net and type gate on TF32 tensor
    cores (cuda/strip_net_tc.py) rather than cuda/strip_net.py's FP32 FMAs. Off: its first build was slower on
    an H100 (2.75 + 5.10 against 2.02 + 4.33 ms per force call of 27,648 atoms, docs/benchmarks.md "Session
    35"); session 40 (H100, bench/profiling/strip_net_probe.py): 1.108 + 3.805 ms against the FMA kernels'
    1.349 + 2.940, and G moves 6.6e-4 (TF32)."""
    fused_bwd_minb: int | None = None
    """Blocks per SM the fused backward kernel is compiled for (caps its registers); None: 3 for FP32,
    the compiler's choice for FP64; 0: the compiler's choice. Was ``DPSNAKE_FUSED_BWD_MINB``."""
    tab_lps: int = 8
    """Lanes per neighbour slot of the tabulated backward kernel (power of two <= 32). Was
    ``DPSNAKE_TAB_LPS``."""
    desc: str = "block"
    """Descriptor kernels of the ``desc`` family: "block" (a block per centre, cuda/desc.py, where
    the shared memory fits) or "elementwise". Was ``DPSNAKE_DESC``."""
    compact: bool = True
    """Compact slots: chunks keep only the neighbour slots some centre fills (se_atten: the slots up
    to the chunk's most filled one, the empty rest added analytically, attn/ensemble.py). Was
    ``DPSNAKE_COMPACT=0``."""
    fill_order: bool = True
    """se_atten: the centres of a type run in the order of the slots each filled in the last call of the same
    batch shape (attn/ensemble.py), so that the few centres with the most neighbours share chunks and the rest
    run fewer slots (the layer kernels run slots rounded up to 16: fcc Cu at 300 K fills 78 for 99% of centres
    and 79-80 for the rest, and a chunk holding one 79 runs 96 rather than 80). H100, session 43, 256 x 108
    CuNi, one call: a force call 1.305 against 1.370 us/atom, compressed 1.187 against 1.272; the same forces.
    Session 44, the exploration (256 x 108 Cu, 300 K, NPT): 1.582 against 1.749 us/atom-step, compressed 1.431
    against 1.592. Cutting the sorted centres where the kernels' rows change as well (session 44's fill_split,
    903a7d3) was slower there (1.756 against 1.645: the chunks' sizes moved every call, twice the width misses) and
    was removed. False: the layout's order."""
    attn_ex2: bool = True
    """se_atten, the whole-layer kernels (cuda/attn_layer.py): the softmax's exp(L - max) as 2^(L log2 e - max log2
    e) on ``ex2.approx`` (one FFMA and one MUFU, ~2 ulp, against expf's ~8 instructions), in the forward and in the
    backward's recomputed softmax alike (T stays the forward's to the bit). H100, session 44, one call: per centre
    and layer forward 0.0982 against 0.1033 us, backward 0.3224 against 0.3407, the same errors against FP64; a
    force call 1.285 against 1.315 us/atom (compressed 1.159 against 1.204); the exploration 1.547 against 1.614
    us/atom-step (compressed 1.413 against 1.493). False: expf."""
    attn_xhat16: bool = False
    """se_atten, the whole-layer kernels: a force call's forward keeps the LayerNorm's xhat (unit variance) for the
    backward in FP16 (XH; FP16's 11-bit significand against the TF32 operands' 10), halving 35 of the ~138 KB per
    centre and layer that the keeping forward writes and the backward reads (88 slots, E 100, H 128). H100, session
    45, one call: per centre and layer keeping forward 0.1537 against 0.1601 us, backward 0.3253 against 0.3217; a
    force call 1.207 against 1.216 us/atom (compressed 1.094 against 1.106); df/dG against FP64 1.1e-4 against
    2.3e-5 (d r, d sw unchanged)."""
    attn_prefetch: bool = False
    """se_atten, the whole-layer kernels: each block of the forward sends the next centre's x toward L2
    (``prefetch.global.L2``) while it runs this one (PREF; a hint: the results are the same). H100, session 45's
    probe: per centre and layer forward 0.0969 against 0.0995 us, keeping forward 0.1549 against 0.1601 (~-1.1% per
    layer), but no gain where it counts (H100, session 46, one machine): a force call 1.235 against 1.231 us/atom
    without (compressed 1.125 both), the exploration 1.518 / 1.494 against 1.482 / 1.484 us/atom-step without (two
    runs). Off by default again since session 46. The backward's prefetch of dout and xhat (session 44) measured
    slower (0.3476 against 0.3217 per layer; ptxas's spills 184 / 300 bytes against 100 / 196) and was removed."""
    widths: str = "auto"
    """Compaction widths and bin grids: "auto" (reused from the last call on CuPy, checked after the
    call is issued; the chunk's own on NumPy), "exact" (always the chunk's own: a host sync per
    chunk), "guess" (reused on NumPy too, for tests). Was ``DPSNAKE_WIDTHS``."""

    def __post_init__(self):
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"EngineSettings.{name}: {getattr(self, name)!r} is not one of {choices}")
        fast = frozenset(self.fast)
        if fast - set(FAMILIES):
            raise ValueError(f"EngineSettings.fast: unknown families {sorted(fast - set(FAMILIES))}")
        object.__setattr__(self, "fast", fast)
        if self.tab_lps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"EngineSettings.tab_lps={self.tab_lps} is not a power of two <= 32")
        if self.cpu_workers is not None and not (isinstance(self.cpu_workers, int) and self.cpu_workers >= 1):
            raise ValueError(f"EngineSettings.cpu_workers={self.cpu_workers!r} must be an int >= 1 or None")
        if not (isinstance(self.skin, (int, float)) and self.skin >= 0):
            raise ValueError(f"EngineSettings.skin={self.skin!r} must be a number >= 0 (A)")
        if self.chunk_mb is not None and not self.chunk_mb > 0:
            raise ValueError(f"EngineSettings.chunk_mb={self.chunk_mb} must be positive")

    def replace(self, **changes) -> EngineSettings:
        """A copy with ``changes`` (fields by name)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain values (``fast`` as a sorted list): JSON, and ``EngineSettings(**d)`` round trips."""
        d = dataclasses.asdict(self)
        d["fast"] = sorted(self.fast)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EngineSettings:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"EngineSettings: unknown settings {sorted(unknown)}")
        return cls(**{k: (frozenset(v) if k == "fast" else v) for k, v in d.items()})

    @classmethod
    def from_env(cls, environ, base: EngineSettings | None = None) -> EngineSettings:
        """Settings from the former ``DPSNAKE_*`` variables in ``environ`` (a mapping: the
        process environment), on top of ``base`` (defaults). For the bench scripts' command lines; the
        engine never calls it."""
        s = base or cls()
        ch = {}
        get = environ.get
        if get("DPSNAKE_TF32") is not None:
            ch["tf32"] = get("DPSNAKE_TF32") == "1"
        if get("DPSNAKE_CHUNK_MB"):
            ch["chunk_mb"] = float(get("DPSNAKE_CHUNK_MB"))
        if get("DPSNAKE_KERNELS") is not None:
            ch["kernels"] = get("DPSNAKE_KERNELS") != "0"
        fast = get("DPSNAKE_FAST")
        if fast is not None:
            fast = fast.strip().lower()
            if fast in ("0", "none", "off", ""):
                ch["fast"] = frozenset()
            elif fast in ("1", "all"):
                ch["fast"] = frozenset(FAMILIES)
            else:  # unknown names were ignored by the variable: kept so
                ch["fast"] = frozenset(x.strip() for x in fast.split(",")) & set(FAMILIES)
        if get("DPSNAKE_SELECT") is not None:
            ch["select"] = "thread" if get("DPSNAKE_SELECT") == "thread" else "warp"
        fused = get("DPSNAKE_FUSED")
        if fused is not None:
            ch["fused"] = {"1": "on", "0": "off"}.get(fused, "auto")
            ch["tab_kernels"] = fused != "0"
        minb = get("DPSNAKE_FUSED_BWD_MINB")
        if minb is not None:
            ch["fused_bwd_minb"] = int(minb) if minb.strip() else 0
        if get("DPSNAKE_TAB_LPS"):
            ch["tab_lps"] = int(get("DPSNAKE_TAB_LPS"))
        if get("DPSNAKE_DESC") is not None:
            ch["desc"] = "elementwise" if get("DPSNAKE_DESC") == "elementwise" else "block"
        if get("DPSNAKE_COMPACT") is not None:
            ch["compact"] = get("DPSNAKE_COMPACT") != "0"
        if get("DPSNAKE_WIDTHS") is not None:
            w = get("DPSNAKE_WIDTHS")
            ch["widths"] = w if w in ("exact", "guess") else "auto"
        return s.replace(**ch)

    @classmethod
    def parse(cls, items, base: EngineSettings | None = None) -> EngineSettings:
        """Settings from ``NAME=VALUE`` strings (bench scripts' ``--set``): bools as 0/1, ``fast``
        as a comma list (or all / none), ``chunk_mb`` and ``fused_bwd_minb`` "none" for None."""
        s = base or cls()
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        ch = {}
        for item in items:
            name, sep, val = item.partition("=")
            name = name.strip()
            if not sep or name not in types:
                raise ValueError(f"--set {item!r}: expected NAME=VALUE with NAME one of {sorted(types)}")
            val = val.strip()
            t = types[name]
            if name == "fast":
                v = val.lower()
                none = v in ("", "0", "none", "off")
                ch[name] = frozenset(FAMILIES) if v in ("1", "all") else frozenset(() if none else v.split(","))
            elif t == "bool":
                if val.lower() not in ("0", "1", "true", "false"):
                    raise ValueError(f"--set {item!r}: {name} takes 0 or 1")
                ch[name] = val.lower() in ("1", "true")
            elif val.lower() == "none" and "None" in t:
                ch[name] = None
            elif t.startswith("float"):
                ch[name] = float(val)
            elif t.startswith("int"):
                ch[name] = int(val)
            else:
                ch[name] = val
        return s.replace(**ch)


_CUBLAS_TF32_TENSOR_OP_MATH = 3  # cublas_api.h's cublasMath_t value; CuPy does not export the name


@dataclass
class EngineContext:
    """Settings plus what the calls of one ensemble share: kernel families switched off after a
    failure (``broken``), small device constants, compaction slots and the bin grids kept per
    layout. Owned by an Ensemble (``Ensemble.ctx``); a function given none makes a fresh one."""

    settings: EngineSettings = field(default_factory=EngineSettings)
    broken: set = field(default_factory=set)
    """Kernel families that failed to compile or launch: the array code runs from then on."""
    consts: dict = field(default_factory=dict)
    slots: dict = field(default_factory=dict)
    grids: dict = field(default_factory=dict)
    """Per layout of periodic batches (neighbor.NeighborBuilder): {"grid": the last host-made bin
    grid, "room": ghosts the next call's arrays have room for}."""

    @staticmethod
    def of(ctx: EngineContext | EngineSettings | None) -> EngineContext:
        """``ctx`` itself, a fresh context of settings, or a default one for None."""
        if isinstance(ctx, EngineContext):
            return ctx
        return EngineContext(ctx if ctx is not None else EngineSettings())

    # ------------------------------------------------------------------ kernel switches
    def kernels(self, xp) -> bool:
        """The engine's CUDA kernels run for namespace ``xp`` (CuPy, unless settings.kernels off)."""
        return xp.__name__ == "cupy" and self.settings.kernels

    def fast(self, xp, family: str) -> bool:
        """Fused elementwise kernel family ``family`` is used for ``xp``."""
        return xp.__name__ == "cupy" and family in self.settings.fast and family not in self.broken

    def fused(self, xp, dtype: str) -> bool:
        """Fused embedding kernels for every chunk of nets of ``dtype``: "auto" FP32 only (faster than
        cuBLAS for FP32 nets, slower for FP64 ones in large chunks: docs/benchmarks.md, History)."""
        mode = self.settings.fused
        return self.kernels(xp) and (mode == "on" or (mode == "auto" and dtype == "float32"))

    def fused_small(self, xp, dtype: str) -> int:
        """Largest chunk (centres) in which nets of ``dtype`` run the fused kernels although
        :meth:`fused` is off for them ("auto" FP64: ``fused_fp64_atoms``); 0: none."""
        st = self.settings
        return st.fused_fp64_atoms if self.kernels(xp) and st.fused == "auto" and dtype != "float32" else 0

    def tab_kernels(self, xp) -> bool:
        return self.kernels(xp) and self.settings.tab_kernels

    def select_mode(self) -> str:
        """Neighbour-selection kernel, "warp" or "thread" (also after the warp kernel failed)."""
        return "thread" if "select_warp" in self.broken else self.settings.select

    def guarded(self, family: str, fn, *args):
        """fn(*args); on any error switch ``family`` off for this context, warn, return None."""
        try:
            return fn(*args)
        except Exception as exc:  # compile or launch failure: fall back to the array code
            self.broken.add(family)
            warnings.warn(
                f"dpsnake fused kernels '{family}' disabled: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=3
            )
            return None

    def tf32_on(self, xp, dtype) -> bool:
        """settings.tf32 applies to the GEMMs of ``dtype`` on ``xp``: FP32 on CuPy with the kernels on."""
        return bool(self.settings.tf32 and self.kernels(xp) and np.dtype(dtype) == np.float32)

    @contextlib.contextmanager
    def tf32(self, xp, dtype):
        """Within: FP32 cuBLAS GEMMs of CuPy (cupy.matmul and friends) use TF32 tensor cores if
        settings.tf32; a no-op otherwise. cuda/bmm.py takes its own ``tf32`` argument.

        Two switches, because CuPy has two routes: 2-D products take CuPy's compute type, but
        cupy.matmul of 3-D operands passes plain FP32 to cuBLAS whatever that says, so the cuBLAS
        handle's math mode (CUBLAS_TF32_TENSOR_OP_MATH) is set as well."""
        if not self.tf32_on(xp, dtype):
            yield
            return
        from cupy._core import _routines_linalg as linalg
        from cupy_backends.cuda.libs import cublas

        old = linalg.get_compute_type(np.float32)
        handle = xp.cuda.device.get_cublas_handle()
        old_mode = cublas.getMathMode(handle)
        linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32)
        cublas.setMathMode(handle, _CUBLAS_TF32_TENSOR_OP_MATH)
        try:
            yield
        finally:
            linalg.set_compute_type(np.float32, old)
            cublas.setMathMode(handle, old_mode)

    # ------------------------------------------------------------------ caches
    def device_const(self, xp, host):
        """A small constant host array on ``xp``'s device, copied once per (contents, device): a
        copy from pageable host memory waits for the device, so none is made per call. Read only."""
        from dpsnake.engine.xp import device_key

        host = np.asarray(host)
        if xp is np:
            return host
        key = (host.dtype.str, host.shape, host.tobytes(), *device_key(xp))
        if key not in self.consts:
            if len(self.consts) > 1024:
                self.consts.clear()
            self.consts[key] = xp.asarray(host)
        return self.consts[key]

    def kept_grid(self, layout) -> dict:
        """{"grid", "room"} of a layout of periodic batches (see ``grids``)."""
        if layout not in self.grids:
            if len(self.grids) >= 64:  # many layouts seen (a long-lived process): drop the oldest
                self.grids.pop(next(iter(self.grids)))
            self.grids[layout] = {"grid": None, "room": None}
        return self.grids[layout]
