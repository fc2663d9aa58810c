"""The engine's CUDA sources compiled without a GPU: PTX from NVRTC (the ``nvidia-cuda-nvrtc-cu12`` wheel) and,
where ``ptxas`` is at hand (the ``nvidia-cuda-nvcc-cu12`` wheel or a CUDA toolkit), each kernel's registers,
spills and static shared memory. The tests compile every kernel family for sm_90 with :func:`nvrtc_ptx`;
``bench/profiling/ptxas_stats.py`` prints the resource table, which decides occupancy (docs/benchmarks.md,
"Whole-layer TF32 kernels": 168 registers with spills held those kernels at 12 warps per SM)."""

from __future__ import annotations

import ctypes
import pathlib
import re
import shutil
import subprocess
import tempfile


def _nvrtc():
    import nvidia.cuda_nvrtc as pkg

    return ctypes.CDLL(str(pathlib.Path(list(pkg.__path__)[0]) / "lib" / "libnvrtc.so.12"))


def nvrtc_ptx(src: str, arch: str = "compute_90", options: tuple = ()) -> str:
    """PTX of ``src`` (C++14, as CuPy's RawModule compiles it; ``options``: more NVRTC options, e.g.
    ``-lineinfo``); raises with NVRTC's log on a compile error."""
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"k.cu", 0, None, None) != 0:
        raise RuntimeError("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++14", *(o.encode() for o in options)]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
        raise RuntimeError(log.value.decode(errors="replace")[:3000])
    lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetPTX(prog, ptx)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx.value.decode()


def find_ptxas() -> str | None:
    """ptxas of the ``nvidia-cuda-nvcc-cu12`` wheel, else the one on PATH, else None."""
    try:
        import nvidia.cuda_nvcc as pkg

        exe = pathlib.Path(list(pkg.__path__)[0]) / "bin" / "ptxas"
        if exe.exists():
            return str(exe)
    except ImportError:
        pass
    return shutil.which("ptxas")


_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict:
    """{kernel: {registers, stack, spill_stores, spill_loads, smem}} from ``ptxas -v`` output (bytes)."""
    out, cur = {}, None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            cur = out.setdefault(
                m.group(1), {"registers": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0}
            )
        elif cur is not None and (m := _SPILL.search(line)):
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        elif cur is not None and (m := _USED.search(line)):
            cur["registers"], cur["smem"] = int(m.group(1)), int(m.group(2) or 0)
    return out


def ptxas_stats(src: str, arch: str = "sm_90", ptxas: str | None = None) -> dict:
    """Per kernel of ``src``: registers, spills and static shared memory as ptxas allocates them for ``arch``."""
    exe = ptxas or find_ptxas()
    if exe is None:
        raise RuntimeError("no ptxas: pip install nvidia-cuda-nvcc-cu12 (or put a CUDA toolkit's ptxas on PATH)")
    with tempfile.TemporaryDirectory() as d:
        p = pathlib.Path(d) / "k.ptx"
        p.write_text(nvrtc_ptx(src, "compute_" + arch.split("_")[1]))
        r = subprocess.run([exe, f"-arch={arch}", "-v", str(p), "-o", str(p.with_suffix(".cubin"))],
                           capture_output=True, text=True, check=True)  # fmt: skip
    return parse_ptxas(r.stdout + r.stderr)
