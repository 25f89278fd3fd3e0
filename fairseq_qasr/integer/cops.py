"""Element-wise integer ops of the engine on the C kernels (:mod:`.cbuild`): requantization, LayerNorm with an
integer square root, table look-ups (GELU), 16-bit residual adds. Each is bit for bit its torch twin in
:mod:`.kernels` (``tests/integer/test_int_cgemm.py``), one pass instead of a chain of int64 tensor ops."""
from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import cbuild


@cbuild.op("isqrt_avx2(Tensor v) -> Tensor")
def _isqrt(v: Tensor) -> Tensor:
    out = torch.empty_like(v)
    cbuild.dll().qasr_isqrt(v.data_ptr(), out.data_ptr(), v.numel())
    return out


def isqrt(v: Tensor) -> Tensor:
    """Floor integer square root of non-negative int64 values below 2^62 (:func:`kernels.isqrt`, in C)."""
    cbuild.dll()  # (a clear error where the kernels are not available)
    if bool((v < 0).any()) or bool((v >= 2 ** 62).any()):
        raise ValueError("cops.isqrt: values must lie in [0, 2^62)")
    return _isqrt(v.long().contiguous())


@cbuild.op("layer_norm_avx2(Tensor x, Tensor gain, Tensor bias, int[] ints) -> Tensor")
def _layer_norm(x: Tensor, gain: Tensor, bias: Tensor, ints: List[int]) -> Tensor:
    eps_term, k, frac = ints
    out = torch.empty(x.shape, dtype=torch.int64)
    n = x.shape[-1]
    cbuild.dll().qasr_layer_norm(x.data_ptr(), cbuild.TYPES[x.dtype], x.numel() // n, n, gain.data_ptr(),
                                 bias.data_ptr() if bias.numel() else None, eps_term, k, frac, out.data_ptr(),
                                 torch.get_num_threads())
    return out


def layer_norm(x: Tensor, gain: Tensor, bias: Optional[Tensor], eps_term: int, k: int, frac: int = 16) -> Tensor:
    """:func:`kernels.layer_norm_int` in one pass per row (int64 out), bit for bit."""
    cbuild.dll()
    if gain.dtype != torch.int8 or (bias is not None and bias.dtype != torch.int32) or gain.numel() != x.shape[-1]:
        raise ValueError("cops.layer_norm: int8 gain codes and int32 bias of the row length expected")
    return _layer_norm(cbuild.codes(x).contiguous(), gain.contiguous(),
                       bias.contiguous() if bias is not None else cbuild.NONE32, [int(eps_term), int(k), int(frac)])


@cbuild.op("layer_norm_exact_avx2(Tensor x, Tensor gain, Tensor bh, Tensor bl, Tensor consts, Tensor(a!) out, "
           "int[] ints) -> ()")
def _layer_norm_exact(x: Tensor, gain: Tensor, bh: Tensor, bl: Tensor, consts: Tensor, out: Tensor,
                      ints: List[int]) -> None:
    zp, qmin, qmax = ints
    n = x.shape[-1]
    cbuild.dll().qasr_layer_norm_exact(x.data_ptr(), cbuild.TYPES[x.dtype], x.numel() // n, n, gain.data_ptr(),
                                       bh.data_ptr(), bl.data_ptr(), consts.data_ptr(), zp, qmin, qmax, out.data_ptr(),
                                       cbuild.TYPES[out.dtype], torch.get_num_threads())


def layer_norm_exact(x: Tensor, gain: Tensor, bh: Tensor, bl: Tensor, ints: List[int], zp: int, qmin: int, qmax: int,
                     out_dtype: torch.dtype) -> Tensor:
    """:func:`kernels.layer_norm_exact` in one pass per row (OpenMP over rows; the row multiplier in 128 bits)."""
    cbuild.dll()
    n = x.shape[-1]
    if gain.dtype != torch.int8 or gain.numel() != n or bh.numel() != n or bl.numel() != n or len(ints) != 6:
        raise ValueError("cops.layer_norm_exact: int8 gain codes, bias words of the row length and 6 constants "
                         "expected")
    out = torch.empty(x.shape, dtype=out_dtype)
    _layer_norm_exact(cbuild.codes(x).contiguous(), gain.contiguous(), bh.long().contiguous(), bl.long().contiguous(),
                      torch.tensor([int(v) for v in ints], dtype=torch.int64), out, [int(zp), int(qmin), int(qmax)])
    return out


