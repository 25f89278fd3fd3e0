"""One-pass integer kernels for the CPU (numba, compiled on first use, cached on disk): GEMM, requantization,
softmax. Each computes exactly the integer arithmetic of its torch twin in :mod:`.kernels` (tests compare them
bit for bit) and is registered as a torch op (``qasr::...``), so the integer-only dispatch check sees it run with
its integer dtypes.

Why: ``torch._int_mm`` is fast only where the CPU has int8 dot products (AVX512-VNNI, AMX); on an AVX2 CPU without
them it took 1376 ms for 1500x384 @ 384x1536, an int32 ``torch.matmul`` 148-229 ms, and the GEMM here 56 ms (int16
operands, int32 accumulators: LLVM turns the inner loop into ``vpmaddwd``), against 35 ms for fp32 MKL — all
measured on this project's 2-core machine while another job ran. The torch versions of requantization and softmax
are chains of 7-10 int64 passes over each tensor; here each is one.
"""
from __future__ import annotations

import importlib.util
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

AVAILABLE = importlib.util.find_spec("numba") is not None
_K: Optional[SimpleNamespace] = None


def _kernels() -> SimpleNamespace:
    global _K
    from fairseq_qasr.quant.cpu_kernels import match_torch_threads

    match_torch_threads()
    if _K is not None:
        return _K
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

    @njit(parallel=True, cache=True, nogil=True)
    def requant(acc, sub, mult, mlo, shift, zp, qmin, qmax, out):  # pragma: no cover - compiled
        # acc [R, C] integer; mult/mlo/shift [C] (or [1]) int64 (mlo: second words, zeros for one-word multipliers):
        # out = clamp((((acc-sub)*m + floor((acc-sub)*ml / 2^31) + 2^(sh-1)) >> sh) + zp)
        rows, cols = acc.shape
        per_col = mult.size > 1
        for r in prange(rows):
            for c in range(cols):
                j = c if per_col else 0
                sh = shift[j]
                a = np.int64(acc[r, c]) - sub
                y = ((a * mult[j] + ((a * mlo[j]) >> 31) + (np.int64(1) << (sh - 1))) >> sh) + zp
                out[r, c] = min(max(y, qmin), qmax)

    @njit(parallel=True, cache=True, nogil=True)
    def softmax(q, masked, has_mask, cmin, lut, mult_r, half, shift, zp_out, qmin, qmax, out):  # pragma: no cover
        # q [R, L] codes; masked [R, L] bool (ignored unless has_mask); see kernels.softmax_int
        rows, n = q.shape
        for r in prange(rows):
            mx = np.int64(cmin)
            seen = False
            for j in range(n):
                if has_mask and masked[r, j]:
                    continue
                v = np.int64(q[r, j])
                if not seen or v > mx:
                    mx, seen = v, True
            if not seen or mx < cmin:
                mx = np.int64(cmin)
            total = np.int64(0)
            for j in range(n):
                if not (has_mask and masked[r, j]):
                    total += np.int64(lut[mx - np.int64(q[r, j])])
            total = max(total, np.int64(1))
            recip = mult_r // total
            for j in range(n):
                e = np.int64(0) if (has_mask and masked[r, j]) else np.int64(lut[mx - np.int64(q[r, j])])
                y = ((e * recip + half) >> shift) + zp_out
                out[r, j] = min(max(y, qmin), qmax)

    _K = SimpleNamespace(gemm=gemm, requant=requant, softmax=softmax)
    return _K


def usable(*tensors: Tensor) -> bool:
    return AVAILABLE and all(t.device.type == "cpu" for t in tensors)


# --- GEMM -------------------------------------------------------------------------------------------
def prepare(b: Tensor) -> Tensor:
    """The ``[K, N]`` right operand in the kernel's layout: ``[N, K]`` int16, contiguous (cache it for weights)."""
    return b.t().to(torch.int16).contiguous()


