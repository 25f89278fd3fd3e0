"""Whisper checkpoint -> ``qtransformer_conv`` (fairseq) state dict and model options.

Input: an OpenAI checkpoint (``{"dims": ..., "model_state_dict": ...}``, loaded with
``weights_only=True``) or, via :func:`load_ctranslate2`, a CTranslate2 / faster-whisper ``model.bin``.

Layout of the result (options of the one ``qtransformer_conv`` class): ``encoder_frontend=conv1d_gelu``
(conv k3 s1 + GELU, conv k3 s2 + GELU), ``encoder_pos=sinusoidal`` (Whisper's buffer copied),
``decoder_context=learned_pos``, pre-LN blocks with final norms, no key bias, GELU FFN, output projection
tied to the token embedding, ``decoder_prompt_ids`` = ``<|startoftranscript|>`` (+ language/task for
multilingual models) + ``<|notimestamps|>``; ``decoder_suppress_ids`` = pad/unk plus the tokens
openai-whisper's ``DecodingTask`` suppresses (``suppress_tokens="-1"``: non-speech symbols, task/
special tokens), ``decoder_suppress_at_begin_ids`` = its ``SuppressBlank`` (" " and end-of-text).
The token embedding rows are permuted into fairseq index order (see ``tokenizer.WhisperVocab``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .tokenizer import WhisperVocab, get_tokenizer

DIM_KEYS = ("n_mels", "n_vocab", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer",
            "n_text_ctx", "n_text_state", "n_text_head", "n_text_layer")


def load_openai_checkpoint(path) -> Tuple[Dict[str, int], Dict[str, Tensor]]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise ValueError(f"{path}: not an OpenAI Whisper checkpoint (expected keys 'dims' and 'model_state_dict')")
    dims = {k: int(ckpt["dims"][k]) for k in DIM_KEYS}
    return dims, {k: v.float() for k, v in ckpt["model_state_dict"].items()}


def is_multilingual(dims: Dict[str, int]) -> bool:
    return dims["n_vocab"] >= 51865


def num_languages(dims: Dict[str, int]) -> int:
    return dims["n_vocab"] - 51765 - int(is_multilingual(dims))


def tokenizer_for(dims: Dict[str, int], language: Optional[str] = None, task: str = "transcribe"):
    if is_multilingual(dims):
        return get_tokenizer(True, num_languages(dims), language or "en", task)
    return get_tokenizer(False)


def prompt_whisper_ids(tok, without_timestamps: bool = True) -> List[int]:
    """openai-whisper's initial tokens: sot_sequence (+ <|notimestamps|>)."""
    ids = list(tok.sot_sequence)
    if without_timestamps:
        ids.append(tok.no_timestamps)
    return ids


def suppress_whisper_ids(tok) -> List[int]:
    """openai-whisper DecodingTask._get_suppress_tokens() for the default ``suppress_tokens="-1"``."""
    ids = set(tok.non_speech_tokens)
    ids.update([tok.transcribe, tok.translate, tok.sot, tok.sot_prev, tok.sot_lm])
    if tok.no_speech is not None:
        ids.add(tok.no_speech)
    return sorted(ids)


def suppress_blank_whisper_ids(tok) -> List[int]:
    """openai-whisper SuppressBlank: suppressed at the first sampled position."""
    return sorted(set(tok.encode(" ") + [tok.eot]))


