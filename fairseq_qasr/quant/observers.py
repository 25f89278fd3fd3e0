"""Range observers: each maps a batch to a (lo, hi) range per granularity.

``minmax`` (running extremes), ``moving_average`` (EMA of batch min/max), ``percentile`` (running
extremes of the batch p-th / (100-p)-th percentiles) and ``mse`` (per batch, the shrunken min-max
range with the smallest quantization MSE; running extremes across batches).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .affine import expand_qparam, fake_quantize, group_view, qparams_from_range, reduce_minmax
from .qtype import QSpec

_MSE_GRID = torch.linspace(1.0, 0.3, 15)


def batch_range(x: Tensor, spec: QSpec) -> Tuple[Tensor, Tensor]:
    """Range of one batch according to ``spec.observer``."""
    g, a, gs = spec.granularity, spec.axis, spec.group_size
    if spec.observer == "percentile":
        return _percentile_range(x, spec)
    lo, hi = reduce_minmax(x, g, a, gs)
    if spec.observer == "mse":
        return _mse_range(x, lo, hi, spec)
    return lo, hi


def combine(old_lo: Tensor, old_hi: Tensor, lo: Tensor, hi: Tensor, spec: QSpec) -> Tuple[Tensor, Tensor]:
    """Merge a batch range into the running range."""
    if spec.observer == "moving_average":
        m = spec.momentum
        return old_lo + m * (lo - old_lo), old_hi + m * (hi - old_hi)
    return torch.minimum(old_lo, lo), torch.maximum(old_hi, hi)


def _percentile_range(x: Tensor, spec: QSpec) -> Tuple[Tensor, Tensor]:
    x = x.detach().float()
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    p = spec.percentile / 100.0
    if spec.granularity == "tensor":
        flat = x.reshape(-1)
        if flat.numel() > 1 << 20:  # quantile's input limit; a strided sample is enough for a range
            flat = flat[:: flat.numel() // (1 << 20) + 1]
        return torch.quantile(flat, 1 - p), torch.quantile(flat, p)
    v = group_view(x, spec.granularity, spec.axis, spec.group_size)
    lo, hi = torch.quantile(v, 1 - p, dim=-1), torch.quantile(v, p, dim=-1)
    if spec.granularity == "group":
        lo, hi = lo.movedim(-1, spec.axis % x.dim()), hi.movedim(-1, spec.axis % x.dim())
    return lo, hi


def _mse_range(x: Tensor, lo: Tensor, hi: Tensor, spec: QSpec) -> Tuple[Tensor, Tensor]:
    x = x.detach()
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    best_err, best_lo, best_hi = None, lo, hi
    for alpha in _MSE_GRID.tolist():
        clo, chi = lo * alpha, hi * alpha
        s, z = qparams_from_range(clo, chi, spec.qmin, spec.qmax, spec.symmetric, spec.pow2)
        s_b = expand_qparam(s, x.dim(), spec.granularity, spec.axis, spec.group_size)
        z_b = expand_qparam(z, x.dim(), spec.granularity, spec.axis, spec.group_size)
        err = (fake_quantize(x, s_b, z_b, spec.qmin, spec.qmax) - x).pow(2)
        err = err.sum() if spec.granularity == "tensor" else group_view(
            err, spec.granularity, spec.axis, spec.group_size).sum(-1)
        if spec.granularity == "group":
            err = err.movedim(-1, spec.axis % x.dim())
        if best_err is None:
            best_err, best_lo, best_hi = err, clo, chi
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, clo, best_lo), torch.where(better, chi, best_hi)
    return best_lo, best_hi
