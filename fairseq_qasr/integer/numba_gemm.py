"""Exact integer GEMM for CPUs without int8 dot-product instructions (numba, compiled on first use).

``torch._int_mm`` is fast only where the CPU has int8 dot products (AVX512-VNNI, AMX); on an AVX2 CPU without
them it took 1376 ms for 1500x384 @ 384x1536, an int32 ``torch.matmul`` 148-229 ms, and this kernel 56 ms (int16
operands, int32 accumulators: LLVM turns the inner loop into ``vpmaddwd``), against 35 ms for fp32 MKL — all
measured on this project's 2-core machine while another job ran. Exact for codes of up to 8 bits and ``K < 2^17``.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Optional

import torch
from torch import Tensor

AVAILABLE = importlib.util.find_spec("numba") is not None
_GEMM: Optional[Callable] = None


def _kernel() -> Callable:
    global _GEMM
    from fairseq_qasr.quant.cpu_kernels import match_torch_threads

    match_torch_threads()
    if _GEMM is None:
        import numpy as np
        from numba import njit, prange

        @njit(parallel=True, cache=True, nogil=True)
        def gemm(a, bt, out):  # pragma: no cover - compiled; a [M, K], bt [N, K] int16 -> out [M, N] int32
            m_rows, k_len = a.shape
            n_cols = bt.shape[0]
            for mb in prange((m_rows + 3) // 4):
                for n in range(n_cols):
                    for m in range(mb * 4, min(mb * 4 + 4, m_rows)):
                        acc = np.int32(0)
                        for k in range(k_len):
                            acc += np.int32(a[m, k]) * np.int32(bt[n, k])
                        out[m, n] = acc

        _GEMM = gemm
    return _GEMM


def prepare(b: Tensor) -> Tensor:
    """The ``[K, N]`` right operand in the kernel's layout: ``[N, K]`` int16, contiguous (cache it for weights)."""
    return b.t().to(torch.int16).contiguous()


@torch.library.custom_op("qasr::int16_gemm", mutates_args=())
def _int16_gemm(a: Tensor, bt: Tensor) -> Tensor:
    """A registered op, so that the integer-only dispatch check sees it run, with its integer dtypes."""
    out = torch.empty(a.shape[0], bt.shape[0], dtype=torch.int32)
    _kernel()(a.numpy(), bt.numpy(), out.numpy())
    return out


def mm(a: Tensor, b_prepared: Tensor) -> Tensor:
    """``a [M, K]`` (int8 codes) times the prepared right operand -> ``[M, N]`` int32, exact."""
    return _int16_gemm(a.to(torch.int16).contiguous(), b_prepared)