def model_options(dims: Dict[str, int], tok, vocab: WhisperVocab, without_timestamps: bool = True) -> Dict[str, Any]:
    """qtransformer_conv config fields for a Whisper model of these dimensions."""
    if dims["n_audio_state"] % dims["n_audio_head"] or dims["n_text_state"] != dims["n_audio_state"]:
        raise ValueError(f"unsupported Whisper dimensions {dims}")
    join = lambda ids: ",".join(str(vocab.to_fairseq(i)) for i in ids)  # noqa: E731
    suppress = sorted({vocab.PAD, vocab.UNK} | {vocab.to_fairseq(i) for i in suppress_whisper_ids(tok)})
    return dict(
        input_feat_per_channel=dims["n_mels"],
        encoder_frontend="conv1d_gelu",
        encoder_pos="sinusoidal",
        encoder_embed_dim=dims["n_audio_state"],
        encoder_ffn_embed_dim=4 * dims["n_audio_state"],
        encoder_layers=dims["n_audio_layer"],
        encoder_attention_heads=dims["n_audio_head"],
        decoder_context="learned_pos",
        decoder_embed_dim=dims["n_text_state"],
        decoder_ffn_embed_dim=4 * dims["n_text_state"],
        decoder_layers=dims["n_text_layer"],
        decoder_attention_heads=dims["n_text_head"],
        activation_fn="gelu",
        normalize_before=True,
        attn_key_bias=False,
        share_decoder_input_output_embed=True,
        encoder_final_norm=True,
        decoder_final_norm=True,
        layernorm_eps=1e-5,
        dropout=0.0,
        attention_dropout=0.0,
        # the input is always a 30-s window of 2 * n_audio_ctx frames; the position buffer covers the frames
        max_source_positions=2 * dims["n_audio_ctx"],
        max_target_positions=dims["n_text_ctx"],
        decoder_prompt_ids=join(prompt_whisper_ids(tok, without_timestamps)),
        decoder_suppress_ids=",".join(map(str, suppress)),
        decoder_suppress_at_begin_ids=join(suppress_blank_whisper_ids(tok)),
    )


def _attn(src: Dict[str, Tensor], s: str, dst: Dict[str, Tensor], d: str) -> None:
    for a, b in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "out_proj")):
        dst[f"{d}.{b}.weight"] = src[f"{s}.{a}.weight"]
        if f"{s}.{a}.bias" in src:
            dst[f"{d}.{b}.bias"] = src[f"{s}.{a}.bias"]


def _norm(src, s, dst, d):
    dst[f"{d}.weight"], dst[f"{d}.bias"] = src[f"{s}.weight"], src[f"{s}.bias"]


def _mlp(src, s, dst, d):
    dst[f"{d}.fc1.weight"], dst[f"{d}.fc1.bias"] = src[f"{s}.0.weight"], src[f"{s}.0.bias"]
    dst[f"{d}.fc2.weight"], dst[f"{d}.fc2.bias"] = src[f"{s}.2.weight"], src[f"{s}.2.bias"]


def convert_state_dict(sd: Dict[str, Tensor], dims: Dict[str, int], vocab: WhisperVocab) -> Dict[str, Tensor]:
    """OpenAI Whisper state dict -> qtransformer_conv state dict (fp32)."""
    out: Dict[str, Tensor] = {}
    out["encoder.frontend.conv1.weight"], out["encoder.frontend.conv1.bias"] = sd["encoder.conv1.weight"], sd["encoder.conv1.bias"]
    out["encoder.frontend.conv2.weight"], out["encoder.frontend.conv2.bias"] = sd["encoder.conv2.weight"], sd["encoder.conv2.bias"]
    pos = sd["encoder.positional_embedding"]
    from fairseq_qasr.models.layers import sinusoids  # same formula; rows beyond n_audio_ctx are never reached

    full = sinusoids(2 * dims["n_audio_ctx"], dims["n_audio_state"])
    full[: pos.size(0)] = pos
    out["encoder.embed_positions"] = full
    for i in range(dims["n_audio_layer"]):
        s, d = f"encoder.blocks.{i}", f"encoder.layers.{i}"
        _attn(sd, f"{s}.attn", out, f"{d}.self_attn")
        _norm(sd, f"{s}.attn_ln", out, f"{d}.attn_block.norm")
        _mlp(sd, f"{s}.mlp", out, f"{d}.ffn")
        _norm(sd, f"{s}.mlp_ln", out, f"{d}.ffn_block.norm")
    _norm(sd, "encoder.ln_post", out, "encoder.final_norm")

    emb = sd["decoder.token_embedding.weight"]
    if emb.size(0) != vocab.n_vocab:
        raise ValueError(f"token embedding has {emb.size(0)} rows, the tokenizer {vocab.n_vocab} tokens")
    ids = vocab.whisper_ids()
    new = emb[ids.clamp(min=0)].clone()
    new[ids < 0] = 0.0  # <pad>, <unk>: no Whisper token; their logits are suppressed
    out["decoder.embed_tokens.weight"] = new
    out["decoder.output_projection.weight"] = new  # tied
    out["decoder.embed_positions.weight"] = sd["decoder.positional_embedding"]
    for i in range(dims["n_text_layer"]):
        s, d = f"decoder.blocks.{i}", f"decoder.layers.{i}"
        _attn(sd, f"{s}.attn", out, f"{d}.self_attn")
        _norm(sd, f"{s}.attn_ln", out, f"{d}.self_attn_block.norm")
        _attn(sd, f"{s}.cross_attn", out, f"{d}.cross_attn")
        _norm(sd, f"{s}.cross_attn_ln", out, f"{d}.cross_attn_block.norm")
        _mlp(sd, f"{s}.mlp", out, f"{d}.ffn")
        _norm(sd, f"{s}.mlp_ln", out, f"{d}.ffn_block.norm")
    _norm(sd, "decoder.ln", out, "decoder.final_norm")
    return {k: v.float().contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------
# CTranslate2 / faster-whisper model.bin
# ---------------------------------------------------------------------------------------------------
# Binary layout (ctranslate2/specs/model_spec.py, ModelSpec._serialize, binary version 6): uint32 version,
# string spec name, uint32 spec revision, uint32 n_variables, then per variable: string name, uint8 rank,
# uint32 dims[rank], uint8 dtype, uint32 n_bytes, raw data; then uint32 n_aliases and (alias, target)
# string pairs. Strings: uint16 length (incl. NUL) + UTF-8 bytes + NUL. Little-endian.
_CT2_DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16, 5: torch.bfloat16}


