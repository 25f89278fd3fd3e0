"""Plain-torch building blocks of the conv-context speech transformer.

Everything here is made of ``nn.Linear / nn.Conv1d / nn.Conv2d / nn.LayerNorm / nn.MaxPool2d`` and plain
ops (``torch.matmul``, ``F.softmax``, ``+``, ``*``, activations), so the quantization tool can swap the modules
and route the functional ops. Tensors are batch-first: ``(batch, time, channels)``.

Incremental decoding keeps its state in a flat ``cache`` dict (name -> tensor with batch on dim 0), which the
fairseq decoder reorders for beam search.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Cache = Dict[str, Optional[Tensor]]

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Sinusoidal positions ``[length, channels]``: sin half then cos half (Whisper's layout)."""
    assert channels % 2 == 0, "sinusoidal positions need an even channel count"
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2, dtype=torch.float32))
    scaled_time = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


class MultiheadAttention(nn.Module):
    """Scaled dot-product attention from explicit ops (no fused SDPA, so every op can be quantized)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, key_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=key_bias)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def _split(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, d)

    def forward(
        self,
        query: Tensor,
        memory: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
        causal: bool = False,
        cache: Optional[Cache] = None,
        cache_key: str = "",
    ) -> Tuple[Tensor, Tensor]:
        """Self-attention when ``memory`` is None, else cross-attention over ``memory``.

        With a ``cache``, self-attention appends this step's keys/values to the cached ones and
        cross-attention computes the memory's keys/values once.
        Returns (output ``(B, Tq, C)``, attention weights averaged over heads ``(B, Tq, Tk)``).
        """
        q = self._split(self.q_proj(query))
        if memory is None:
            k, v = self._split(self.k_proj(query)), self._split(self.v_proj(query))
            if cache is not None:
                prev_k, prev_v = cache.get(cache_key + ".k"), cache.get(cache_key + ".v")
                if prev_k is not None and prev_v is not None:
                    k, v = torch.cat([prev_k, k], dim=2), torch.cat([prev_v, v], dim=2)
                cache[cache_key + ".k"], cache[cache_key + ".v"] = k, v
        else:
            cached_k = cache.get(cache_key + ".k") if cache is not None else None
            cached_v = cache.get(cache_key + ".v") if cache is not None else None
            if cached_k is not None and cached_v is not None:
                k, v = cached_k, cached_v
            else:
                k, v = self._split(self.k_proj(memory)), self._split(self.v_proj(memory))
                if cache is not None:
                    cache[cache_key + ".k"], cache[cache_key + ".v"] = k, v
        scores = torch.matmul(q * self.scaling, k.transpose(-2, -1))  # (B, H, Tq, Tk)
        if causal and scores.size(-2) > 1:
            tq, tk = scores.size(-2), scores.size(-1)
            future = torch.ones(tq, tk, dtype=torch.bool, device=scores.device).triu(tk - tq + 1)
            scores = scores.masked_fill(future, float("-inf"))
        if key_padding_mask is not None and key_padding_mask.any():
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        probs = F.softmax(scores, dim=-1)
        out = torch.matmul(F.dropout(probs, self.dropout, self.training), v)
        b, _, tq, _ = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(b, tq, self.heads * self.head_dim))
        return out, probs.mean(dim=1)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.activation, self.dropout = ACTIVATIONS[activation], dropout

    def forward(self, x: Tensor) -> Tensor:
        x = F.dropout(self.activation(self.fc1(x)), self.dropout, self.training)
        return self.fc2(x)


class _Sublayer(nn.Module):
    """Residual wrapper: pre-LN (``x + f(ln(x))``) or post-LN (``ln(x + f(x))``)."""

    def __init__(self, dim: int, normalize_before: bool, eps: float, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.normalize_before, self.dropout = normalize_before, dropout

    def pre(self, x: Tensor) -> Tensor:
        return self.norm(x) if self.normalize_before else x

    def post(self, residual: Tensor, y: Tensor) -> Tensor:
        x = residual + F.dropout(y, self.dropout, self.training)
        return x if self.normalize_before else self.norm(x)


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, *, activation: str, dropout: float,
                 attention_dropout: float, normalize_before: bool, key_bias: bool, eps: float):
        super().__init__()
        self.self_attn = MultiheadAttention(dim, heads, attention_dropout, key_bias)
        self.attn_block = _Sublayer(dim, normalize_before, eps, dropout)
        self.ffn = FeedForward(dim, ffn, activation, dropout)
        self.ffn_block = _Sublayer(dim, normalize_before, eps, dropout)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        y, _ = self.self_attn(self.attn_block.pre(x), key_padding_mask=padding_mask)
        x = self.attn_block.post(x, y)
        return self.ffn_block.post(x, self.ffn(self.ffn_block.pre(x)))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, *, activation: str, dropout: float,
                 attention_dropout: float, normalize_before: bool, key_bias: bool, eps: float):
        super().__init__()
        self.self_attn = MultiheadAttention(dim, heads, attention_dropout, key_bias)
        self.self_attn_block = _Sublayer(dim, normalize_before, eps, dropout)
        self.cross_attn = MultiheadAttention(dim, heads, attention_dropout, key_bias)
        self.cross_attn_block = _Sublayer(dim, normalize_before, eps, dropout)
        self.ffn = FeedForward(dim, ffn, activation, dropout)
        self.ffn_block = _Sublayer(dim, normalize_before, eps, dropout)

    def forward(self, x: Tensor, memory: Tensor, memory_padding_mask: Optional[Tensor],
                cache: Optional[Cache], name: str) -> Tuple[Tensor, Tensor]:
        y, _ = self.self_attn(self.self_attn_block.pre(x), causal=True, cache=cache, cache_key=name + ".self")
        x = self.self_attn_block.post(x, y)
        y, attn = self.cross_attn(self.cross_attn_block.pre(x), memory, key_padding_mask=memory_padding_mask,
                                  cache=cache, cache_key=name + ".cross")
        x = self.cross_attn_block.post(x, y)
        return self.ffn_block.post(x, self.ffn(self.ffn_block.pre(x))), attn


def _pooled_length(lengths: Tensor, pool: int) -> Tensor:
    return torch.div(lengths + pool - 1, pool, rounding_mode="floor")  # MaxPool2d(ceil_mode=True)


class VGGFrontEnd(nn.Module):
    """2-D VGG blocks over (time, frequency) (Mohamed et al. 2019): per block ``convs x (3x3 conv, ReLU)``
    then 2x2 max-pooling; the flattened (channels x frequency) features are projected to ``dim``."""

    def __init__(self, in_features: int, channels: Sequence[int], convs_per_block: int, dim: int):
        super().__init__()
        blocks: List[nn.Module] = []
        in_ch, freq = 1, in_features
        for out_ch in channels:
            layers: List[nn.Module] = []
            for _ in range(convs_per_block):
                layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU()]
                in_ch = out_ch
            layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
            blocks.append(nn.Sequential(*layers))
            freq = (freq + 1) // 2
        self.blocks = nn.Sequential(*blocks)
        self.proj = nn.Linear(in_ch * freq, dim)
        self.num_blocks = len(channels)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        for _ in range(self.num_blocks):
            lengths = _pooled_length(lengths, 2)
        return lengths

    def forward(self, feats: Tensor) -> Tensor:
        x = self.blocks(feats.unsqueeze(1))  # (B, C, T', F')
        b, c, t, f = x.shape
        return self.proj(x.permute(0, 2, 1, 3).reshape(b, t, c * f))


class Conv1dGeluFrontEnd(nn.Module):
    """Whisper's front-end: conv(k3, s1) + GELU, conv(k3, s2) + GELU over the feature channels."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv1d(in_features, dim, 3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, 3, stride=2, padding=1)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        return torch.div(lengths - 1, 2, rounding_mode="floor") + 1

    def forward(self, feats: Tensor) -> Tensor:
        x = F.gelu(self.conv1(feats.transpose(1, 2)))
        return F.gelu(self.conv2(x)).transpose(1, 2)


