"""Fused integer kernels (``torch.compile`` -> C++/OpenMP loops on CPU) for the hot paths of the engine.

Same integer arithmetic as the eager kernels in :mod:`.kernels` (tests compare them bit for bit); compiled
lazily on first use (tens of seconds once, cached by inductor). Enabled by ``IntegerEngine.fused = True``.
"""
from __future__ import annotations

import torch
from torch import Tensor

_COMPILED = {}
torch._dynamo.config.recompile_limit = max(getattr(torch._dynamo.config, "recompile_limit", 8), 64)


def _compiled(name, fn):
    f = _COMPILED.get(name)
    if f is None:
        f = _COMPILED[name] = torch.compile(fn, dynamic=True)
    return f


def _requant(acc: Tensor, sub: int, m: Tensor, ml: Tensor, sh: Tensor, zp: int, qmin: int, qmax: int) -> Tensor:
    a = acc.long() - sub
    y = ((a * m + ((a * ml) >> 31) + (torch.ones_like(sh) << (sh - 1))) >> sh) + zp
    return y.clamp(qmin, qmax).to(torch.int8)


def requant(acc: Tensor, m: Tensor, sh: Tensor, zp: int, qmin: int, qmax: int, sub: int = 0) -> Tensor:
    """``clamp(round((acc - sub) * m * 2^-sh) + zp)`` as int8 (``sub``: the zero point of codes; one- or two-word
    multipliers, :func:`kernels.split_multiplier`; int32 accumulators)."""
    from .kernels import requantize, split_multiplier

    hi, lo, s = split_multiplier(m, sh)
    if lo is not None and acc.dtype == torch.int64:  # (wide accumulators with two words: the exact limb arithmetic)
        return requantize(acc, m, sh, zp, qmin, qmax, torch.int8, sub)
    return _compiled("requant2", _requant)(acc, sub, hi, torch.zeros_like(hi) if lo is None else lo, s, zp, qmin, qmax)


def _attn_softmax(raw: Tensor, rowterm: Tensor, colterm: Tensor, m: Tensor, ml: Tensor, sh: Tensor, zp_in: int,
                  qmin: int, qmax: int, lut: Tensor, mult_r: int, zp_out: int, oqmin: int, oqmax: int,
                  half: int, shift: int) -> Tensor:
    acc = raw.long() + rowterm + colterm
    q = (((acc * m + ((acc * ml) >> 31) + (torch.ones_like(sh) << (sh - 1))) >> sh) + zp_in).clamp(qmin, qmax)
    mx = q.amax(-1, keepdim=True)
    e = lut[mx - q].long()
    s = e.sum(-1, keepdim=True)
    r = torch.div(mult_r, s, rounding_mode="floor")  # mult_r = out_mult << R, shift = R + 16, half = 2^(shift-1)
    out = (((e * r + half) >> shift) + zp_out).clamp(oqmin, oqmax)
    return out.to(torch.int8), out.sum(-1, keepdim=True).to(torch.int32)


def attn_softmax(raw: Tensor, rowterm: Tensor, colterm: Tensor, m: Tensor, sh: Tensor, *rest):
    """Scores (raw int32 GEMM + zero-point row/column terms) -> softmax input codes -> softmax output codes;
    returns (codes int8, their row sums int32). One- or two-word multipliers (:func:`kernels.split_multiplier`)."""
    from .kernels import split_multiplier

    hi, lo, s = split_multiplier(m, sh)
    return _compiled("attn_softmax3", _attn_softmax)(raw, rowterm, colterm, hi,
                                                     torch.zeros_like(hi) if lo is None else lo, s, *rest)


def layer_norm(x: Tensor, gain: Tensor, bias, eps_term: int, k: int, frac: int = 16) -> Tensor:
    from .kernels import layer_norm_int
    return _compiled("layer_norm", layer_norm_int)(x, gain, bias, eps_term, k, frac)


def _add(a: Tensor, za: int, ka: int, b: Tensor, zb: int, kb: int) -> Tensor:
    return (a.int() - za) * ka + (b.int() - zb) * kb


def add(a: Tensor, za: int, ka: int, b: Tensor, zb: int, kb: int) -> Tensor:
    return _compiled("add", _add)(a, za, ka, b, zb, kb)


def _lut(table: Tensor, c: Tensor, base: int) -> Tensor:
    return table[c.long() - base]


def lut(table: Tensor, c: Tensor, base: int) -> Tensor:
    return _compiled("lut", _lut)(table, c, base)
