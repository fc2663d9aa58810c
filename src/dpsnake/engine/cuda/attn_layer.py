"""A whole DPA-1 attention layer per centre on tensor cores (CuPy RawModule, attn_layer.cu): forward and backward,
one kernel each; attention.py runs a layer in them with mixed + TF32 and the family ``attn_layer``. The products
take FP16 operands (``mma.m16n8k16``, FP32 accumulators) where H % 16 == 0 (``F16`` the forward's, ``B16`` the
backward's; FP16 keeps TF32's 10 mantissa bits, the backward scales each centre's gradient by a power of two into
FP16's range), else TF32 (``mma.m16n8k8``).

Why: in mixed precision with TF32 a se_atten_v2 force call (attn_layer 2, 256 x 108 atoms, H200) spends
~26 of ~69 ms in the attention's row kernels and most of the rest in GEMMs whose (n, n) and (n, H)
operands go through device memory (docs/benchmarks.md, "TF32 for se_atten"); 10x DeePMD-kit needs the
whole call in ~31 ms. Here one block per centre runs the layer from its input x to its LayerNorm output
with nothing of size (n, n) or (n, H) in device memory: the in and out projections, q/k/v normalisation,
logits, smooth softmax, dot-product gate, A v and LayerNorm, on ``mma.m16n8k8`` TF32 tensor cores (that is the
forward alone; a force call's forward also keeps q, k, v and xhat for the backward, and the backward passes three
(N, N) matrices through a small per-block scratch).

The backward (attn_layer_bwd.cuh) reads what the forward kept (normalized q, k, v, in FP16 where ``normalize``
makes them unit rows (``YH``); their inverse norms, LayerNorm's xhat and rstd), stages k and v (then do, then q) in
shared memory, recomputes the logits and the softmax, and keeps the three (n, n) matrices whose transposes it needs
(A, dL) or that a lane reads back (L) in shared memory with ``B16`` (A and dL in FP16, L in their rows until they
are written), else in a per-block scratch in device memory (grid x 3 N^2 floats, N = n rounded up to 16; mostly in
L2). Its column sums over the (n, n) matrices run eight at a time (``col_sum8``). With a
ring (``WRING`` the forward's, ``BRING`` the backward's) the kernels read the weights through shared memory that the
block fills with ``cp.async`` (attn_layer_common.cuh's ``wprod``): they leave L2 once per block, not once per warp. A
product that runs while k's or v's array is free can ring through that array, as many k tiles in flight as fit
(``wprod_deep``, ``WDEEP``). Without a ring each warp loads its weight fragments itself (through L1).

Status (issue 21; docs/benchmarks.md, "Whole-layer TF32 kernels" and "Session 36" to "Session 38"): the cuBLAS TF32
path's errors against FP64 (the same to two digits). On an H100 (session 36) per centre and layer, FP16 operands
against TF32's: the forward keeping 0.191 vs 0.278 us, alone 0.105 vs 0.152, the backward 0.474 vs 0.544; a force
call 1.713 us/atom (11.6x DeePMD-kit FP64; 2.002 with session 35's TF32 kernels). Session 38 (H100): keeping forward
0.161, backward 0.342; a force call 1.396 us/atom (14.1-14.4x DeePMD-kit FP64). On an H200 (session 34, TF32
operands) per centre and layer: the forward alone 0.154 us (deep rings; the cuBLAS path 0.360), a force call's
forward 0.260 (two-stage ring, FP16 q, k, v; 0.361) and backward 0.506 (no ring; 0.553); a force call 2.209 us/atom
against the cuBLAS path's 2.496 (7.18x DeePMD-kit FP64), so the family is in ``settings.DEFAULT_FAST`` (it runs
where ``tf32`` is on); ``defines`` picks the rings per kernel from the A/B in that section (sessions 33-34). Tested
without a GPU (g++ with threaded warps and emulated ``mma``s, exact or with cvt.rna's / FP16's rounding; NVRTC for
sm_90): tests/test_engine_attn_layer.py; on a GPU: that file and tests/test_engine_attn_gpu.py;
``bench/profiling/attn_layer_gpu.sh`` times them against the cuBLAS path (attn_layer_probe.py), per phase
(attn_layer_phases.py) and in a force call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from dpsnake.engine import cuda

SMEM_SM90 = 228 * 1024  # shared memory per SM on sm_90 (H100, H200); each block also holds 1 KB reserved
MAX_SLOTS = 96  # the warps keep (16, n) logits and weights and (16, H) products in registers
MAX_WIDTH = 128  # H and E: (16, H) and (16, E) accumulator tiles in registers (168 per thread at 128 already spill)
# with these bounds a block's shared memory is at most 111 KB (_smem_max(96, 120, 128)): two per SM on sm_90 up to
# 113 KB (the bench's shape, FP16 arrays: 61.4 KB forward, 100.6 backward), else one


def padded_slots(n: int) -> int:
    """Rows a block runs for n slots: n rounded up to 16 (a warp per 16 rows)."""
    return -(-int(n) // 16) * 16


def smem_bytes(N: int, H: int, backward: bool = False, f16: bool = False) -> int:
    """Dynamic shared memory of a block. Forward: k (N, H + 8), v^T (H, N + 8) (``f16``: v (N, H + 8)), sw, r and
    the mask (5 N floats); backward: two (N, H + 8) arrays (its static arrays, 11 N floats and the W ring, are not
    counted). The arrays FP16 with ``f16`` (F16, B16), else FP32; B16's backward also A and dL, (N, N + 8) FP16."""
    if backward:
        return 2 * 2 * N * (H + 8 + N + 8) if f16 else 4 * 2 * N * (H + 8)
    return (2 * 2 * N * (H + 8) if f16 else 4 * (N * (H + 8) + H * (N + 8))) + 4 * 5 * N