class CausalConvContext(nn.Module):
    """Decoder context from 1-D causal convolutions over previous token embeddings (no positions).

    Each layer: left-pad ``kernel-1`` steps, conv, LayerNorm, ReLU. Incremental decoding keeps the last
    ``kernel-1`` inputs of every layer in the cache.
    """

    def __init__(self, in_dim: int, channels: int, kernel: int, layers: int, dim: int, eps: float):
        super().__init__()
        self.kernel = kernel
        self.convs = nn.ModuleList(nn.Conv1d(in_dim if i == 0 else channels, channels, kernel) for i in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(channels, eps=eps) for _ in range(layers))
        self.proj = nn.Linear(channels, dim) if channels != dim else None

    def forward(self, x: Tensor, cache: Optional[Cache] = None) -> Tensor:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            key = f"conv_context.{i}"
            prev = cache.get(key) if cache is not None else None
            if prev is None:
                prev = x.new_zeros(x.size(0), self.kernel - 1, x.size(2))
            padded = torch.cat([prev, x], dim=1)
            if cache is not None:
                cache[key] = padded[:, padded.size(1) - (self.kernel - 1):]
            x = F.relu(norm(conv(padded.transpose(1, 2)).transpose(1, 2)))
        return self.proj(x) if self.proj is not None else x
