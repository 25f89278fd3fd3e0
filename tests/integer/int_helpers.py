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

from fairseq_qasr.integer.engine import QT, _storage  # noqa: E402,F401
from fairseq_qasr.integer.equivalence import fake_codes, forced_run, to_engine_layout  # noqa: E402,F401
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
