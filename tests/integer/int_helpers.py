"""Shared helpers of the integer-engine tests: tiny quantized models and the layer-by-layer comparison
of the integer engine against the fake-quantized model."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for p in (ROOT, os.path.join(ROOT, "tests", "quant")):
    if p not in sys.path:
        sys.path.insert(0, p)

import quant_tiny_models as tm  # noqa: E402

from fairseq_qasr.integer.engine import QT, _storage  # noqa: E402
from fairseq_qasr.quant import Quantizer, calibrate, quantize_model  # noqa: E402


WHISPER_LAYOUT = dict(encoder_frontend="conv1d_gelu", encoder_pos="sinusoidal", decoder_context="learned_pos",
                      normalize_before=True, attn_key_bias=False, share_decoder_input_output_embed=True,
                      activation_fn="gelu", encoder_final_norm=True, decoder_final_norm=True,
                      decoder_prompt_ids="5,6", decoder_suppress_ids="7", decoder_suppress_at_begin_ids="2,8")


def xs_cfg(**overrides) -> Dict[str, Any]:
    from fairseq_qasr.models.qtransformer_conv import PRESETS, apply_preset
    ns = argparse.Namespace(**overrides)
    apply_preset(ns, PRESETS["qtransformer_conv_xs"])
    return vars(ns)


GROUPED = "w4g16a8"  # w4a8 with Linear weights per group of 16 input features
GROUPED_16BIT = "w4g16a8_r16"  # w4a8_g64 (16-bit residual stream, GELU/fc2 inputs, attention probabilities,
#                                logits) with groups of 16: grouped Linear outputs feed 16-bit grids


def recipe_for(name: str):
    """A recipe name, or ``GROUPED`` / ``GROUPED_16BIT``: per-group Linear weights, 16 input features a group."""
    base = {GROUPED: "w4a8", GROUPED_16BIT: "w4a8_g64"}.get(name)
    if base is None:
        return name
    from fairseq_qasr.quant import load_recipe
    d = load_recipe(base).to_dict()
    d["name"] = name
    d.setdefault("ops", {}).setdefault("linear", {}).setdefault("weight", {}).update(granularity="group", group_size=16)
    return d


def quantized_xs(recipe: str = "w8a8", seed: int = 0, calib_batches: int = 3, **overrides):
    """(fake-quantized calibrated qtransformer_conv_xs, dictionary, model options, example inputs)."""
    recipe = recipe_for(recipe)
    model, d = tm.tiny_qtransformer_conv(seed=seed, **overrides)
    inp = tm.qtc_inputs(d)
    model = quantize_model(model, recipe, example_inputs=inp)
    batches = [tm.qtc_inputs(d, seed=10 + i, frames=40) for i in range(calib_batches)]
    # also run the decoder's output log-softmax (what beam search scores with), as scripts/calibrate.py does
    calibrate(model, [lambda m, b=b: m.decoder.get_normalized_probs(m(**b), log_probs=True) for b in batches])
    return model.eval(), d, xs_cfg(**overrides), inp


def quantized_engine(param: str):
    """``RECIPE`` or ``RECIPE-whisper_layout`` -> (recipe, fake-quantized model, options, inputs, IntegerEngine)."""
    from fairseq_qasr.integer import IntegerEngine
    recipe, _, layout = param.partition("-")
    model, d, cfg, inp = quantized_xs(recipe, **(WHISPER_LAYOUT if layout else {}))
    return recipe, model, cfg, inp, IntegerEngine.from_quantized(model, cfg)


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


def real_features(prepared, split: str = "test-clean", n: int = 4, max_frames: int = 400):
    """Padded fbank features (B, T, 80) and lengths of the first ``n`` utterances of a prepared split
    (cut to ``max_frames`` frames to keep tests light)."""
    from fairseq_qasr.data.audio import read_audio
    from fairseq_qasr.data.features import build_feature_extractor
    from fairseq_qasr.data.manifest import read_manifest

    rows = read_manifest(str(prepared / f"{split}.tsv"))[:n]
    fx = build_feature_extractor({"type": "fbank", "num_mel_bins": 80, "cmvn": "utterance"})
    feats = [fx(read_audio(r.audio))[:max_frames] for r in rows]
    lengths = torch.tensor([f.shape[0] for f in feats])
    out = torch.zeros(len(feats), int(lengths.max()), 80)
    for i, f in enumerate(feats):
        out[i, : f.shape[0]] = f
    return out, lengths


def torch_codes_of_last_requant(engine, qpath: str, logits: torch.Tensor) -> torch.Tensor:
    """Float values ``s * (q - z)`` of the codes the engine produced at quantizer ``qpath`` for ``logits``
    (for comparing integer kernels against float references)."""
    seen = {}

    def hook(path, out, masked):
        if path == qpath:
            seen["qt"] = out

    engine.hook = hook
    try:
        engine.log_probs(logits)
    finally:
        engine.hook = None
    qt = seen["qt"]
    return (qt.c.double() - qt.z) * engine.scales[qpath]