def is_ctranslate2(path) -> bool:
    import struct

    with open(path, "rb") as f:
        head = f.read(4 + 2 + 12)
    if len(head) < 18:
        return False
    version, n = struct.unpack("<IH", head[:6])
    return 1 <= version <= 6 and head[6:6 + min(n - 1, 11)] == b"WhisperSpec"[: max(0, n - 1)]


def read_ctranslate2(path) -> Tuple[str, Dict[str, Tensor]]:
    """Variables of a CTranslate2 model.bin: (spec name, {name: tensor}); aliases resolved."""
    import struct

    import numpy as np

    with open(path, "rb") as f:
        data = f.read()
    pos = 0

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return vals if len(vals) > 1 else vals[0]

    def string():
        nonlocal pos
        n = take("H")
        s = data[pos:pos + n - 1].decode("utf-8")
        pos += n
        return s

    version = take("I")
    if version != 6:
        raise ValueError(f"{path}: CTranslate2 binary version {version} not supported (expected 6)")
    spec = string()
    take("I")  # spec revision
    out: Dict[str, Tensor] = {}
    for _ in range(take("I")):
        name = string()
        rank = take("B")
        dims = [take("I") for _ in range(rank)]
        dtype, nbytes = take("B"), take("I")
        if dtype not in _CT2_DTYPES:
            raise ValueError(f"{path}: variable {name} has unknown dtype id {dtype}")
        buf = np.frombuffer(data, dtype=np.uint8, count=nbytes, offset=pos).copy()
        pos += nbytes
        t = torch.from_numpy(buf).view(_CT2_DTYPES[dtype]).reshape(dims)
        out[name] = t
    for _ in range(take("I")):
        alias, target = string(), string()
        out[alias] = out[target]
    if pos != len(data):
        raise ValueError(f"{path}: {len(data) - pos} trailing bytes (truncated or corrupt file?)")
    return spec, out


