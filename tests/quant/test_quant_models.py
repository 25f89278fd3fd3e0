"""The three customer models: quantize_model + audit at w8a8, exact when disabled, close to float,
and wrapper names stable between a full-sequence forward and incremental decoding."""

import pytest
import torch

from fairseq_qasr.quant import (UnsupportedOpError, calibrate, freeze_wrappers, materialize_wrappers,
                                quant_checkpoint_state, quantize_model, set_quantization)
from fairseq_qasr.quant.audit import audit

import quant_tiny_models as tm

SQNR_FLOOR_DB = 20.0


def sqnr(ref, y):
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - y).pow(2).sum()))


def fairseq_unfuse(model):
    """fairseq's MultiheadAttention takes a fused F.multi_head_attention_forward path (raw weights,
    unauditable) unless its embed-dim check is skipped; this switch only selects the unfused path."""
    for m in model.modules():
        if hasattr(m, "_set_skip_embed_dim_check"):
            m._set_skip_embed_dim_check()


def check_model(model, run, calib_runs, eval_run, out):
    with torch.no_grad():
        ref = out(run(model, eval_run))
    quantize_model(model, "w8a8", example_inputs=lambda m: run(m, calib_runs[0]))
    set_quantization(model, False)
    with torch.no_grad():
        assert torch.equal(out(run(model, eval_run)), ref), "quantization off must reproduce the float model"
    calibrate(model, [lambda m, b=b: run(m, b) for b in calib_runs])
    with torch.no_grad():
        y = out(run(model, eval_run))
    assert sqnr(ref, y) > SQNR_FLOOR_DB, sqnr(ref, y)
    report = audit(model, [lambda m: run(m, eval_run)])
    assert report.ok, report.table()
    print(report.table())
    return report


def kwargs_run(m, b):
    return m(**b)


def test_s2t_transformer_fused_attention_is_refused():
    model, d = tm.tiny_s2t_transformer()
    with pytest.raises(UnsupportedOpError, match="multi_head_attention_forward.*encoder"):
        quantize_model(model, "w8a8", example_inputs=tm.s2t_inputs(d))


def s2t_run(m, b):
    """The forward, then the log-softmax beam search scores with (fairseq's get_normalized_probs)."""
    return m.get_normalized_probs(m(**b), log_probs=True)


def test_s2t_transformer():
    model, d = tm.tiny_s2t_transformer()
    fairseq_unfuse(model)
    calib = [tm.s2t_inputs(d, seed=s) for s in (1, 2)]
    inp = tm.s2t_inputs(d, seed=3)
    with torch.no_grad():
        ref, ref_eval = s2t_run(model, calib[1]), model(**inp)[0]
    quantize_model(model, "w8a8", example_inputs=lambda m: s2t_run(m, calib[0]),
                   methods=["decoder.get_normalized_probs"])
    assert "decoder.qasr_get_normalized_probs.log_softmax_0" in dict(model.named_modules())
    set_quantization(model, False)
    with torch.no_grad():
        assert torch.equal(s2t_run(model, calib[1]), ref), "quantization off must reproduce the float model"
    calibrate(model, [lambda m, b=b: s2t_run(m, b) for b in calib])
    with torch.no_grad():
        assert sqnr(ref_eval, model(**inp)[0]) > SQNR_FLOOR_DB
    report = audit(model, [lambda m: s2t_run(m, inp)])
    assert report.ok, report.table()
    check_fairseq_incremental(model, inp)
    check_search_calls(model, inp)
    # rebuilt from a checkpoint's parts: quant_checkpoint_state carries the routed methods
    quant = quant_checkpoint_state(model)
    assert quant["methods"] == ["decoder.get_normalized_probs"]
    again, _ = tm.tiny_s2t_transformer(seed=5)
    fairseq_unfuse(again)
    quantize_model(again, quant["recipe"], methods=quant["methods"])
    assert "decoder.qasr_get_normalized_probs.log_softmax_0" in materialize_wrappers(again, model.state_dict())
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(s2t_run(again, inp), s2t_run(model, inp))