@cbuild.op("softmax_exact_avx2(Tensor x, Tensor mask, Tensor lut, Tensor(a!) out, int[] ints) -> ()")
def _softmax_exact(x: Tensor, mask: Tensor, lut: Tensor, out: Tensor, ints: List[int]) -> None:
    cmin, cq_hi, cq_lo, Q, zp, qmin, qmax = ints
    n = x.shape[-1]
    cbuild.dll().qasr_softmax_exact(x.data_ptr(), cbuild.TYPES[x.dtype], x.numel() // n, n,
                                    mask.data_ptr() if mask.numel() else None, cmin, lut.data_ptr(), cq_hi, cq_lo, Q,
                                    zp, qmin, qmax, out.data_ptr(), cbuild.TYPES[out.dtype], torch.get_num_threads())


def softmax_exact(x: Tensor, cmin: int, masked: Optional[Tensor], lut: Tensor, cq: int, Q: int, zp: int, qmin: int,
                  qmax: int, out_dtype: torch.dtype) -> Tensor:
    """:func:`kernels.softmax_exact` in one pass per row (the row reciprocal and the products in 128 bits); ``masked``
    broadcasts to ``x``."""
    cbuild.dll()
    if lut.dtype != torch.int64 or out_dtype not in cbuild.TYPES:
        raise ValueError("cops.softmax_exact: an int64 table and int8/16/32 codes out expected")
    out = torch.empty(x.shape, dtype=out_dtype)
    mask = masked.expand(x.shape).to(torch.uint8).contiguous() if masked is not None else \
        torch.empty(0, dtype=torch.uint8)  # (a mask that broadcasts, e.g. causal: expanded to the input's shape)
    _softmax_exact(cbuild.codes(x).contiguous(), mask, lut.contiguous(), out,
                   [int(cmin), int(cq) >> 63, int(cq) & (2 ** 63 - 1), int(Q), int(zp), int(qmin), int(qmax)])
    return out


@cbuild.op("lut_avx2(Tensor x, Tensor table, Tensor(a!) out, int base) -> int")
def _lut(x: Tensor, table: Tensor, out: Tensor, base: int) -> int:
    t = cbuild.TYPES
    return cbuild.dll().qasr_lut(x.data_ptr(), t[x.dtype], x.numel(), base, table.data_ptr(), t[table.dtype],
                                 table.numel(), out.data_ptr(), torch.get_num_threads())


def lut(table: Tensor, x: Tensor, base: int) -> Tensor:
    """``table[x - base]`` for integer codes ``x`` within the table (int8/int16/int32 table)."""
    cbuild.dll()
    if table.dtype not in cbuild.TYPES:
        raise TypeError(f"cops.lut: table dtype {table.dtype}")
    out = torch.empty(x.shape, dtype=table.dtype)
    bad = _lut(cbuild.codes(x).contiguous(), table.contiguous(), out, int(base))
    if bad:
        raise ValueError(f"cops.lut: {bad} codes outside the table")
    return out


@cbuild.op("add_avx2(Tensor a, Tensor b, int[] ints) -> Tensor")
def _add(a: Tensor, b: Tensor, ints: List[int]) -> Tensor:
    za, ka, zb, kb = ints
    out = torch.empty(a.shape, dtype=torch.int64)
    t = cbuild.TYPES
    cbuild.dll().qasr_add(a.data_ptr(), t[a.dtype], za, ka, b.data_ptr(), t[b.dtype], zb, kb, a.numel(), out.data_ptr(),
                          torch.get_num_threads())
    return out