def load_ctranslate2(path) -> Tuple[Dict[str, int], Dict[str, Tensor]]:
    """CTranslate2 ``WhisperSpec`` model.bin -> (OpenAI dims, OpenAI-style state dict, fp32).

    Fused projections are split (self-attention qkv, cross-attention kv); the key bias CTranslate2
    stores as zeros is dropped (checked). int8-quantized models (``*_scale`` variables) are rejected.
    """
    spec, v = read_ctranslate2(path)
    if spec != "WhisperSpec":
        raise ValueError(f"{path}: CTranslate2 spec {spec!r}, expected WhisperSpec")
    if any(k.endswith("weight_scale") for k in v):
        raise ValueError(f"{path}: int8-quantized CTranslate2 model; convert with --quantization float16/float32")
    f = {k: t.float() for k, t in v.items() if t.dtype in (torch.float16, torch.float32, torch.bfloat16)}
    import re

    def n_layers(which):
        return 1 + max(int(m.group(1)) for k in f for m in [re.match(rf"{which}/layer_(\d+)/", k)] if m)

    n_enc, n_dec = n_layers("encoder"), n_layers("decoder")
    d = f["encoder/conv1/weight"].shape[0]
    dims = dict(n_mels=f["encoder/conv1/weight"].shape[1], n_vocab=f["decoder/embeddings/weight"].shape[0],
                n_audio_ctx=f["encoder/position_encodings/encodings"].shape[0], n_audio_state=d,
                n_audio_head=int(v["encoder/num_heads"]), n_audio_layer=n_enc,
                n_text_ctx=f["decoder/position_encodings/encodings"].shape[0],
                n_text_state=f["decoder/embeddings/weight"].shape[1], n_text_head=int(v["decoder/num_heads"]),
                n_text_layer=n_dec)
    sd: Dict[str, Tensor] = {}

    def ln(src, dst):
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = f[f"{src}/gamma"], f[f"{src}/beta"]

    def lin(src, dst, bias=True):
        sd[f"{dst}.weight"] = f[f"{src}/weight"]
        if bias:
            sd[f"{dst}.bias"] = f[f"{src}/bias"]

    def split_qkv(src, dst, parts):
        w, b = f[f"{src}/weight"], f[f"{src}/bias"]
        n = w.shape[0] // len(parts)
        for i, p in enumerate(parts):
            sd[f"{dst}.{p}.weight"] = w[i * n:(i + 1) * n]
            bias = b[i * n:(i + 1) * n]
            if p == "key":
                if bias.abs().max() > 0:
                    raise ValueError(f"{path}: {src} has a non-zero key bias; Whisper has none")
            else:
                sd[f"{dst}.{p}.bias"] = bias

    for which, n in (("encoder", n_enc), ("decoder", n_dec)):
        for i in range(n):
            s, o = f"{which}/layer_{i}", f"{which}.blocks.{i}"
            ln(f"{s}/self_attention/layer_norm", f"{o}.attn_ln")
            split_qkv(f"{s}/self_attention/linear_0", f"{o}.attn", ["query", "key", "value"])
            lin(f"{s}/self_attention/linear_1", f"{o}.attn.out")
            if which == "decoder":
                ln(f"{s}/attention/layer_norm", f"{o}.cross_attn_ln")
                lin(f"{s}/attention/linear_0", f"{o}.cross_attn.query")
                split_qkv(f"{s}/attention/linear_1", f"{o}.cross_attn", ["key", "value"])
                lin(f"{s}/attention/linear_2", f"{o}.cross_attn.out")
            ln(f"{s}/ffn/layer_norm", f"{o}.mlp_ln")
            lin(f"{s}/ffn/linear_0", f"{o}.mlp.0")
            lin(f"{s}/ffn/linear_1", f"{o}.mlp.2")
    lin("encoder/conv1", "encoder.conv1")
    lin("encoder/conv2", "encoder.conv2")
    sd["encoder.positional_embedding"] = f["encoder/position_encodings/encodings"]
    ln("encoder/layer_norm", "encoder.ln_post")
    sd["decoder.token_embedding.weight"] = f["decoder/embeddings/weight"]
    sd["decoder.positional_embedding"] = f["decoder/position_encodings/encodings"]
    ln("decoder/layer_norm", "decoder.ln")
    if "decoder/projection/weight" in f and not torch.equal(f["decoder/projection/weight"], f["decoder/embeddings/weight"]):
        raise ValueError(f"{path}: output projection is not tied to the token embedding")
    return dims, sd


def load_whisper_checkpoint(path) -> Tuple[Dict[str, int], Dict[str, Tensor]]:
    """OpenAI ``.pt`` or CTranslate2 ``model.bin`` -> (dims, OpenAI-style fp32 state dict)."""
    return load_ctranslate2(path) if is_ctranslate2(path) else load_openai_checkpoint(path)
