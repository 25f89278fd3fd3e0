"""Bit packing of integer codes at 1-8 bits (3/5/6 included), little-endian bit order.

Codes are first made unsigned (``u = q - qmin``, so ``0 <= u < 2**bits``), then the flat sequence of
``bits``-wide fields is laid out LSB-first into bytes: element ``i`` occupies bits
``[i*bits, (i+1)*bits)`` of the little-endian bit stream. The packed size is ``ceil(n*bits/8)`` bytes.
Plain integer torch ops only (no float).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor


def packed_nbytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def pack_codes(q: Tensor, bits: int, qmin: int) -> Tensor:
    """Pack integer codes ``q`` (any int dtype, values in ``[qmin, qmin + 2**bits)``) into a uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits: {bits} not in 1..8")
    u = q.reshape(-1).to(torch.int64) - qmin
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 2 ** bits):
        raise ValueError(f"codes out of range for {bits} bits from qmin={qmin}")
    n = u.numel()
    if bits == 8:
        return u.to(torch.uint8)
    # bit matrix: element i, bit j -> stream position i*bits + j
    shifts = torch.arange(bits, dtype=torch.int64)
    bitmat = (u[:, None] >> shifts[None, :]) & 1  # (n, bits)
    stream = bitmat.reshape(-1)
    nbytes = packed_nbytes(n, bits)
    pad = nbytes * 8 - stream.numel()
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int64))
    return (stream.view(nbytes, 8) * weights).sum(1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, qmin: int, shape: Sequence[int], dtype=torch.int8) -> Tensor:
    """Inverse of :func:`pack_codes`: codes of ``shape`` in ``dtype`` (int8 unless they do not fit)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits: {bits} not in 1..8")
    n = 1
    for s in shape:
        n *= int(s)
    if packed.numel() != packed_nbytes(n, bits):
        raise ValueError(f"packed tensor has {packed.numel()} bytes, expected {packed_nbytes(n, bits)}")
    p = packed.reshape(-1).to(torch.int64)
    if bits == 8:
        u = p
    else:
        stream = ((p[:, None] >> torch.arange(8, dtype=torch.int64)[None, :]) & 1).reshape(-1)[: n * bits]
        u = (stream.view(n, bits) << torch.arange(bits, dtype=torch.int64)[None, :]).sum(1)
    q = u + qmin
    if dtype == torch.int8 and n and (int(q.min()) < -128 or int(q.max()) > 127):
        dtype = torch.int16
    return q.to(dtype).reshape(tuple(int(s) for s in shape))


def code_range(bits: int, signed: bool, symmetric: bool) -> Tuple[int, int]:
    """``(qmin, qmax)`` exactly as :class:`fairseq_qasr.quant.QSpec` defines them."""
    if not signed:
        return 0, 2 ** bits - 1
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