def add(a: Tensor, za: int, ka: int, b: Tensor, zb: int, kb: int) -> Tensor:
    """``(a - za) * ka + (b - zb) * kb`` as int64, one pass (same shapes)."""
    cbuild.dll()
    if a.shape != b.shape:
        raise ValueError(f"cops.add: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    return _add(cbuild.codes(a).contiguous(), cbuild.codes(b).contiguous(), [int(za), int(ka), int(zb), int(kb)])


ACC_TYPES = {**cbuild.TYPES, torch.int64: 3}


@cbuild.op("requantize_avx2(Tensor acc, Tensor mult, Tensor mlo, Tensor shift, Tensor(a!) out, int[] ints) -> ()")
def _requant(acc: Tensor, mult: Tensor, mlo: Tensor, shift: Tensor, out: Tensor, ints: List[int]) -> None:
    sub, zp, qmin, qmax = ints
    cols = acc.shape[-1] if acc.dim() else 1
    cbuild.dll().qasr_requant(acc.data_ptr(), ACC_TYPES[acc.dtype], acc.numel() // max(cols, 1), cols, sub,
                              mult.data_ptr(), mlo.data_ptr() if mlo.numel() else None, shift.data_ptr(),
                              int(mult.numel() > 1), zp, qmin, qmax, out.data_ptr(), cbuild.TYPES[out.dtype],
                              torch.get_num_threads())


_WORDS: Dict[Tuple[int, int], tuple] = {}  # (id(m), id(shift)) -> (their weak references, versions, words)


def words(m: Tensor, shift: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The kernels' operands of one- or two-word multipliers (:func:`kernels.split_multiplier`): contiguous int64
    ``(m_hi, m_lo, shift)`` of equal length, ``m_lo`` empty for one-word multipliers. Remembered per pair of tensor
    objects (an engine's constants: every call of a layer) while neither is changed in place."""
    key, versions = (id(m), id(shift)), (m._version, shift._version)
    hit = _WORDS.get(key)
    if hit is not None and hit[0]() is m and hit[1]() is shift and hit[2] == versions:
        return hit[3]
    from .kernels import split_multiplier

    hi, lo, sh = split_multiplier(m.reshape(-1), shift.reshape(-1))
    hi = hi.contiguous()
    out = hi, cbuild.NONE64 if lo is None else lo.contiguous(), sh.expand(hi.numel()).contiguous()
    if len(_WORDS) >= 4096:  # (entries of freed tensors)
        _WORDS.clear()
    _WORDS[key] = (weakref.ref(m), weakref.ref(shift), versions, out)
    return out


def requantize(acc: Tensor, m: Tensor, shift: Tensor, zp: int, qmin: int, qmax: int, out_dtype,
               sub: int = 0) -> Optional[Tensor]:
    """:func:`kernels.requantize` in one pass (OpenMP over rows), or None where it does not apply (multipliers
    neither one value nor one per element of the last dim)."""
    cols = acc.shape[-1] if acc.dim() else 1
    if not cbuild.available() or acc.dtype not in ACC_TYPES or out_dtype not in cbuild.TYPES \
            or m.numel() not in (1, cols) or (m.dim() > 1 and m.shape[-1] != m.numel()):
        return None
    mult, mlo, sh = words(m, shift)
    if mlo.numel() and acc.dtype == torch.int64 and acc.numel():  # two words on int64 values: the C vector lanes
        lo, hi = (int(v) for v in torch.aminmax(acc))            # take them as int32 where they fit (sub: < 2^17)
        if -(2 ** 31) + 2 ** 17 <= lo and hi < 2 ** 31 - 2 ** 17:
            acc = acc.to(torch.int32)
    out = torch.empty(acc.shape, dtype=out_dtype)
    _requant(acc.contiguous(), mult, mlo, sh, out, [int(sub), int(zp), int(qmin), int(qmax)])
    return out


@cbuild.op("add_requant_avx2(Tensor a, Tensor b, Tensor(a!) out, Tensor(b!) bad, int[] ints) -> ()")
def _add_requant(a: Tensor, b: Tensor, out: Tensor, bad: Tensor, ints: List[int]) -> None:
    t = cbuild.TYPES
    cbuild.dll().qasr_add_requant(a.data_ptr(), t[a.dtype], b.data_ptr(), t[b.dtype], a.numel(), *ints,
                                  bad.data_ptr(), out.data_ptr(), t[out.dtype], torch.get_num_threads())


def add_requant(a: Tensor, za: int, ma: int, ta: int, b: Tensor, zb: int, mb: int, tb: int, sh: int, zp: int,
                qmin: int, qmax: int, out_dtype: torch.dtype, la: int = 0, lb: int = 0) -> Tensor:
    """:func:`kernels.add_requant_int` in one pass (second words ``la``, ``lb``: 0 for one-word multipliers); codes
    within 2^17 of their zero points (checked in the kernel: a ValueError otherwise)."""
    cbuild.dll()
    if a.shape != b.shape:
        raise ValueError(f"cops.add_requant: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    if not (all(0 <= v < 2 ** 31 for v in (ma, mb, la, lb)) and 0 <= ta <= 13 and 0 <= tb <= 13 and 1 <= sh <= 62
            and abs(za) < 2 ** 17 and abs(zb) < 2 ** 17 and out_dtype in cbuild.TYPES):
        raise ValueError(f"cops.add_requant: constants out of range ({ma}, {ta}, {mb}, {tb}, {sh}, {za}, {zb})")
    out = torch.empty(a.shape, dtype=out_dtype)
    bad = torch.zeros(1, dtype=torch.int64)
    _add_requant(cbuild.codes(a).contiguous(), cbuild.codes(b).contiguous(), out, bad,
                 [int(za), int(ma), int(ta), int(zb), int(mb), int(tb), int(sh), int(zp), int(qmin), int(qmax),
                  int(la), int(lb)])
    if int(bad):
        raise ValueError(f"cops.add_requant: {int(bad)} codes are 2^17 or more from their zero point")
    return out
