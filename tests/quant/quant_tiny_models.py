"""Tiny random instances of the customer models (no checkpoints)."""
from __future__ import annotations

import argparse
import types

import torch


def tiny_s2t_transformer(seed: int = 0):
    """fairseq's own s2t_transformer with small dims and a 20-symbol dictionary."""
    from fairseq.data import Dictionary
    from fairseq.models.speech_to_text.s2t_transformer import S2TTransformerModel

    torch.manual_seed(seed)
    d = Dictionary()
    for i in range(16):
        d.add_symbol(f"w{i}")
    args = argparse.Namespace(
        input_feat_per_channel=20, input_channels=1, conv_kernel_sizes="5,5", conv_channels=16,
        encoder_embed_dim=16, encoder_ffn_embed_dim=32, encoder_layers=2, encoder_attention_heads=2,
        decoder_embed_dim=16, decoder_ffn_embed_dim=32, decoder_layers=2, decoder_attention_heads=2,
        dropout=0.0, max_source_positions=256, max_target_positions=64,
        share_decoder_input_output_embed=True)
    task = types.SimpleNamespace(target_dictionary=d, source_dictionary=None)
    model = S2TTransformerModel.build_model(args, task).eval()
    return model, d


def s2t_inputs(d, seed: int = 1, bsz: int = 2, frames: int = 24, tgt: int = 5):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(bsz, frames, 20, generator=g)
    lengths = torch.tensor([frames, frames - 4][:bsz])
    prev = torch.randint(4, len(d), (bsz, tgt), generator=g)
    prev[:, 0] = d.eos()
    return {"src_tokens": feats, "src_lengths": lengths, "prev_output_tokens": prev}


def tiny_whisper(seed: int = 0):
    """openai-whisper's Whisper with tiny random dimensions."""
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(seed)
    dims = ModelDimensions(n_mels=16, n_audio_ctx=12, n_audio_state=16, n_audio_head=2, n_audio_layer=2,
                           n_vocab=40, n_text_ctx=16, n_text_state=16, n_text_head=2, n_text_layer=2)
    model = Whisper(dims).eval()
    with torch.no_grad():  # whisper allocates it with torch.empty (a checkpoint fills it): initialise
        model.decoder.positional_embedding.normal_(0.0, 0.02)
    return model


def whisper_inputs(seed: int = 1, bsz: int = 2, tgt: int = 5):
    g = torch.Generator().manual_seed(seed)
    mel = torch.randn(bsz, 16, 24, generator=g)
    tokens = torch.randint(0, 40, (bsz, tgt), generator=g)
    return (mel, tokens)


def tiny_qtransformer_conv(seed: int = 0, **overrides):
    """The plugin's own qtransformer_conv at the ``qtransformer_conv_xs`` preset."""
    from fairseq.data import Dictionary
    from fairseq_qasr.models.qtransformer_conv import (PRESETS, QTransformerConvDecoder, QTransformerConvEncoder,
                                                       QTransformerConvModel, apply_preset)

    torch.manual_seed(seed)
    d = Dictionary()
    for i in range(16):
        d.add_symbol(f"w{i}")
    cfg = argparse.Namespace(**overrides)
    apply_preset(cfg, PRESETS["qtransformer_conv_xs"])
    model = QTransformerConvModel(QTransformerConvEncoder(cfg), QTransformerConvDecoder(cfg, d)).eval()
    return model, d


def qtc_inputs(d, seed: int = 1, bsz: int = 2, frames: int = 32, tgt: int = 5, feat: int = 80):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(bsz, frames, feat, generator=g)
    lengths = torch.tensor([frames, frames - 8][:bsz])
    prev = torch.randint(4, len(d), (bsz, tgt), generator=g)
    prev[:, 0] = d.eos()
    return {"src_tokens": feats, "src_lengths": lengths, "prev_output_tokens": prev}