@torch.library.custom_op("qasr::int16_gemm", mutates_args=())
def _int16_gemm(a: Tensor, bt: Tensor) -> Tensor:
    out = torch.empty(a.shape[0], bt.shape[0], dtype=torch.int32)
    _kernels().gemm(a.numpy(), bt.numpy(), out.numpy())
    return out


def mm(a: Tensor, b_prepared: Tensor) -> Tensor:
    """``a [M, K]`` (int8 codes) times the prepared right operand -> ``[M, N]`` int32, exact."""
    return _int16_gemm(a.to(torch.int16).contiguous(), b_prepared)


# --- requantization ----------------------------------------------------------------------------------
@torch.library.custom_op("qasr::requantize", mutates_args=())
def _requantize(acc: Tensor, mult: Tensor, mlo: Tensor, shift: Tensor, zp: int, qmin: int, qmax: int, like: Tensor,
                sub: int = 0) -> Tensor:
    out = torch.empty(acc.shape, dtype=like.dtype)
    _kernels().requant(acc.numpy(), sub, mult.numpy(), mlo.numpy(), shift.numpy(), zp, qmin, qmax, out.numpy())
    return out


def requantize(acc: Tensor, m: Tensor, shift: Tensor, zp: int, qmin: int, qmax: int, out_dtype,
               sub: int = 0) -> Optional[Tensor]:
    """:func:`kernels.requantize` in one pass, or None where this kernel does not apply (the caller then runs
    the torch version): ``m``/``shift`` one value, or one per element of the last dim; ``sub`` is subtracted from
    ``acc`` first (codes minus their zero point)."""
    cols = acc.shape[-1] if acc.dim() else 1
    if not usable(acc) or acc.dtype not in (torch.int8, torch.int32, torch.int64) or m.numel() not in (1, cols) \
            or (m.dim() > 1 and m.shape[-1] != m.numel()):
        return None
    from .kernels import split_multiplier

    mult, mlo, sh = split_multiplier(m.reshape(-1), shift.reshape(-1))
    if mlo is not None and acc.dtype == torch.int64:
        return None  # (two words need |acc| < 2^31: the torch version checks)
    a2 = acc.reshape(-1, cols).contiguous()
    mlo = torch.zeros_like(mult) if mlo is None else mlo
    sh = sh.expand(mult.numel()).contiguous()
    like = torch.empty(0, dtype=out_dtype)
    return _requantize(a2, mult.contiguous(), mlo.contiguous(), sh, int(zp), int(qmin), int(qmax), like,
                       int(sub)).view(acc.shape)


# --- softmax -------------------------------------------------------------------------------------------
@torch.library.custom_op("qasr::softmax_codes", mutates_args=())
def _softmax(q: Tensor, masked: Tensor, has_mask: bool, cmin: int, lut: Tensor, mult_r: int, half: int, shift: int,
             zp_out: int, qmin: int, qmax: int, like: Tensor) -> Tensor:
    out = torch.empty(q.shape, dtype=like.dtype)
    _kernels().softmax(q.numpy(), masked.numpy(), has_mask, cmin, lut.numpy(), mult_r, half, shift, zp_out, qmin,
                       qmax, out.numpy())
    return out


def softmax(q: Tensor, cmin: int, masked: Optional[Tensor], lut: Tensor, mult_r: int, shift: int, zp_out: int,
            qmin: int, qmax: int, out_dtype) -> Optional[Tensor]:
    """:func:`kernels.softmax_int` row by row in one pass (``mult_r = out_mult << R``, ``shift = R + out_shift``),
    or None where this kernel does not apply."""
    if not usable(q) or (masked is not None and masked.shape != q.shape):
        return None
    n = q.shape[-1]
    q2 = q.reshape(-1, n).contiguous()
    m2 = masked.reshape(-1, n).contiguous() if masked is not None else torch.zeros((1, 1), dtype=torch.bool)
    like = torch.empty(0, dtype=out_dtype)
    out = _softmax(q2, m2, masked is not None, int(cmin), lut.contiguous(), int(mult_r), 1 << (shift - 1), int(shift),
                   int(zp_out), int(qmin), int(qmax), like)
    return out.view(q.shape)
