"""Hooks through which quantizers and quantized modules tell an active audit what they do.

Without an active audit every function here is a cheap no-op.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol

import torch
from torch import Tensor


@dataclass
class Grid:
    """The declared integer grid of a tensor: value = scale*(q-zero_point), q in [qmin, qmax]."""

    scale: Tensor
    zero_point: Tensor
    qmin: int
    qmax: int
    bits: int
    allow_neg_inf: bool = False  # softmax inputs: -inf marks masked lanes (a mask bit in hardware)


class Recorder(Protocol):
    def register(self, t: Tensor, grid: Grid) -> None: ...
    def push(self, kind: str, module: torch.nn.Module, op_type: str) -> None: ...
    def pop(self) -> None: ...


_ACTIVE: Optional[Recorder] = None


def set_recorder(rec: Optional[Recorder]) -> Optional[Recorder]:
    global _ACTIVE
    old, _ACTIVE = _ACTIVE, rec
    return old


def active() -> bool:
    return _ACTIVE is not None


def register_grid(t: Tensor, grid: Grid) -> None:
    if _ACTIVE is not None:
        _ACTIVE.register(t, grid)


@contextmanager
def region(kind: str, module: torch.nn.Module, op_type: str) -> Iterator[None]:
    """Mark ops executed inside as ``kind`` ('requant' or 'compute') of ``module``."""
    rec = _ACTIVE
    if rec is None:
        yield
        return
    rec.push(kind, module, op_type)
    try:
        yield
    finally:
        rec.pop()


class TensorSet:
    """Identity set of tensors that does not keep them alive."""

    def __init__(self) -> None:
        self._refs: dict = {}

    def add(self, t: Tensor) -> None:
        key = id(t)
        self._refs[key] = weakref.ref(t, lambda _r, k=key: self._refs.pop(k, None))

    def __contains__(self, t: object) -> bool:
        r = self._refs.get(id(t))
        return r is not None and r() is t


def index_derived(tensors, derived: TensorSet) -> bool:
    """True when the float tensors among ``tensors`` all derive from integer metadata (lengths,
    positions) in ``derived`` - index arithmetic, not model data."""
    floats = [t for t in tensors if isinstance(t, Tensor) and t.is_floating_point()]
    return bool(floats) and all(t in derived for t in floats)
