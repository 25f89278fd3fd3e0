"""Conversion tests on a small random Whisper (no checkpoint download needed; openai-whisper is the reference)."""
from __future__ import annotations

import dataclasses
import struct

import pytest
import torch

DIMS = dict(n_mels=80, n_vocab=51864, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=2,
            n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=2)


@pytest.fixture(scope="module")
def random_whisper(whisper_pkg, tmp_path_factory):
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(0)
    model = Whisper(ModelDimensions(**DIMS)).eval()
    with torch.no_grad():
        # whisper allocates decoder.positional_embedding with torch.empty: uninitialized memory (NaN at times)
        model.decoder.positional_embedding.normal_(0, 0.02)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.normal_(0, 0.1) if name.endswith("bias") else p.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("rand") / "rand.pt"
    torch.save({"dims": dataclasses.asdict(model.dims), "model_state_dict": model.state_dict()}, path)
    return model, path


def _write_ct2(path, sd, dims):
    """Serialize an OpenAI-style state dict the way CTranslate2's WhisperSpec stores it (fp32)."""
    v = {}

    def ln(src, dst):
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def lin(src, dst):
        v[f"{dst}/weight"], v[f"{dst}/bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def fused(src, dst, parts):
        v[f"{dst}/weight"] = torch.cat([sd[f"{src}.{p}.weight"] for p in parts])
        v[f"{dst}/bias"] = torch.cat([sd[f"{src}.{p}.bias"] if p != "key" else torch.zeros_like(sd[f"{src}.query.bias"])
                                      for p in parts])

    for which, n in (("encoder", dims["n_audio_layer"]), ("decoder", dims["n_text_layer"])):
        for i in range(n):
            s, o = f"{which}.blocks.{i}", f"{which}/layer_{i}"
            ln(f"{s}.attn_ln", f"{o}/self_attention/layer_norm")
            fused(f"{s}.attn", f"{o}/self_attention/linear_0", ["query", "key", "value"])
            lin(f"{s}.attn.out", f"{o}/self_attention/linear_1")
            if which == "decoder":
                ln(f"{s}.cross_attn_ln", f"{o}/attention/layer_norm")
                lin(f"{s}.cross_attn.query", f"{o}/attention/linear_0")
                fused(f"{s}.cross_attn", f"{o}/attention/linear_1", ["key", "value"])
                lin(f"{s}.cross_attn.out", f"{o}/attention/linear_2")
            ln(f"{s}.mlp_ln", f"{o}/ffn/layer_norm")
            lin(f"{s}.mlp.0", f"{o}/ffn/linear_0")
            lin(f"{s}.mlp.2", f"{o}/ffn/linear_1")
    lin("encoder.conv1", "encoder/conv1")
    lin("encoder.conv2", "encoder/conv2")
    v["encoder/position_encodings/encodings"] = sd["encoder.positional_embedding"]
    ln("encoder.ln_post", "encoder/layer_norm")
    v["decoder/embeddings/weight"] = sd["decoder.token_embedding.weight"]
    v["decoder/position_encodings/encodings"] = sd["decoder.positional_embedding"]
    ln("decoder.ln", "decoder/layer_norm")
    scalars = {"encoder/num_heads": dims["n_audio_head"], "decoder/num_heads": dims["n_text_head"]}

    def s(f, text):
        f.write(struct.pack("<H", len(text) + 1) + text.encode() + b"\0")

    with open(path, "wb") as f:
        f.write(struct.pack("<I", 6))
        s(f, "WhisperSpec")
        f.write(struct.pack("<I", 3))
        f.write(struct.pack("<I", len(v) + len(scalars)))
        for name, t in sorted(v.items()):
            t = t.float().contiguous()
            s(f, name)
            f.write(struct.pack("<B", t.dim()) + b"".join(struct.pack("<I", d) for d in t.shape))
            data = t.numpy().tobytes()
            f.write(struct.pack("<BI", 0, len(data)) + data)
        for name, val in scalars.items():
            s(f, name)
            f.write(struct.pack("<BBI", 0, 2, 2) + struct.pack("<h", val))
        f.write(struct.pack("<I", 1))
        s(f, "decoder/projection/weight")
        s(f, "decoder/embeddings/weight")


def test_ctranslate2_reader_round_trip(random_whisper, tmp_path):
    from fairseq_qasr.whisper.convert import is_ctranslate2, load_ctranslate2

    model, pt = random_whisper
    sd = model.state_dict()
    _write_ct2(tmp_path / "model.bin", sd, DIMS)
    assert is_ctranslate2(tmp_path / "model.bin") and not is_ctranslate2(pt)
    dims, got = load_ctranslate2(tmp_path / "model.bin")
    assert dims == DIMS
    assert set(got) == set(sd)
    for k in sd:
        assert torch.equal(got[k], sd[k].float()), k
    # a truncated file is an error, not a silently shorter model
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-100])
    with pytest.raises(Exception):
        load_ctranslate2(tmp_path / "cut.bin")


@pytest.mark.parametrize("fmt", ["openai", "ctranslate2"])
def test_import_matches_openai_whisper(random_whisper, tmp_path, fmt):
    from fairseq import checkpoint_utils

    from fairseq_qasr.whisper.importer import import_whisper
    from fairseq_qasr.whisper.tokenizer import WhisperVocab, get_tokenizer

    model, pt = random_whisper
    src = pt
    if fmt == "ctranslate2":
        src = tmp_path / "model.bin"
        _write_ct2(src, model.state_dict(), DIMS)
    out = tmp_path / "out"
    import_whisper(str(src), str(out), log=lambda m: None)
    ours = checkpoint_utils.load_model_ensemble_and_task([str(out / "checkpoint.pt")],
                                                         arg_overrides={"data": str(out)})[0][0].eval()
    tok = get_tokenizer(False)
    vocab = WhisperVocab.from_tokenizer(tok)
    assert ours.decoder.prompt.tolist() == [vocab.to_fairseq(tok.sot), vocab.to_fairseq(tok.no_timestamps)]
    torch.manual_seed(1)
    mel = torch.randn(2, 80, 3000)
    tokens = [tok.sot, tok.no_timestamps] + tok.encode(" hello world, this is a test")
    with torch.no_grad():
        e_ref = model.encoder(mel)
        e = ours.encoder(mel.transpose(1, 2), torch.tensor([3000, 3000]))["encoder_out"][0]
        assert (e - e_ref).abs().max().item() <= 1e-4
        logits_ref = model.decoder(torch.tensor([tokens] * 2), e_ref)[:, 1:]
        prev = torch.tensor([[vocab.EOS] + [vocab.to_fairseq(t) for t in tokens[2:]]] * 2)
        raw = ours.decoder.output_layer(ours.decoder.extract_features(prev, {"encoder_out": [e_ref],
                                                                             "encoder_padding_mask": [None]})[0])
    ids = vocab.whisper_ids()
    keep = ids >= 0
    assert (raw[..., keep] - logits_ref[..., ids[keep]]).abs().max().item() <= 1e-4
