"""Quantizer specification: the integer grid a tensor is mapped onto.

A value on the grid is ``scale * (q - zero_point)`` with integer ``q`` in ``[qmin, qmax]``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping, Optional

GRANULARITIES = ("tensor", "channel", "group")
OBSERVERS = ("minmax", "moving_average", "percentile", "mse")
LEARNING = ("none", "lsq", "lsq_plus", "pact")
VALID_BITS = tuple(range(1, 9)) + (16,)  # int32 exists only as the bias/accumulator grid


class SpecError(ValueError):
    """An invalid quantizer specification (message names the offending field)."""


@dataclass(frozen=True)
class QSpec:
    """How one tensor is quantized.

    bits: 1-8 or 16 (biases are always int32 on the accumulator grid); signed/unsigned integer codes;
    symmetric (zero_point = 0) or affine; granularity per tensor, per channel (``axis``) or per
    group of ``group_size`` consecutive elements along ``axis``; observer that sets the range;
    ``learning`` = lsq | lsq_plus (learnable scale / offset) | pact (learnable clip);
    ``pow2`` rounds scales up to powers of two (shift-only requantization).
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = False
    granularity: str = "tensor"
    axis: int = 0
    group_size: int = 0
    observer: str = "minmax"
    momentum: float = 0.1
    percentile: float = 99.99
    learning: str = "none"
    pow2: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or self.bits not in VALID_BITS:
            raise SpecError(f"bits: {self.bits!r} out of range (allowed 1-8, 16)")
        if self.granularity not in GRANULARITIES:
            raise SpecError(f"granularity: {self.granularity!r} not in {GRANULARITIES}")
        if self.granularity == "group" and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise SpecError("group_size: must be a positive int for granularity 'group'")
        if self.observer not in OBSERVERS:
            raise SpecError(f"observer: {self.observer!r} not in {OBSERVERS}")
        if self.learning not in LEARNING:
            raise SpecError(f"learning: {self.learning!r} not in {LEARNING}")
        if self.symmetric and self.signed and self.bits < 2:
            raise SpecError("bits: signed symmetric quantization needs at least 2 bits")
        if not 0.0 < self.momentum <= 1.0:
            raise SpecError(f"momentum: {self.momentum} not in (0, 1]")
        if not 50.0 < self.percentile <= 100.0:
            raise SpecError(f"percentile: {self.percentile} not in (50, 100]")

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        if self.symmetric:  # narrow range: -(2^(b-1)-1) .. 2^(b-1)-1, zero exactly representable
            return -(2 ** (self.bits - 1) - 1)
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

    def with_(self, **kw: Any) -> "QSpec":
        return replace(self, **kw)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], base: Optional["QSpec"] = None, where: str = "") -> "QSpec":
        """Build from a mapping, on top of ``base``; unknown keys raise SpecError naming them."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SpecError(f"{where}{unknown[0]}: unknown key(s) {unknown}; allowed: {sorted(names)}")
        try:
            return replace(base, **dict(d)) if base is not None else cls(**dict(d))
        except SpecError as e:
            raise SpecError(f"{where}{e}") from None

