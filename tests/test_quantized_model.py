"""Quantized qtransformer_conv specifics: suppressed logits, float -> quantized loading."""
from __future__ import annotations

import argparse

import torch

import fairseq_qasr  # noqa: F401
from fairseq_qasr.models.qtransformer_conv import SUPPRESSED_LOGPROB
from fairseq_qasr.models.quantized import forward_and_normalize
from fairseq_qasr.quant import calibrate
from test_model import WHISPER_LAYOUT, build


def test_suppressed_logits_do_not_stretch_the_quantized_log_softmax():
    """Whisper-style suppression (-inf logits) must not enter the 8-bit range of the output log-softmax: a range
    stretched to -1e4 collapses every real logit onto one or two grid points (measured: 97 % WER)."""
    layout = dict(WHISPER_LAYOUT, decoder_suppress_ids="1,3,7,9")
    fp = build(**layout)
    q = build(**layout, quant_config="w8a8")
    q.load_state_dict(fp.state_dict())
    batch = {"src_tokens": torch.randn(2, 60, 80), "src_lengths": torch.tensor([60, 50]),
             "prev_output_tokens": torch.tensor([[2, 5, 6], [2, 8, 10]])}
    calibrate(q, [lambda m: forward_and_normalize(m, batch)])
    in_q = q.decoder.output_log_softmax.in_q[0]
    assert float(in_q.lo) > -100, f"log-softmax input range stretched to {float(in_q.lo)}"
    with torch.no_grad():
        lp_q, lp_f = forward_and_normalize(q, batch), forward_and_normalize(fp, batch)
    for lp in (lp_q, lp_f):
        assert torch.all(lp[..., [1, 3, 7, 9]] == SUPPRESSED_LOGPROB)  # finite: label smoothing stays finite
        live = lp[..., [i for i in range(lp.size(-1)) if i not in (1, 3, 7, 9)]]
        torch.testing.assert_close(live.exp().sum(-1), torch.ones(2, 3), atol=2e-2, rtol=0)
    assert (lp_q.argmax(-1) == lp_f.argmax(-1)).float().mean() >= 0.5


def test_float_checkpoint_initializes_quantized_model_but_not_other_shapes():
    fp = build()
    q = build(quant_config="w4a8")
    q.load_state_dict(fp.state_dict())
    assert torch.equal(q.encoder.layers[0].ffn.fc1.weight, fp.encoder.layers[0].ffn.fc1.weight)
    other = build(encoder_embed_dim=32, decoder_embed_dim=32, decoder_conv_channels=32, quant_config="w4a8")
    try:
        other.load_state_dict(fp.state_dict())
    except RuntimeError as e:
        assert "size mismatch" in str(e) or "does not fit" in str(e)
    else:
        raise AssertionError("a float checkpoint of another shape loaded")
