"""Quantized Embedding (rows quantized per token) and its tied output projection."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..audit_state import region
from ..quantizer import Quantizer
from .base import QConfig, QModule


class QEmbedding(QModule):
    """Lookup of per-row quantized weights; indices are integers already (no input quantizer)."""

    op_type = "embedding"
    n_inputs = 0
    weight_axes = {"weight": 0}

    def __init__(self, qconfig: QConfig, weight_shapes=None):
        super().__init__(qconfig, weight_shapes)
        self.proj_q = Quantizer(qconfig.input)  # input quantizer of the tied output projection
        self.padding_idx: Optional[int] = None

    @classmethod
    def from_float(cls, m: nn.Embedding, qconfig: QConfig) -> "QEmbedding":
        if m.max_norm is not None:
            raise NotImplementedError("Embedding with max_norm renormalizes weights in place")
        q = cls(qconfig, {"weight": m.weight.shape})
        q.weight, q.padding_idx = m.weight, m.padding_idx
        return q

    def forward(self, idx: Tensor, weight: Optional[Tensor] = None, padding_idx: Optional[int] = None,
                **kw) -> Tensor:
        if weight is None:
            weight, padding_idx = self.weight, self.padding_idx
        return self.run([idx], {"weight": weight}, padding_idx=padding_idx, **kw)

    def compute(self, idx: Tensor, weight: Tensor, padding_idx: Optional[int] = None, **kw) -> Tensor:
        return F.embedding(idx, weight, padding_idx, **kw)

    def project(self, x: Tensor) -> Tensor:
        """Tied output projection ``x @ weight.T`` on the same quantized weight."""
        xq = self.proj_q(x)
        wq = self.w_q["weight"](self.weight)
        with region("compute", self, "linear"):
            y = F.linear(xq, wq)
        return self.out_q(y) if self.out_q is not None else y
