"""One-pass CPU kernel for fixed-scale fake quantization (numba), used by :class:`Quantizer` when it applies.

PyTorch's fused ``fake_quantize_per_*_affine`` kernels run a scalar loop: measured on this project's 2-core CPU,
27 M float32 values (one layer's attention scores of Whisper tiny.en, batch 2) took 139 ms there and 9.7 ms
in this kernel, which reads ``x`` once and writes the output and the straight-through mask once.

The kernel computes exactly :func:`fake_quantize`'s formula, ``(clamp(round(x / s) + z, qmin, qmax) - z) * s``
in float32 (round half to even), with one scale / zero point per block of consecutive elements: per tensor
(one block), per output channel on axis 0, or per group along the last axis. ``-inf`` can pass through unchanged
(attention masks entering a softmax). The gradient is the straight-through one: 1 inside the range, 0 outside.
Anything else (learned scales, other dtypes or devices, other layouts, no numba) takes the torch formula;
``QASR_CPU_KERNELS=0`` switches the kernel off.
"""
from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace
from typing import Optional, Tuple

import torch
from torch import Tensor

_HAVE_NUMBA = importlib.util.find_spec("numba") is not None  # comes with openai-whisper (requirements.txt)
_KERNELS: Optional[SimpleNamespace] = None


def enabled() -> bool:
    return _HAVE_NUMBA and os.environ.get("QASR_CPU_KERNELS", "1") != "0"


def match_torch_threads() -> None:
    """numba's parallel loops use as many threads as torch does (``torch.set_num_threads``/``OMP_NUM_THREADS``),
    not every core: several training processes on one machine must not oversubscribe it. Starting numba's OpenMP
    pool sets the process's OpenMP thread count to ``NUMBA_NUM_THREADS`` (all cores), which is torch's count too:
    torch's is put back, or a ``torch.set_num_threads(1)`` process would silently run on every core."""
    import numba

    wanted = torch.get_num_threads()
    n = max(1, min(wanted, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:  # (the first call starts the pool)
        numba.set_num_threads(n)
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


def _kernels() -> SimpleNamespace:
    """Compile (or load from numba's on-disk cache) the kernels on first use: importing numba costs ~0.5 s,
    which processes that never fake-quantize on the CPU do not pay."""
    global _KERNELS
    if _KERNELS is not None:
        match_torch_threads()
        return _KERNELS
    import numpy as np
    from numba import njit, prange

    @njit(parallel=True, cache=True, nogil=True)
    def fq_tensor(x, out, mask, s, z, qmin, qmax, keep_neg_inf):  # pragma: no cover - compiled
        for i in prange(x.size):
            v = x[i]
            if keep_neg_inf and v == -np.inf:
                out[i] = v
                mask[i] = False
                continue
            q = np.rint(v / s) + z
            mask[i] = (q >= qmin) and (q <= qmax)
            out[i] = (min(max(q, qmin), qmax) - z) * s

    @njit(parallel=True, cache=True, nogil=True)
    def fq_blocks(x, out, mask, s, z, block, qmin, qmax):  # pragma: no cover - compiled
        for b in prange(s.size):
            sb, zb = s[b], z[b]
            for i in range(b * block, (b + 1) * block):
                q = np.rint(x[i] / sb) + zb
                mask[i] = (q >= qmin) and (q <= qmax)
                out[i] = (min(max(q, qmin), qmax) - zb) * sb

    @njit(parallel=True, cache=True, nogil=True)
    def ste_grad(grad, mask, out):  # pragma: no cover - compiled
        for i in prange(grad.size):
            out[i] = grad[i] if mask[i] else 0.0

    _KERNELS = SimpleNamespace(np=np, fq_tensor=fq_tensor, fq_blocks=fq_blocks, ste_grad=ste_grad)
    match_torch_threads()
    return _KERNELS


def block_size(x: Tensor, scale: Tensor, granularity: str, axis: int, group_size: int) -> Optional[int]:
    """Elements per scale when ``x``'s layout puts each scale's elements next to each other, else None."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous() or x.numel() == 0:
        return None
    if granularity == "tensor":
        return x.numel() if scale.numel() == 1 else None
    axis = axis % x.dim()
    if granularity == "channel" and axis == 0 and scale.numel() == x.shape[0]:
        return x.numel() // x.shape[0]
    if granularity == "group" and axis == x.dim() - 1 and scale.numel() * group_size == x.numel():
        return group_size
    return None


class _FakeQuantBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, block: int, qmin: int, qmax: int,
                keep_neg_inf: bool) -> Tensor:
        k = _kernels()
        np = k.np
        out = torch.empty_like(x)
        mask = torch.empty(x.shape, dtype=torch.bool)
        s = scale.detach().reshape(-1).to(torch.float32).contiguous()
        z = zero_point.detach().reshape(-1).to(torch.float32).contiguous()
        xa, oa, ma = x.detach().view(-1).numpy(), out.view(-1).numpy(), mask.view(-1).numpy()
        lo, hi = np.float32(qmin), np.float32(qmax)
        if block == x.numel():
            k.fq_tensor(xa, oa, ma, np.float32(s[0].item()), np.float32(z[0].item()), lo, hi, keep_neg_inf)
        else:
            k.fq_blocks(xa, oa, ma, s.numpy(), z.numpy(), block, lo, hi)
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        if grad.dtype == torch.float32 and grad.is_contiguous():
            out = torch.empty_like(grad)
            _kernels().ste_grad(grad.view(-1).numpy(), mask.view(-1).numpy(), out.view(-1).numpy())
        else:
            out = grad * mask
        return out, None, None, None, None, None, None


def fake_quantize_blocks(x: Tensor, scale: Tensor, zero_point: Tensor, block: int, qmin: int, qmax: int,
                         keep_neg_inf: bool = False) -> Tensor:
    """Fake-quantize ``x`` (contiguous float32 on the CPU) with one fixed scale/zero point per ``block``
    consecutive elements (see :func:`block_size`); no gradient reaches ``scale`` or ``zero_point``."""
    return _FakeQuantBlocks.apply(x, scale, zero_point, block, qmin, qmax, keep_neg_inf)


def fake_quantize_reference(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int
                            ) -> Tuple[Tensor, Tensor]:
    """The torch formula the kernel reproduces, with its straight-through mask (for tests)."""
    q = torch.round(x / scale) + zero_point
    return (torch.clamp(q, qmin, qmax) - zero_point) * scale, (q >= qmin) & (q <= qmax)
