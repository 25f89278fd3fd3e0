"""Quantized LayerNorm: integer input, per-tensor quantized gain, int32 bias on gain_scale*2^-16."""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .base import QConfig, QModule


class QLayerNorm(QModule):
    op_type = "layer_norm"
    weight_axes = {"weight": None}
    bias_frac_bits = 16  # the normalized input is a 16-fractional-bit fixed-point value

    @classmethod
    def from_float(cls, m: nn.LayerNorm, qconfig: QConfig) -> "QLayerNorm":
        q = cls(qconfig)
        q.weight, q.bias = m.weight, m.bias
        q.normalized_shape, q.eps = tuple(m.normalized_shape), m.eps
        return q

    def forward(self, x: Tensor, normalized_shape: Optional[Sequence[int]] = None,
                weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                eps: Optional[float] = None) -> Tensor:
        if normalized_shape is None:
            normalized_shape, weight, bias, eps = self.normalized_shape, self.weight, self.bias, self.eps
        if weight is None and bias is not None:
            raise NotImplementedError("layer_norm with a bias but no weight")
        return self.run([x], {"weight": weight, "bias": bias}, normalized_shape=normalized_shape,
                        eps=1e-5 if eps is None else eps)

    def compute(self, x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                normalized_shape=(), eps: float = 1e-5) -> Tensor:
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
