"""Quantized binary arithmetic: MatMul (activation x activation), Add, Sub, Mul.

A Python-number operand (e.g. the 1/sqrt(d) attention scale) is a constant quantized with the weight
spec (per tensor); it is recorded at first use and a different value later raises.
"""
from __future__ import annotations

from numbers import Number
from typing import Union

import torch
from torch import Tensor

from .base import QConfig, QModule


class QMatMul(QModule):
    op_type = "matmul"
    n_inputs = 2

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.run([a, b], {})

    def compute(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.matmul(a, b)


class _QBinary(QModule):
    """``a (op) b``; b may be a tensor (second input quantizer) or a Python number (constant)."""

    n_inputs = 2
    weight_axes = {"const": None}

    def __init__(self, qconfig: QConfig, weight_shapes=None):
        super().__init__(qconfig, weight_shapes)
        self.register_buffer("const_value", torch.full((), float("nan")))

    def forward(self, a: Union[Tensor, Number], b: Union[Tensor, Number], reverse: bool = False) -> Tensor:
        if not isinstance(a, Tensor):
            a, b, reverse = b, a, not reverse
        if isinstance(b, Tensor):
            return self.run([a, b], {}, reverse=reverse)
        if not isinstance(b, (int, float)) or isinstance(b, bool):
            raise TypeError(f"{self.op_type}: unsupported operand {type(b).__name__}")
        if torch.isnan(self.const_value):
            self.const_value.fill_(float(b))
        elif abs(float(self.const_value) - float(b)) > 1e-6 * max(abs(float(b)), 1e-30):
            raise ValueError(f"{self.op_type}: constant operand changed from {float(self.const_value)} to {b}")
        const = torch.tensor(float(b), dtype=a.dtype, device=a.device)
        return self.run([a], {"const": const}, reverse=reverse)

    def compute(self, a: Tensor, b: Tensor = None, const: Tensor = None, reverse: bool = False) -> Tensor:
        other = const if b is None else b
        return self._op(other, a) if reverse else self._op(a, other)

    @staticmethod
    def _op(a: Tensor, b: Tensor) -> Tensor:
        raise NotImplementedError


class QAdd(_QBinary):
    op_type = "add"
    _op = staticmethod(torch.add)


class QSub(_QBinary):
    op_type = "sub"
    _op = staticmethod(torch.sub)


class QMul(_QBinary):
    op_type = "mul"
    _op = staticmethod(torch.mul)
