"""qtransformer_conv: presets, layouts, and incremental decoding equal to the full forward."""
from __future__ import annotations

import argparse

import pytest
import torch
from fairseq.data import Dictionary

import fairseq_qasr  # noqa: F401
from fairseq_qasr.models.qtransformer_conv import PRESETS, QTransformerConvModel, apply_preset

WHISPER_LAYOUT = dict(encoder_frontend="conv1d_gelu", encoder_pos="sinusoidal", decoder_context="learned_pos",
                      normalize_before=True, attn_key_bias=False, share_decoder_input_output_embed=True,
                      activation_fn="gelu", encoder_final_norm=True, decoder_final_norm=True)


class _Task:
    def __init__(self, vocab: int = 40):
        self.target_dictionary = Dictionary()
        for i in range(vocab):
            self.target_dictionary.add_symbol(f"w{i}")


def build(preset: str = "qtransformer_conv_xs", **options) -> QTransformerConvModel:
    cfg = argparse.Namespace(**options)
    cfg.quant_config = options.get("quant_config")
    apply_preset(cfg, PRESETS[preset])
    torch.manual_seed(0)
    return QTransformerConvModel.build_model(cfg, _Task()).eval()


def test_presets_sizes():
    sizes = {name: sum(p.numel() for p in build(name).parameters()) for name in PRESETS}
    assert sizes["qtransformer_conv_xs"] < 1e6 < sizes["qtransformer_conv_s"] < 5e7 < sizes["qtransformer_conv"]


@pytest.mark.parametrize("layout", [{}, WHISPER_LAYOUT, dict(WHISPER_LAYOUT, decoder_prompt_ids="5,6,7")],
                         ids=["conv_context", "whisper_layout", "whisper_prompt"])
def test_incremental_decoding_equals_full_forward(layout):
    model = build(**layout)
    feats, lengths = torch.randn(3, 41, 80), torch.tensor([41, 33, 20])
    enc = model.encoder(feats, lengths)
    out_len = enc["encoder_out"][0].size(1)
    expected = [0, 2, 6] if not layout else [0, 4, 11]  # time subsampling 4 (VGG) / 2 (Whisper conv), ceil
    assert enc["encoder_padding_mask"][0].sum(1).tolist() == expected and out_len == (11 if not layout else 21)
    prev = torch.randint(4, 40, (3, 7))
    prev[:, 0] = model.decoder.dictionary.eos()
    full, _ = model.decoder(prev, enc)
    state: dict = {}
    steps = [model.decoder(prev[:, : t + 1], enc, incremental_state=state)[0] for t in range(prev.size(1))]
    assert full.shape == (3, 7, len(model.decoder.dictionary))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_beam_reorder_follows_new_order():
    model = build()
    enc = model.encoder(torch.randn(2, 30, 80), torch.tensor([30, 30]))
    prev = torch.full((2, 1), model.decoder.dictionary.eos())
    state: dict = {}
    model.decoder(prev, enc, incremental_state=state)
    swapped = {k: v.clone() for k, v in state["qtransformer_conv"].items()}
    model.decoder.reorder_incremental_state_scripting(state, torch.tensor([1, 0]))
    for key, value in state["qtransformer_conv"].items():
        if value.dim() > 0:
            assert torch.equal(value, swapped[key].flip(0)), key


def test_prompt_outside_dictionary_is_rejected():
    with pytest.raises(ValueError, match="decoder_prompt_ids: index 999 is outside the dictionary"):
        build(**dict(WHISPER_LAYOUT, decoder_prompt_ids="5,999"))


def test_no_fused_attention_kernels_are_used():
    """Every op is explicit (matmul, softmax) so the quantization tool can route it."""
    model = build()
    called = []
    real = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda *a, **k: called.append(1) or real(*a, **k)
    try:
        enc = model.encoder(torch.randn(1, 30, 80), torch.tensor([30]))
        model.decoder(torch.tensor([[2, 5, 6]]), enc)
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    assert not called