def test_s2t_transformer_methods_must_name_methods():
    model, d = tm.tiny_s2t_transformer()
    with pytest.raises(ValueError, match="no module 'decodr'"):
        quantize_model(model, "w8a8", methods=["decodr.get_normalized_probs"])
    with pytest.raises(ValueError, match="'decoder.embed_tokens' is not a method"):
        quantize_model(model, "w8a8", methods=["decoder.embed_tokens"])


def check_search_calls(model, inp):
    """fairseq's search calls ``encoder.forward_torchscript``, ``decoder.forward`` and ``get_normalized_probs``
    directly (no hooks of those modules run). s2t_transformer's encoder scales and adds positions in its own forward,
    its decoder adds token and position embeddings, its get_normalized_probs computes a log-softmax: those ops must run
    quantized there too, with the results of ``module(...)`` calls."""
    from fairseq_qasr.audit import search_steps

    report = audit(model, search_steps([inp]))
    assert report.ok, report.table()
    with torch.no_grad():
        enc = model.encoder.forward_torchscript(inp)
        ref = model.encoder(inp["src_tokens"], inp["src_lengths"])
        assert torch.equal(enc["encoder_out"][0], ref["encoder_out"][0])
        prev = inp["prev_output_tokens"]
        assert torch.equal(model.decoder.forward(prev, encoder_out=enc)[0], model.decoder(prev, encoder_out=ref)[0])


def check_fairseq_incremental(model, inp):
    freeze_wrappers(model)  # a call site not created by the full-sequence forward would raise
    with torch.no_grad():
        full = model(**inp)[0]
        enc = model.encoder(inp["src_tokens"], inp["src_lengths"])
        state = {}
        prev = inp["prev_output_tokens"]
        steps = [model.decoder(prev[:, : i + 1], encoder_out=enc, incremental_state=state)[0]
                 for i in range(prev.shape[1])]
    inc = torch.cat(steps, dim=1)
    assert torch.allclose(inc, full, atol=1e-4 * float(full.abs().max())), (inc - full).abs().max()


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_whisper(use_sdpa, monkeypatch):
    from whisper.model import MultiHeadAttention

    monkeypatch.setattr(MultiHeadAttention, "use_sdpa", use_sdpa)
    model = tm.tiny_whisper()
    calib = [tm.whisper_inputs(seed=s) for s in (1, 2)]
    run = lambda m, b: m(*b)  # noqa: E731
    if use_sdpa:  # the fused kernel and its quantized decomposition agree only to rounding
        with torch.no_grad():
            ref = model(*calib[0])
        quantize_model(model, "w8a8", example_inputs=calib[0])
        set_quantization(model, False)
        with torch.no_grad():
            assert torch.allclose(model(*calib[0]), ref, atol=1e-5)
        calibrate(model, calib)
        assert audit(model, [calib[1]]).ok
    else:
        check_model(model, run, calib, tm.whisper_inputs(seed=3), lambda o: o)
    mel, tokens = tm.whisper_inputs(seed=3)
    freeze_wrappers(model)
    with torch.no_grad():
        full = model(mel, tokens)
        feats = model.embed_audio(mel)
        cache, hooks = model.install_kv_cache_hooks()
        steps = [model.decoder(tokens[:, i: i + 1], feats, kv_cache=cache) for i in range(tokens.shape[1])]
        for h in hooks:
            h.remove()
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4 * float(full.abs().max()))


def test_qtransformer_conv_xs():
    model, d = tm.tiny_qtransformer_conv()
    calib = [tm.qtc_inputs(d, seed=s) for s in (1, 2)]
    check_model(model, kwargs_run, calib, tm.qtc_inputs(d, seed=3), lambda o: o[0])
    check_fairseq_incremental(model, tm.qtc_inputs(d, seed=3))