def ring_bytes(E: int, H: int, backward: bool = False) -> int:
    """The W ring's static shared memory (two stages of a k tile of B fragments, wprod in attn_layer_common.cuh):
    the forward's stage holds max(H, E) / 8 tiles of 256 bytes, the backward's max(E, H / 2) / 8."""
    KE, HT = -(-E // 8), H // 8
    return 2 * 256 * (max(KE, (HT + 1) // 2) if backward else max(HT, KE))


def _smem_max(N: int, E: int, H: int) -> int:
    """Shared memory of the larger kernel's block, its static arrays included (FP16 arrays where H % 16 == 0, as
    defines() sets F16 and B16)."""
    f16 = H % 16 == 0
    return max(smem_bytes(N, H, f16=f16) + ring_bytes(E, H),
               smem_bytes(N, H, True, f16) + 44 * N + ring_bytes(E, H, True))  # fmt: skip


def supported(dtype, n: int, H: int, nnei: int | None = None, smooth: bool = False, E: int | None = None) -> str | None:
    """None if the kernels run a layer of width H (features E) on n slots (of a model with ``nnei``), else why not
    (one short phrase). With the smooth softmax the rows padded past n are empty keys of the model: there must be
    that many."""
    if np.dtype(dtype) != np.float32:
        return "FP32 (mixed precision) only"
    N = padded_slots(n)
    if smooth and nnei is not None and N > nnei:
        return f"{n} slots padded to {N}, more than the model's nnei {nnei} (smooth softmax)"
    if H % 8:
        return f"width {H} must be a multiple of 8"
    if max(H, E or 0) > MAX_WIDTH:
        return f"widths H {H} / E {E}: more than {MAX_WIDTH} (registers)"
    if N > MAX_SLOTS:
        return f"{n} slots, more than {MAX_SLOTS} (registers)"
    return None


def tf32_round(a: np.ndarray) -> np.ndarray:
    """FP32 ``a`` rounded to TF32 (10 mantissa bits), to nearest, ties away from zero (``cvt.rna``)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def pack_b16(w: np.ndarray) -> np.ndarray:
    """The B operand ``w`` (K, M) of m16n8k16 FP16 products in fragment order: (K16, M8, 32, 2) uint32 bits as
    float32 (the kernels read them as float2), K16 = K / 16 k tiles, M8 = M / 8 (rounded up, zero padding);
    [kt, mt, 4 g + t] holds FP16 pairs (w[k][c], w[k + 1][c]) and (w[k + 8][c], w[k + 9][c]), k = 16 kt + 2 t,
    c = 8 mt + g, the lower k in the low half (an accumulator tile pair as the A operand needs no permutation)."""
    w = np.asarray(w, dtype=np.float64)
    K, M = w.shape
    K16, M8 = -(-K // 16), -(-M // 8)
    wp = np.zeros((16 * K16, 8 * M8))
    wp[:K, :M] = w
    h = wp.astype(np.float16).view(np.uint16).astype(np.uint32)
    g, t = np.arange(32) // 4, np.arange(32) % 4
    k = 16 * np.arange(K16)[:, None, None] + 2 * t
    col = 8 * np.arange(M8)[None, :, None] + g
    pairs = [h[k + d, col] | (h[k + d + 1, col] << np.uint32(16)) for d in (0, 8)]
    return np.stack(pairs, axis=-1).astype(np.uint32).view(np.float32)


def pack_b(w: np.ndarray, permuted: bool) -> np.ndarray:
    """The B operand ``w`` (K, M) of m16n8k8 products in fragment order: (K8, M8, 32, 2) FP32, K8 = K / 8
    k tiles (K padded with zero rows), M8 = M / 8 rounded up (zero columns); [kt, mt, 4 g + t] holds
    w[k0][8 mt + g], w[k1][8 mt + g] with (k0, k1) = (8 kt + t, 8 kt + t + 4), or with ``permuted`` (the A
    operand an accumulator tile, attn_layer.cu's header) (8 kt + 2t, 8 kt + 2t + 1)."""
    w = np.asarray(w, dtype=np.float64)
    K, M = w.shape
    K8, M8 = -(-K // 8), -(-M // 8)
    wp = np.zeros((8 * K8, 8 * M8))
    wp[:K, :M] = w
    g, t = np.arange(32) // 4, np.arange(32) % 4
    kt, mt = np.arange(K8)[:, None, None], np.arange(M8)[None, :, None]
    k0 = 8 * kt + (2 * t if permuted else t)
    k1 = k0 + (1 if permuted else 4)
    col = 8 * mt + g
    return np.stack([wp[k0, col], wp[k1, col]], axis=-1).astype(np.float32)


@dataclass
class LayerWeights:
    """One layer's weights as the kernels read them (``xp`` arrays, FP32): ``wqkv`` (3, KE, H/8, 32, 2) and
    ``wout`` (H/8, KE, 32, 2) in B-fragment order, ``bqkv`` (3, H), ``bout``, ``gamma``, ``beta`` (E,); for the
    backward their transposes ``woutT`` (KE, H/8, 32, 2) and ``wqkvT`` (3, H/8, KE, 32, 2); for the FP16 products
    (F16, B16; pack_b16, None where H % 16) ``wqkv_h`` (3, E/16, H/8, 32, 2), ``wout_h`` (H/16, KE, 32, 2),
    ``woutT_h`` (E/16, H/8, 32, 2) and ``wqkvT_h`` (3, H/16, KE, 32, 2)."""

    wqkv: object
    bqkv: object
    wout: object
    bout: object
    gamma: object
    beta: object
    woutT: object
    wqkvT: object
    eps: float
    E: int
    H: int
    wqkv_h: object = None
    wout_h: object = None
    woutT_h: object = None
    wqkvT_h: object = None

    @classmethod
    def of(cls, layer, xp, round_tf32: bool = True) -> LayerWeights:
        """From an attention.py ``AttnLayer``; ``round_tf32`` False keeps FP32 weights (the tests' emulated
        products are exact)."""
        from dpsnake.engine import xp as xpmod

        host = {k: None if getattr(layer, k) is None else np.asarray(xpmod.to_numpy(getattr(layer, k)))
                for k in ("w_qkv", "b_qkv", "w_out", "b_out", "gamma", "beta")}  # fmt: skip
        _, E, H = host["w_qkv"].shape
        rnd = tf32_round if round_tf32 else (lambda a: a)
        wqkv = np.stack([rnd(pack_b(host["w_qkv"][c], permuted=False)) for c in range(3)])
        wout = rnd(pack_b(host["w_out"], permuted=True))
        woutT = rnd(pack_b(host["w_out"].T, permuted=True))
        wqkvT = np.stack([rnd(pack_b(host["w_qkv"][c].T, permuted=True)) for c in range(3)])
        b = host["b_qkv"].reshape(3, H) if host["b_qkv"] is not None else np.zeros((3, H))
        bout = host["b_out"] if host["b_out"] is not None else np.zeros(E)

        def dev(a):
            return xp.ascontiguousarray(xp.asarray(np.asarray(a, dtype=np.float32)))

        arrs = (dev(a) for a in (wqkv, b, wout, bout, host["gamma"], host["beta"], woutT, wqkvT))
        half = {}
        if H % 16 == 0:
            half = {"wqkv_h": dev(np.stack([pack_b16(host["w_qkv"][c]) for c in range(3)])),
                    "wout_h": dev(pack_b16(host["w_out"])), "woutT_h": dev(pack_b16(host["w_out"].T)),
                    "wqkvT_h": dev(np.stack([pack_b16(host["w_qkv"][c].T) for c in range(3)]))}  # fmt: skip
        return cls(*arrs, eps=float(layer.eps), E=int(E), H=int(H), **half)

    def forward_weights(self, f16: bool) -> tuple:
        """(wqkv, wout) for a forward compiled with F16 = ``f16``."""
        return (self.wqkv_h, self.wout_h) if f16 else (self.wqkv, self.wout)

    def backward_weights(self, b16: bool) -> tuple:
        """(woutT, wqkvT) for a backward compiled with B16 = ``b16``."""
        return (self.woutT_h, self.wqkvT_h) if b16 else (self.woutT, self.wqkvT)


def defines(n: int, E: int, H: int, smooth: bool, dotr: bool, normalize: bool, nnei: int, keep: bool = True,
            smem_per_sm: int = SMEM_SM90) -> dict:  # fmt: skip
    """Compile-time constants of attn_layer.cu for n slots of a model with ``nnei``; ``keep``: a force call's
    forward (it keeps the backward's inputs: q, k, v in FP16 (YH) where NORMALIZE makes them unit rows) and the
    backward, else the forward alone; MINB (blocks per SM the registers are bounded for) 2 where two blocks' shared
    memory fits ``smem_per_sm`` (the device's), else 1."""
    N = padded_slots(n)
    npad = (int(nnei) - N) if smooth else 0
    if npad < 0:
        raise ValueError(f"attn_layer: {N} padded slots exceed the model's nnei {nnei}")
    minb = 2 if 2 * (_smem_max(N, E, H) + 1024) <= smem_per_sm else 1
    # W rings (WRING, WDEEP: the forward's; BRING: the backward's): the forward alone on the deep rings; a force
    # call's forward too with FP16 arrays (H100, session 37: 0.160 vs 0.200 on the two-stage ring, us per centre and
    # layer), on the two-stage ring with FP32 ones (H200, session 34: 0.345 vs 0.391 deep vs 0.411 none); a force
    # call's backward on none (0.557 vs 0.578 deep vs 0.613 two-stage; H100, session 37, with A and dL in shared
    # memory: 0.368 vs 0.405 two-stage)
    # YH: q, k, v kept as FP16 where they are unit rows (NORMALIZE; attn_layer_common.cuh's ystore)
    # F16, B16: the forward's and the backward's products on FP16 operands where H % 16 == 0 (attn_layer.cu's and
    # attn_layer_bwd.cuh's headers; H100, session 36, us per centre and layer: keeping 0.191 vs 0.278, alone 0.105 vs
    # 0.152, backward 0.474 vs 0.544; the same errors); FMINB: the forward's blocks per SM (3 spills ~600 bytes)
    # EX2: the softmax's exp as ex2.approx (EngineSettings attn_ex2, on by default, sets it through _Rows.extra;
    # H100, session 44: forward -4.9%, backward -5.4% per centre and layer); XH: xhat kept in FP16 (settings
    # attn_xhat16); PREF: the forward's next centre's x toward L2 (settings attn_prefetch, off by default)
    return {"KEEP": int(keep), "WRING": 1, "WDEEP": int(not keep or H % 16 == 0), "BRING": 0,
            "YH": int(keep and normalize), "N": N, "E": int(E), "H": int(H), "SMOOTH": int(smooth), "DOTR": int(dotr),
            "NORMALIZE": int(normalize), "NPAD": npad, "MINB": minb, "F16": int(H % 16 == 0),
            "FMINB": minb, "B16": int(H % 16 == 0), "EX2": 0, "XH": 0, "PREF": 0}  # fmt: skip


def source(**defs) -> str:
    """attn_layer.cu with its constants as ``#define`` lines (one self-contained text, for the tests)."""
    return cuda.with_defines(cuda.load("attn_layer.cu"), **defs)


def scratch_floats(N: int, b16: bool = False) -> int:
    """Device scratch of one backward block: three (N, N) matrices (A, dL, L + SHIFT); none with ``b16`` (they
    stay in shared memory)."""
    return 0 if b16 else 3 * N * N


def _module(defs: tuple):
    """({kernel: RawKernel}, {kernel: blocks of a grid}, the RawModule) for these constants on the current device,
    compiled once."""
    import cupy

    return _device_module(defs, cupy.cuda.runtime.getDevice())


@functools.cache
def _device_smem(device: int) -> tuple[int, int, int]:
    """(shared memory per SM, the most per block, SMs) of a device, bytes."""
    import cupy

    a = cupy.cuda.Device(device).attributes
    return a["MaxSharedMemoryPerMultiprocessor"], a["MaxSharedMemoryPerBlockOptin"], a["MultiProcessorCount"]


def _defines(*args, keep: bool = True) -> dict:
    """:func:`defines` for the current device's shared memory."""
    import cupy

    return defines(*args, keep=keep, smem_per_sm=_device_smem(cupy.cuda.runtime.getDevice())[0])


@functools.cache
def _device_module(defs: tuple, device: int):
    import cupy

    d = dict(defs)
    per_sm, per_block, nsm = _device_smem(device)
    mod = cupy.RawModule(code=cuda.load("attn_layer.cu"), options=cuda.options(**d))
    fns = {"attn_layer_fwd": mod.get_function("attn_layer_fwd")}
    if d["KEEP"]:
        fns["attn_layer_bwd"] = mod.get_function("attn_layer_bwd")
    caps = {}
    for k, fn in fns.items():
        bwd = k.endswith("bwd")
        dyn = smem_bytes(d["N"], d["H"], bwd, f16=bool(d["B16"] if bwd else d["F16"]))
        total = dyn + fn.shared_size_bytes  # + the ring and the static arrays
        minb = d["MINB"] if bwd else d["FMINB"]
        if total > per_block or minb * (total + 1024) > per_sm:
            raise RuntimeError(f"attn_layer: {k} needs {total} bytes of shared memory per block, {minb} "
                               f"blocks per SM do not fit this device's {per_sm} (per block {per_block})")  # fmt: skip
        fn.max_dynamic_shared_size_bytes = dyn
        caps[k] = minb * nsm
    return fns, caps, mod


def compiled_modules() -> int:
    """How many (constants, device) modules this process has compiled (or loaded from CuPy's disk cache): one per
    neighbour width and KEEP met, so a count that grows inside a timed loop means a compile was timed."""
    return _device_module.cache_info().currsize


def build(n: int, E: int, H: int, smooth: bool, dotr: bool, normalize: bool, nnei: int, extra: tuple = ()) -> dict:
    """A force call's kernels for these constants and the forward alone (energy-only calls), compiled on first use
    (raises what NVRTC raises, or RuntimeError where the blocks' shared memory does not fit the device); ``extra``
    as :func:`forward`'s."""
    args = (n, E, H, smooth, dotr, normalize, nnei)
    _module(tuple((_defines(*args, keep=False) | dict(extra)).items()))
    return _module(tuple((_defines(*args) | dict(extra)).items()))[0]


def xhat_dtype(defs: dict):
    """The dtype of the kept LayerNorm xhat (the cache's third array) of kernels compiled with ``defs``."""
    return np.float16 if defs.get("XH") else np.float32


def y_dtype(defs: dict):
    """The dtype of the kept q, k, v (the cache's y) of kernels compiled with ``defs``."""
    return np.float16 if defs["YH"] else np.float32


def _check(lw: LayerWeights, x, sw, r, mask, *more, y=None, xh=None) -> None:
    """The kernels read raw pointers: C-contiguous FP32 arrays, the mask one bool per slot, x of the layer's E, a
    cache's y and xhat as ``y``, ``xh`` = (array, dtype); the packed weights 16-byte aligned (cp.async copies them
    in 16-byte pieces)."""
    half = (lw.wqkv_h, lw.wout_h, lw.woutT_h, lw.wqkvT_h)
    for w in (lw.wqkv, lw.wout, lw.woutT, lw.wqkvT, *(a for a in half if a is not None)):
        ptr = w.data.ptr if hasattr(w.data, "ptr") else w.ctypes.data
        if ptr % 16:
            raise ValueError("attn_layer: packed weights not 16-byte aligned (use LayerWeights.of)")
    if x.shape[2] != lw.E:
        raise ValueError(f"attn_layer: features {x.shape[2]}, the layer's weights have {lw.E}")
    ys = tuple((a, np.dtype(dt).name) for a, dt in (pair for pair in (y, xh) if pair is not None))
    for a, dt in ((x, "float32"), (sw, "float32"), (r, "float32"), (mask, "bool"), *((m, "float32") for m in more),
                  *ys):  # fmt: skip
        if a.dtype.name != dt or not a.flags.c_contiguous:
            raise ValueError(f"attn_layer: an input of {a.dtype} (C-contiguous: {a.flags.c_contiguous}), expected {dt}")


def forward(lw: LayerWeights, x, sw, r, mask, scale: float, smooth: bool, dotr: bool, normalize: bool, nnei: int,
            keep: bool = False, extra: tuple = ()):  # fmt: skip
    """One layer's output (B, n, E) from its input x (B, n, E); sw (B, n), r (B, n, 3), mask (B, n) bool,
    all C-contiguous, FP32 (attention.py's ``_Rows`` holds them so). ``scale``: the query scale. With
    ``keep``: (out, cache), the cache what :func:`backward` reads: y (3, B, n, H) the normalized q, k, v,
    inv (3, B, n), xhat (B, n, E) (FP16 with XH, :func:`xhat_dtype`), rstd (B, n); y is FP16 where NORMALIZE
    (:func:`y_dtype`), its rows in the kernels' order (attn_layer_common.cuh's ystore), q's times ``scale``.
    ``extra``: more (NAME, value) constants (profiling: PHASES; A/B: attn_layer.defines' keys; settings attn_ex2,
    attn_xhat16, attn_prefetch)."""
    import cupy

    B, n, E = x.shape
    _check(lw, x, sw, r, mask)
    defs = _defines(n, E, lw.H, smooth, dotr, normalize, nnei, keep=keep)
    defs.update(extra)
    if (defs["F16"] or defs["B16"]) and lw.wqkv_h is None:
        raise ValueError(f"attn_layer: F16 / B16 need H a multiple of 16, the layer's is {lw.H}")
    fns, caps, _ = _module(tuple(defs.items()))
    out = cupy.empty_like(x)
    cache = None
    if keep:
        cache = (cupy.empty((3, B, n, lw.H), dtype=y_dtype(defs)), cupy.empty((3, B, n), dtype=x.dtype),
                 cupy.empty(x.shape, dtype=xhat_dtype(defs)), cupy.empty((B, n), dtype=x.dtype))  # fmt: skip
    if B:
        null = np.uintp(0)
        keep_args = cache if keep else (null, null, null, null)
        wqkv, wout = lw.forward_weights(bool(defs["F16"]))
        args = (x, wqkv, lw.bqkv, wout, lw.bout, lw.gamma, lw.beta, np.float32(lw.eps), sw, r, mask,
                np.int64(B), np.int32(n), np.float32(scale), out, *keep_args)  # fmt: skip
        grid = (int(min(B, caps["attn_layer_fwd"])),)
        fns["attn_layer_fwd"](grid, (2 * defs["N"],), args, shared_mem=smem_bytes(defs["N"], lw.H, f16=defs["F16"]))
    return (out, cache) if keep else out


def backward(lw: LayerWeights, cache, dout, sw, r, mask, scale: float, smooth: bool, dotr: bool, normalize: bool,
             nnei: int, dsw, dr, extra: tuple = ()):  # fmt: skip
    """dLoss/dx (B, n, E) of one layer from dout = dLoss/d out (B, n, E) and :func:`forward`'s ``cache``; adds
    the layer's terms of dLoss/d sw to ``dsw`` (B, n) (if smooth) and of dLoss/d r to ``dr`` (B, n, 3) (if
    dotr). Inputs as :func:`forward`'s, all C-contiguous FP32."""
    import cupy

    B, n, E = dout.shape
    defs = _defines(n, E, lw.H, smooth, dotr, normalize, nnei)
    defs.update(extra)
    _check(lw, dout, sw, r, mask, dsw, dr, cache[1], cache[3], y=(cache[0], y_dtype(defs)),
           xh=(cache[2], xhat_dtype(defs)))  # fmt: skip
    fns, caps, _ = _module(tuple(defs.items()))
    dx = cupy.empty_like(dout)
    if B:
        grid = int(min(B, caps["attn_layer_bwd"]))
        scratch = cupy.empty(grid * scratch_floats(defs["N"], defs["B16"]), dtype=cupy.float32)
        y, inv, xhat, rstd = cache
        woutT, wqkvT = lw.backward_weights(bool(defs["B16"]))
        args = (dout, xhat, rstd, lw.gamma, y, inv, woutT, wqkvT, sw, r, mask, np.int64(B), np.int32(n),
                np.float32(scale), scratch, dx, dsw, dr)  # fmt: skip
        smem = smem_bytes(defs["N"], lw.H, True, f16=defs["B16"])
        fns["attn_layer_bwd"]((grid,), (2 * defs["N"],), args, shared_mem=smem)
    return dx
