"""The fake-quantized model's float64 evaluation: its arithmetic without float32 rounding, on the same integer weights.

Quantization in float32 and in float64 can round a value on a tie to different codes. The integer weights and bias codes
are part of the model (the engine and exported files hold the float32 ones), so :func:`to_float64` keeps them, times
their exact scales, and evaluates everything else in float64: a reference for the integer engine that is free of
float32's rounding noise.
"""
from __future__ import annotations

import copy
import types
from typing import Any, Callable, Dict, List

import torch
from torch import Tensor, nn

from .modules.base import QModule
from .quantizer import Quantizer


def to_float64(model: nn.Module, run: Callable[[nn.Module], Any]) -> nn.Module:
    """``model.double()`` with every code that comes from float32 data kept as float32 made it, times its exact scale
    (:func:`_exact`: float32 rounds ``(c - z) s`` to 24 bits, the engine multiplies by the exact scale): every weight
    quantizer's output is pinned to float32's codes, the quantizers of float inputs (the first one, which quantizes
    the features, and any that quantizes a slice of a buffer, such as sinusoidal positions) keep a float32 copy that
    gives their codes, and biases keep their float32 codes on the exact float64 grid (:func:`_bias_float32_codes`).
    ``run(model)``, one forward pass, records all this; it must reach every calibrated weight quantizer."""
    pinned: Dict[nn.Module, Tensor] = {}
    called: List[nn.Module] = []
    from_buffers: List[nn.Module] = []
    buffers = {b.untyped_storage().data_ptr() for b in model.buffers() if b.is_floating_point() and b.numel() > 1}
    quantizers = [(n, m) for n, m in model.named_modules() if isinstance(m, Quantizer)]
    wqs = [m for n, m in quantizers if ".w_q." in n]

    def pre(mod, args):
        called.append(mod)
        if torch.is_tensor(args[0]) and args[0].untyped_storage().data_ptr() in buffers:
            from_buffers.append(mod)

    def pin(mod, args, out):
        pinned.setdefault(mod, _exact(mod, out))

    hs = [q.register_forward_hook(pin) for q in wqs]
    hs += [m.register_forward_pre_hook(pre) for n, m in quantizers if ".w_q." not in n]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in hs:
            h.remove()
    missing = [n for n, m in model.named_modules() if m in wqs and m not in pinned and bool(m.initialized)]
    if missing:
        raise RuntimeError(f"weight quantizers that did not run on the recording pass: {missing[:5]}")
    float_inputs = {q: copy.deepcopy(q) for q in called[:1] + from_buffers}
    model.double()
    for q, w in pinned.items():
        q.register_forward_hook(lambda mod, args, out, w=w: w)
    for q, q32 in float_inputs.items():
        q.register_forward_hook(lambda mod, args, out, q32=q32: _exact(q32, q32(args[0].float())))
    for m in model.modules():
        if isinstance(m, QModule) and "weight" in m.w_q:
            m._bias = types.MethodType(_bias_float32_codes, m)
    return model


def _exact(q: Quantizer, out: Tensor) -> Tensor:
    """The float32 fake-quantizer output ``out`` = float32((c - z) s) as the exact float64 value (c - z) s: float32
    rounds the product (2^-24 relative), the engine multiplies by the exact scale; ``out / s`` recovers c - z."""
    scale = q.qparams(out.dim())[0].detach().double()
    out = out.detach().double()
    return torch.round(out / scale) * scale


def _bias_float32_codes(self: QModule, bias: Tensor) -> Tensor:
    """A float64 module's bias on its exact int32 grid ``s_in s_w`` with the codes of float32 (the engine's):
    ``round(float32(b) / float32(s_in s_w))``."""
    if not self.w_q["weight"].enabled:
        return bias
    in_scale, w_scale = self.bias_scales(bias.device)
    grid = in_scale.double().reshape(()) * w_scale.double()
    grid = grid.expand(bias.shape) if grid.numel() == 1 else grid.reshape(bias.shape)
    return torch.round(bias.float() / grid.float()).double() * grid
