"""Quantized Linear / Conv1d / Conv2d (weights per output channel, int32 bias)."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from .base import QConfig, QModule


class QLinear(QModule):
    op_type = "linear"
    weight_axes = {"weight": 0}

    @classmethod
    def from_float(cls, m: nn.Linear, qconfig: QConfig) -> "QLinear":
        q = cls(qconfig, {"weight": m.weight.shape})
        q.weight, q.bias = m.weight, m.bias  # shared Parameters: ties are preserved
        return q

    def forward(self, x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
        if weight is None:
            weight, bias = self.weight, self.bias
        return self.run([x], {"weight": weight, "bias": bias})

    def compute(self, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return F.linear(x, weight, bias)


class _QConvNd(QModule):
    weight_axes = {"weight": 0}
    _fn = staticmethod(F.conv1d)

    @classmethod
    def from_float(cls, m: nn.Module, qconfig: QConfig) -> "_QConvNd":
        if m.padding_mode != "zeros":
            raise NotImplementedError(f"{type(m).__name__} with padding_mode={m.padding_mode!r}")
        q = cls(qconfig, {"weight": m.weight.shape})
        q.weight, q.bias = m.weight, m.bias
        q.conv_kw = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
        return q

    def forward(self, x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                **conv_kw) -> Tensor:
        if weight is None:
            weight, bias, conv_kw = self.weight, self.bias, self.conv_kw
        return self.run([x], {"weight": weight, "bias": bias}, **conv_kw)

    def compute(self, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, **kw) -> Tensor:
        return self._fn(x, weight, bias, **kw)


class QConv1d(_QConvNd):
    op_type = "conv1d"
    _fn = staticmethod(F.conv1d)


class QConv2d(_QConvNd):
    op_type = "conv2d"
    _fn = staticmethod(F.conv2d)
