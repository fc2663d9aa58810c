"""Batched matrix products with transposed operands and a scale, on cuBLAS without copies (CuPy).

``cupy.matmul`` makes every 3-D operand C-contiguous before its strided-batched GEMM, so a product
with a transposed view (``k.swapaxes(1, 2)``) first copies the whole operand: for DPA-1's attention
(q k^T, A^T do, do v^T, dL^T q per layer) those copies were 15% of a se_atten_v2 force call's GPU time
(H200, torch profiler). :func:`bmm` passes the transposes to cuBLAS as op flags instead and folds a
scalar factor into alpha (q k^T s without a scaled copy of q), as DeePMD-kit's torch.bmm does.
With ``tf32`` an FP32 product runs on TF32 tensor cores (cuBLAS's CUBLAS_COMPUTE_32F_FAST_TF32: inputs
rounded to 10 mantissa bits, FP32 sums), as settings.tf32 asks.
"""

from __future__ import annotations

import numpy as np

_COMPUTE_32F_FAST_TF32 = 77  # cublasComputeType_t CUBLAS_COMPUTE_32F_FAST_TF32 (cublas_api.h, CUDA >= 11)


def bmm(a, b, ta: bool = False, tb: bool = False, alpha: float = 1.0, out=None, beta: float = 0.0, tf32=False):
    """out[i] = alpha op(a[i]) @ op(b[i]) + beta out[i] for C-contiguous 3-D CuPy arrays of one float
    dtype, op the transpose where ``ta`` / ``tb``. ``out`` (C-contiguous, not overlapping a or b) or a new
    array (then beta must be 0). beta 1 accumulates into ``out`` inside the GEMM (no temporary, no add).
    ``tf32``: FP32 operands on TF32 tensor cores (ignored for FP64)."""
    import cupy
    from cupy_backends.cuda.api import runtime
    from cupy_backends.cuda.libs import cublas

    if not (a.flags.c_contiguous and b.flags.c_contiguous) or a.dtype != b.dtype or a.ndim != 3 or b.ndim != 3:
        raise ValueError("bmm: a and b must be C-contiguous 3-D arrays of one dtype")
    batch = a.shape[0]
    m, k = (a.shape[2], a.shape[1]) if ta else (a.shape[1], a.shape[2])
    k2, n = (b.shape[2], b.shape[1]) if tb else (b.shape[1], b.shape[2])
    if k != k2 or b.shape[0] != batch:
        raise ValueError(f"bmm: shapes {a.shape}{'^T' if ta else ''} and {b.shape}{'^T' if tb else ''} do not match")
    if out is None:
        if beta:
            raise ValueError("bmm: beta needs out")
        out = cupy.empty((batch, m, n), dtype=a.dtype)
    elif out.shape != (batch, m, n) or not out.flags.c_contiguous or out.dtype != a.dtype:
        raise ValueError("bmm: out must be a C-contiguous array of the product's shape and dtype")
    if out.size == 0:
        return out
    if k == 0:
        if beta == 0:
            out.fill(0)
        elif beta != 1:
            out *= beta
        return out
    # row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: cuBLAS gets B first (as cupy.matmul)
    cdt = {"float64": runtime.CUDA_R_64F, "float32": runtime.CUDA_R_32F}[a.dtype.name]
    # the data type doubles as the compute type (cuBLAS's legacy mapping, as cupy.matmul) unless TF32
    compute = _COMPUTE_32F_FAST_TF32 if tf32 and a.dtype.name == "float32" else cdt
    alpha_h, beta_h = np.array(alpha, dtype=a.dtype), np.array(beta, dtype=a.dtype)  # host scalars
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)  # order with the kernels around it
    cublas.gemmStridedBatchedEx(
        handle,
        1 if tb else 0,
        1 if ta else 0,
        n, m, k, alpha_h.ctypes.data,
        b.data.ptr, cdt, k if tb else n, b.shape[1] * b.shape[2],
        a.data.ptr, cdt, m if ta else k, a.shape[1] * a.shape[2],
        beta_h.ctypes.data,
        out.data.ptr, cdt, n, m * n,
        batch, compute, cublas.CUBLAS_GEMM_DEFAULT,
    )  # fmt: skip
    return out
