"""The one affine fake-quantization primitive, shared by every granularity.

``fake_quantize(x, scale, zero_point, qmin, qmax)`` returns ``scale * (clamp(round(x/scale)+zp) - zp)``
with a straight-through estimator for ``round`` (gradient 1) and the natural clamp gradient (0 outside
the range), so learnable scales (LSQ), offsets (LSQ+) and clipping (PACT) get their gradients through
autograd. ``scale``/``zero_point`` must already broadcast against ``x`` (see :func:`expand_qparam`).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest with identity gradient."""
    return x + (torch.round(x) - x).detach()


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def fake_quantize_fused(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                        axis: Optional[int] = None) -> Tensor:
    """The same primitive through PyTorch's fused kernels (per tensor: 0-dim ``scale``; per channel: 1-dim along
    ``axis``): identical values and gradients for a fixed (non-learned) scale, in one pass instead of eight."""
    zp = zero_point.round().to(torch.int32)
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale.float(), zp, qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale.float(), zp, axis, qmin, qmax)


def quantize_codes(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Integer codes q (as float tensor) of ``x``; no gradient."""
    with torch.no_grad():
        return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def stat_shape(shape: Tuple[int, ...], granularity: str, axis: int, group_size: int) -> Tuple[int, ...]:
    """Shape of scale / zero_point for a tensor of ``shape``."""
    if granularity == "tensor":
        return ()
    axis = axis % len(shape)
    if granularity == "channel":
        return (shape[axis],)
    if shape[axis] % group_size:
        raise ValueError(f"group_size {group_size} does not divide dim {axis} of size {shape[axis]}")
    return tuple(s // group_size if i == axis else s for i, s in enumerate(shape))


def reduce_minmax(x: Tensor, granularity: str, axis: int, group_size: int) -> Tuple[Tensor, Tensor]:
    """Per-granularity min and max of the finite entries of ``x`` (shapes from :func:`stat_shape`)."""
    x = x.detach()
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        big = torch.finfo(x.dtype).max
        lo_src, hi_src = torch.where(finite, x, big), torch.where(finite, x, -big)
    else:
        lo_src = hi_src = x
    if granularity == "tensor":
        lo, hi = lo_src.min(), hi_src.max()
    else:
        lo, hi = group_view(lo_src, granularity, axis, group_size).amin(-1), group_view(
            hi_src, granularity, axis, group_size).amax(-1)
        if granularity == "group":
            lo, hi = lo.movedim(-1, axis % x.dim()), hi.movedim(-1, axis % x.dim())
    big = torch.finfo(x.dtype).max
    empty = lo > hi  # no finite value seen
    return torch.where(empty, 0.0, lo).clamp(-big, big), torch.where(empty, 0.0, hi).clamp(-big, big)


def group_view(x: Tensor, granularity: str, axis: int, group_size: int) -> Tensor:
    """View whose last dim holds the elements sharing one scale."""
    axis = axis % x.dim()
    if granularity == "channel":
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)
    y = x.movedim(axis, -1)
    return y.reshape(*y.shape[:-1], y.shape[-1] // group_size, group_size)


def expand_qparam(p: Tensor, ndim: int, granularity: str, axis: int, group_size: int) -> Tensor:
    """Make a scale / zero_point of :func:`stat_shape` broadcast against a tensor of ``ndim`` dims."""
    if granularity == "tensor":
        return p
    axis = axis % ndim
    if granularity == "channel":
        shape = [1] * ndim
        shape[axis] = -1
        return p.reshape(shape)
    return p.repeat_interleave(group_size, dim=axis)


def qparams_from_range(lo: Tensor, hi: Tensor, qmin: int, qmax: int, symmetric: bool,
                       pow2: bool = False) -> Tuple[Tensor, Tensor]:
    """Scale and integer zero point so that [lo, hi] (widened to contain 0) maps onto [qmin, qmax]."""
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    tiny = 1e-8
    if symmetric:
        amax = torch.maximum(-lo, hi) if qmin < 0 else hi
        scale = torch.clamp(amax / qmax, min=tiny)
        zp = torch.zeros_like(scale)
    else:
        scale = torch.clamp((hi - lo) / (qmax - qmin), min=tiny)
        if pow2:
            scale = pow2_scale(scale)
        zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
        return scale, zp
    if pow2:
        scale = pow2_scale(scale)
    return scale, zp


def pow2_scale(scale: Tensor) -> Tensor:
    """Round a scale up to the next power of two (no value that fitted is clipped)."""
    return torch.exp2(torch.ceil(torch.log2(scale)))


def on_grid(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
            allow_neg_inf: bool = False, rtol: float = 1e-3) -> Tuple[bool, str]:
    """Check that every value of ``x`` equals ``scale*(q-zp)`` for an integer q in [qmin, qmax]."""
    with torch.no_grad():
        x = x.double()
        scale = scale.double()
        zero_point = zero_point.double()
        if allow_neg_inf:
            x = torch.where(torch.isneginf(x), (qmin - zero_point) * scale, x)
        if not bool(torch.isfinite(x).all()):
            return False, "non-finite values"
        if x.numel() == 0:
            return True, ""
        code = x / scale + zero_point
        q = torch.round(code)
        # float32 storage is exact for |q| < 2^24; allow its rounding beyond that (int32 biases)
        tol = rtol + 2.0 ** -23 * (code.abs() + zero_point.abs())
        bad = (code - q).abs() > tol
        if bool(bad.any()):
            err = (code - q).abs()[bad].max().item()
            return False, f"off-grid by {err:.3g} steps at {int(bad.sum())} values"
        if q.min().item() < qmin or q.max().item() > qmax:
            return False, f"codes [{q.min().item():.0f}, {q.max().item():.0f}] outside [{qmin}, {qmax}]"
    return True, ""


def int_range(bits: int, signed: bool) -> Tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def log2_int(x: float) -> int:
    return int(math.floor(math.log2(x)))
