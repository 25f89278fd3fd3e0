"""A small third-party-style attention block that calls functional ops directly."""
import torch
import torch.nn.functional as F
from torch import nn


class ToyBlock(nn.Module):
    def __init__(self, d: int = 16, use_sdpa: bool = False):
        super().__init__()
        self.qkv, self.o, self.ln = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.LayerNorm(d)
        self.use_sdpa = use_sdpa
        self.planted_float_softmax = False  # tests: a softmax that escapes routing (computes in float)

    def forward(self, x, mask=None):
        q, k, v = self.qkv(self.ln(x)).chunk(3, -1)
        if self.use_sdpa:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = torch.matmul(q * 0.25, k.transpose(-1, -2))
            if mask is not None:
                s = s + mask
            if self.planted_float_softmax:
                with torch._C.DisableTorchFunction():
                    p = F.softmax(s, dim=-1)
            else:
                p = F.softmax(s, dim=-1)
            a = p @ v
        return x + self.o(F.gelu(a))


def toy_inputs(seed: int = 0, t: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, t, 16, generator=g), torch.full((t, t), float("-inf")).triu(1)
