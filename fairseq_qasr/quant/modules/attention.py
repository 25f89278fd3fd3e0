"""Quantized multi-head attention composed of the quantized ops (drop-in for nn.MultiheadAttention).

torch's nn.MultiheadAttention runs a fused kernel on raw weights; this twin computes
in-projections (QLinear), q * 1/sqrt(d) (QMul), QK^T (QMatMul), masks (select), softmax (QSoftmax),
AV (QMatMul), the out-projection (QLinear) and the averaged weights (QMean). Parameters keep their
names (``in_proj_weight``, ``out_proj.weight``, ...) so float state_dicts load unchanged.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from .activations import QMean, QSoftmax
from .arith import QMatMul, QMul
from .base import QConfig
from .linear import QLinear


class QMultiheadAttention(nn.Module):
    op_type = "multihead_attention"

    @classmethod
    def from_float(cls, m: nn.MultiheadAttention, config_for: Callable[[str, str], QConfig]) -> "QMultiheadAttention":
        if m.bias_k is not None or m.add_zero_attn:
            raise NotImplementedError("MultiheadAttention with add_bias_kv / add_zero_attn")
        q = cls()
        q.embed_dim, q.num_heads, q.batch_first, q.dropout = m.embed_dim, m.num_heads, m.batch_first, m.dropout
        q.packed = m._qkv_same_embed_dim
        if q.packed:
            q.in_proj_weight = m.in_proj_weight
        else:
            q.q_proj_weight, q.k_proj_weight, q.v_proj_weight = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
        q.in_proj_bias = m.in_proj_bias
        e = m.embed_dim
        q.q_proj = QLinear(config_for("q_proj", "linear"), {"weight": (e, e)})
        q.k_proj = QLinear(config_for("k_proj", "linear"), {"weight": (e, m.kdim)})
        q.v_proj = QLinear(config_for("v_proj", "linear"), {"weight": (e, m.vdim)})
        q.out_proj = QLinear.from_float(m.out_proj, config_for("out_proj", "linear"))
        q.scale = QMul(config_for("scale", "mul"))
        q.qk = QMatMul(config_for("qk", "matmul"))
        q.softmax = QSoftmax(config_for("softmax", "softmax"), dim=-1)
        q.av = QMatMul(config_for("av", "matmul"))
        q.avg = QMean(config_for("avg", "mean"))
        q.train(m.training)
        return q

    def _proj_weights(self) -> Tuple[Tensor, Tensor, Tensor]:
        if self.packed:
            return tuple(self.in_proj_weight.chunk(3, dim=0))  # type: ignore[return-value]
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None,
                average_attn_weights: bool = True, is_causal: bool = False):
        if self.training and self.dropout > 0:
            raise NotImplementedError("QMultiheadAttention: attention dropout in training mode")
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        L, N, E = query.shape
        S, H = key.shape[0], self.num_heads
        hd = E // H
        wq, wk, wv = self._proj_weights()
        bq, bk, bv = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = self.q_proj(query, wq, bq).reshape(L, N * H, hd).transpose(0, 1)
        k = self.k_proj(key, wk, bk).reshape(S, N * H, hd).transpose(0, 1)
        v = self.v_proj(value, wv, bv).reshape(S, N * H, hd).transpose(0, 1)
        scores = self.qk(self.scale(q, hd ** -0.5), k.transpose(1, 2))  # (N*H, L, S)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(L, S, dtype=torch.bool, device=query.device).triu(1)
        if attn_mask is not None:
            scores = scores.masked_fill(_blocked(attn_mask, "attn_mask"), float("-inf"))
        if key_padding_mask is not None:
            pad = _blocked(key_padding_mask, "key_padding_mask").view(N, 1, 1, S)
            scores = scores.view(N, H, L, S).masked_fill(pad, float("-inf")).view(N * H, L, S)
        probs = self.softmax(scores)
        out = self.av(probs, v).transpose(0, 1).reshape(L, N, E)
        out = self.out_proj(out)
        if self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        w = probs.view(N, H, L, S)
        return out, (self.avg(w, dim=1) if average_attn_weights else w)


def _blocked(mask: Tensor, name: str) -> Tensor:
    """Boolean 'blocked' mask from a bool mask (True = blocked) or an additive 0/-inf float mask."""
    if mask.dtype == torch.bool:
        return mask
    if not bool((torch.isneginf(mask) | (mask == 0)).all()):
        raise NotImplementedError(f"QMultiheadAttention: {name} with values other than 0 and -inf")
    return torch.isneginf(mask)
