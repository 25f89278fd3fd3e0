"""Equivalence of the integer engine with the fake-quantized model it was compiled from, op by op.

Teacher forcing: every op of the engine is fed exactly the fake model's input codes (an engine hook replaces its
own codes by the fake model's after recording the difference), so each quantizer's difference measures that op
alone, not drift accumulated upstream. Plain torch: the fake model is any module with the plugin's quantizers.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from fairseq_qasr.quant import Quantizer

from .engine import QT, _storage


def fake_codes(model, inputs) -> Tuple[Dict[str, Tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Codes (round(x/s)+z) of every activation quantizer of the fake model on ``inputs``, and its logits."""
    fake: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def h(mod, args, out):
            s, z = mod.qparams(out.dim())
            x = out.detach()
            fin = torch.isfinite(x)
            fake[name] = (torch.round(torch.where(fin, x, torch.zeros_like(x)) / s) + z, fin)
        return h

    hs = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
          if isinstance(m, Quantizer) and (".in_q." in n or n.endswith(".out_q"))]
    try:
        with torch.no_grad():
            logits, _ = model(**inputs)
    finally:
        for h in hs:
            h.remove()
    return fake, logits


def to_engine_layout(path: str, q: torch.Tensor, shape) -> torch.Tensor:
    """The fake model's codes of quantizer ``path`` in the engine's tensor layout."""
    if "encoder.frontend.blocks" in path:
        return q.permute(0, 2, 3, 1)
    if path.startswith(("encoder.frontend.conv", "encoder.frontend.gelu")):  # conv1d front-end: (B, C, T)
        return q.transpose(1, 2)
    if path.endswith("mul_0.in_q.0") or path.endswith("matmul_0.in_q.0"):
        return q.transpose(1, 2).reshape(shape)
    if path.endswith("matmul_0.in_q.1"):
        return q.permute(0, 3, 1, 2).reshape(shape)
    if path.endswith("matmul_1.in_q.1"):
        return q.transpose(1, 2).reshape(shape)
    if "conv_context.convs." in path:
        return q[:, :, q.shape[2] - shape[1]:].transpose(1, 2)
    if q.dim() == len(shape) and q.shape[0] == 1 and shape[0] != 1:  # batch-broadcast tables (positions)
        q = q.expand(shape[0], *q.shape[1:])
    if q.dim() == len(shape) - 1:
        q = q.unsqueeze(0).expand(shape)
    return q.reshape(shape)


def forced_run(engine, model, inputs) -> Tuple[Dict[str, Dict[str, float]], torch.Tensor, torch.Tensor]:
    """Layer by layer: every op of the engine gets exactly the fake model's input codes (teacher forcing);
    returns per-quantizer stats {max_lsb, frac_diff, n}, the engine's logits and the fake logits."""
    fake, ref = fake_codes(model, inputs)
    stats: Dict[str, Dict[str, float]] = {}

    def hook(path: str, out: QT, masked):
        if path not in fake:
            raise AssertionError(f"engine quantizer {path} never ran in the fake model")
        q, fin = fake[path]
        m = engine.meta["q:" + path]
        off, dtype = _storage(m["qmin"], m["qmax"])
        want = to_engine_layout(path, q + off, out.c.shape).to(out.c.dtype)
        ok = to_engine_layout(path, fin, out.c.shape)
        if masked is not None:
            ok = ok & ~masked
        diff = (out.c.long() - want.long()).abs()[ok]
        stats[path] = dict(max_lsb=int(diff.max()) if diff.numel() else 0,
                           frac_diff=float((diff > 0).float().mean()) if diff.numel() else 0.0, n=int(diff.numel()))
        out.c = torch.where(ok, want, out.c).contiguous()

    engine.hook = hook
    try:
        with torch.no_grad():
            enc = engine.encode(engine.quantize_input(inputs["src_tokens"]), inputs["src_lengths"])
            logits = engine.decode_step(inputs["prev_output_tokens"], enc, None)
    finally:
        engine.hook = None
    return stats, logits, ref


def summarize(stats: Dict[str, Dict[str, float]], logits: torch.Tensor, ref: torch.Tensor, logit_scale: float,
              pad_mask: torch.Tensor | None = None) -> Dict[str, object]:
    """One teacher-forced run in numbers: quantizers beyond 1 LSB, share of bit-exact codes, how many codes differ per
    quantizer, logit error in LSB of the logit grid (suppressed lanes, -1e4 in the fake model, excluded), positions
    whose argmax differs."""
    n = sum(v["n"] for v in stats.values())
    diff_codes = sum(v["frac_diff"] * v["n"] for v in stats.values())
    kept = ref > -1e3
    err = ((logits.double() * logit_scale - ref.double()).abs() / logit_scale)[kept]
    argmax_diff = logits.argmax(-1) != ref.argmax(-1)
    if pad_mask is not None:
        argmax_diff = argmax_diff & ~pad_mask
    return dict(quantizers=len(stats), beyond_1lsb={k: v["max_lsb"] for k, v in stats.items() if v["max_lsb"] > 1},
                codes=n, bit_exact=1 - diff_codes / max(n, 1),
                differ={k: round(v["frac_diff"] * v["n"]) for k, v in stats.items() if v["frac_diff"] > 0}, logits_max_lsb=float(err.max()) if err.numel() else 0.0,
                argmax_positions=int(argmax_diff.numel() if pad_mask is None else (~pad_mask).sum()),
                argmax_differ=int(argmax_diff.sum()))
