"""``qtransformer_conv``: the conv-context speech transformer (Mohamed et al. 2019, arXiv:1904.11660).

Encoder: 2-D VGG blocks (time subsampling 4) then a transformer encoder without positional embeddings.
Decoder: context over previous tokens from 1-D causal convolutions, then transformer decoder layers.
Layout options make the same class host other layouts (Whisper: conv1d+GELU front-end, sinusoidal encoder
positions, learned decoder positions, pre-LN, key projection without bias, tied output projection).

Presets: ``qtransformer_conv`` (paper size), ``qtransformer_conv_s`` (single-GPU experiments),
``qtransformer_conv_xs`` (tests and demos).
"""

import contextlib
import logging
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict
from torch import Tensor, nn

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import (
    FairseqEncoder,
    FairseqEncoderDecoderModel,
    FairseqIncrementalDecoder,
    register_model,
    register_model_architecture,
)

from .quantized import _is_quant_key, is_quantized, quantize_fairseq_model, split_float_state
from .layers import (
    CausalConvContext,
    Conv1dGeluFrontEnd,
    DecoderLayer,
    EncoderLayer,
    VGGFrontEnd,
    sinusoids,
)

logger = logging.getLogger(__name__)

CACHE = "qtransformer_conv"  # key of this model's entry in fairseq's incremental_state
# decoder_suppress_*: suppressed logits are -inf, so the (quantized) log-softmax normalizes over the live tokens
# only and its input range is not stretched by them; its outputs there become this finite value, so losses that
# sum over all tokens (label smoothing) stay finite (exp() of it is exactly 0 in fp32/fp16)
SUPPRESSED_LOGPROB = -1e4


@dataclass
class QTransformerConvConfig(FairseqDataclass):
    """Unset fields (None) are filled from the chosen preset (``--arch`` / ``model._name``), then from the paper-size base."""

    input_feat_per_channel: Optional[int] = field(default=None, metadata={"help": "input feature dimension"})
    encoder_frontend: Optional[ChoiceEnum(["vgg2d", "conv1d_gelu"])] = field(default=None, metadata={"help": "front-end layout"})
    vgg_channels: Optional[str] = field(default=None, metadata={"help": "output channels of each VGG block (each pools time x2)"})
    vgg_convs_per_block: Optional[int] = field(default=None, metadata={"help": "3x3 convolutions per VGG block"})
    encoder_pos: Optional[ChoiceEnum(["none", "sinusoidal"])] = field(default=None, metadata={"help": "encoder positions"})
    encoder_embed_dim: Optional[int] = field(default=None, metadata={"help": "encoder dimension"})
    encoder_ffn_embed_dim: Optional[int] = field(default=None, metadata={"help": "encoder FFN dimension"})
    encoder_layers: Optional[int] = field(default=None, metadata={"help": "encoder layers"})
    encoder_attention_heads: Optional[int] = field(default=None, metadata={"help": "encoder attention heads"})
    decoder_context: Optional[ChoiceEnum(["conv", "learned_pos"])] = field(default=None, metadata={"help": "decoder context"})
    decoder_embed_dim: Optional[int] = field(default=None, metadata={"help": "decoder dimension"})
    decoder_conv_channels: Optional[int] = field(default=None, metadata={"help": "channels of the causal context convolutions"})
    decoder_conv_kernel: Optional[int] = field(default=None, metadata={"help": "kernel of the causal context convolutions"})
    decoder_conv_layers: Optional[int] = field(default=None, metadata={"help": "causal context convolutions"})
    decoder_ffn_embed_dim: Optional[int] = field(default=None, metadata={"help": "decoder FFN dimension"})
    decoder_layers: Optional[int] = field(default=None, metadata={"help": "decoder layers"})
    decoder_attention_heads: Optional[int] = field(default=None, metadata={"help": "decoder attention heads"})
    activation_fn: Optional[ChoiceEnum(["relu", "gelu"])] = field(default=None, metadata={"help": "FFN activation"})
    normalize_before: Optional[bool] = field(default=None, metadata={"help": "pre-LayerNorm blocks"})
    attn_key_bias: Optional[bool] = field(default=None, metadata={"help": "bias on the attention key projection"})
    share_decoder_input_output_embed: Optional[bool] = field(default=None, metadata={"help": "tie output projection to token embedding"})
    encoder_final_norm: Optional[bool] = field(default=None, metadata={"help": "LayerNorm after the last encoder layer"})
    decoder_final_norm: Optional[bool] = field(default=None, metadata={"help": "LayerNorm after the last decoder layer"})
    layernorm_eps: Optional[float] = field(default=None, metadata={"help": "LayerNorm epsilon"})
    dropout: Optional[float] = field(default=None, metadata={"help": "dropout"})
    attention_dropout: Optional[float] = field(default=None, metadata={"help": "attention dropout"})
    max_source_positions: Optional[int] = field(default=None, metadata={"help": "max input frames"})
    max_target_positions: Optional[int] = field(default=None, metadata={"help": "max output tokens"})
    decoder_prompt_ids: Optional[str] = field(
        default=None,
        metadata={"help": "comma-separated dictionary indices that replace the leading BOS/EOS of the decoder input"},
    )
    init_from: Optional[str] = field(
        default=None, metadata={"help": "take the architecture (and quantization recipe) of this checkpoint and start from "
                                        "its weights, e.g. an imported Whisper or a PTQ checkpoint; --quant-config still "
                                        "overrides the recipe"})
    quant_config: Optional[str] = field(
        default=None, metadata={"help": "quantization recipe (name in configs/quant, e.g. w8a8, or a YAML path): "
                                        "the model is quantized when built"})
    quant_recipe: Optional[str] = field(
        default=None, metadata={"help": "the resolved recipe as JSON; written into checkpoints, not set by hand"})
    decoder_suppress_ids: Optional[str] = field(
        default=None,
        metadata={"help": "comma-separated dictionary indices whose output logits are set to -1e4 at every step "
                          "(imported Whisper: <pad>/<unk>, which have no Whisper token, and the tokens openai-whisper's "
                          "decoding suppresses)"},
    )
    decoder_suppress_at_begin_ids: Optional[str] = field(
        default=None,
        metadata={"help": "comma-separated dictionary indices whose logits are set to -1e4 at the first output "
                          "position only (Whisper's SuppressBlank: blank and end-of-text)"},
    )


BASE: Dict[str, Any] = dict(  # the paper-size model (Mohamed et al. 2019)
    input_feat_per_channel=80,
    encoder_frontend="vgg2d",
    vgg_channels="64,128",
    vgg_convs_per_block=2,
    encoder_pos="none",
    encoder_embed_dim=1024,
    encoder_ffn_embed_dim=4096,
    encoder_layers=16,
    encoder_attention_heads=16,
    decoder_context="conv",
    decoder_embed_dim=1024,
    decoder_conv_channels=256,
    decoder_conv_kernel=3,
    decoder_conv_layers=4,
    decoder_ffn_embed_dim=4096,
    decoder_layers=6,
    decoder_attention_heads=16,
    activation_fn="relu",
    normalize_before=False,
    attn_key_bias=True,
    share_decoder_input_output_embed=False,
    encoder_final_norm=False,
    decoder_final_norm=False,
    layernorm_eps=1e-5,
    dropout=0.15,
    attention_dropout=0.15,
    max_source_positions=6000,
    max_target_positions=1024,
    decoder_prompt_ids=None,
)

PRESETS: Dict[str, Dict[str, Any]] = {
    "qtransformer_conv": {},
    "qtransformer_conv_s": dict(
        vgg_channels="32,64", encoder_embed_dim=256, encoder_ffn_embed_dim=1024, encoder_layers=12,
        encoder_attention_heads=4, decoder_embed_dim=256, decoder_conv_channels=256, decoder_conv_layers=3,
        decoder_ffn_embed_dim=1024, decoder_layers=6, decoder_attention_heads=4, dropout=0.1, attention_dropout=0.1,
    ),
    "qtransformer_conv_xs": dict(
        vgg_channels="8,16", vgg_convs_per_block=1, encoder_embed_dim=64, encoder_ffn_embed_dim=128,
        encoder_layers=2, encoder_attention_heads=2, decoder_embed_dim=64, decoder_conv_channels=64,
        decoder_conv_layers=2, decoder_ffn_embed_dim=128, decoder_layers=2, decoder_attention_heads=2,
        dropout=0.1, attention_dropout=0.0,
    ),
}


def _int_list(text: Optional[str]) -> List[int]:
    return [int(t) for t in str(text).split(",") if t.strip()] if text else []


def _index_mask(text: Optional[str], vocab: int, name: str) -> Tensor:
    """Bool mask ``[vocab]`` that is True at the comma-separated dictionary indices in ``text``."""
    mask = torch.zeros(vocab, dtype=torch.bool)
    for idx in _int_list(text):
        if not 0 <= idx < vocab:
            raise ValueError(f"{name}: index {idx} is outside the dictionary (size {vocab})")
        mask[idx] = True
    return mask


class QTransformerConvEncoder(FairseqEncoder):
    def __init__(self, cfg: Any):
        super().__init__(None)
        dim = cfg.encoder_embed_dim
        if cfg.encoder_frontend == "vgg2d":
            self.frontend = VGGFrontEnd(cfg.input_feat_per_channel, _int_list(cfg.vgg_channels), cfg.vgg_convs_per_block, dim)
        else:
            self.frontend = Conv1dGeluFrontEnd(cfg.input_feat_per_channel, dim)
        if cfg.encoder_pos == "sinusoidal":
            self.register_buffer("embed_positions", sinusoids(cfg.max_source_positions, dim))
        else:
            self.embed_positions = None
        self.dropout = cfg.dropout
        self.layers = nn.ModuleList(
            EncoderLayer(dim, cfg.encoder_attention_heads, cfg.encoder_ffn_embed_dim, activation=cfg.activation_fn,
                         dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
                         normalize_before=cfg.normalize_before, key_bias=cfg.attn_key_bias, eps=cfg.layernorm_eps)
            for _ in range(cfg.encoder_layers)
        )
        self.final_norm = nn.LayerNorm(dim, eps=cfg.layernorm_eps) if cfg.encoder_final_norm else None
        self.max_source_positions = cfg.max_source_positions

    def forward(self, src_tokens: Tensor, src_lengths: Tensor, return_all_hiddens: bool = False, **unused) -> Dict[str, List[Tensor]]:
        """``src_tokens``: features ``(B, T, F)``; returns fairseq's dict with batch-first ``encoder_out``."""
        x = self.frontend(src_tokens)
        lengths = self.frontend.output_lengths(src_lengths)
        if self.embed_positions is not None:
            if x.size(1) > self.embed_positions.size(0):
                raise ValueError(f"input of {x.size(1)} encoder steps exceeds the {self.embed_positions.size(0)} positions of the model")
            x = x + self.embed_positions[: x.size(1)]
        x = F.dropout(x, self.dropout, self.training)
        padding_mask = torch.arange(x.size(1), device=x.device)[None, :] >= lengths[:, None]
        states = [x] if return_all_hiddens else []
        for layer in self.layers:
            x = layer(x, padding_mask)
            if return_all_hiddens:
                states.append(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return {"encoder_out": [x], "encoder_padding_mask": [padding_mask], "encoder_states": states,
                "src_lengths": [lengths]}

    def reorder_encoder_out(self, encoder_out: Dict[str, List[Tensor]], new_order: Tensor) -> Dict[str, List[Tensor]]:
        return {k: [t.index_select(0, new_order) for t in v] for k, v in encoder_out.items()}

    def max_positions(self) -> int:
        return self.max_source_positions


class QTransformerConvDecoder(FairseqIncrementalDecoder):
    def __init__(self, cfg: Any, dictionary):
        super().__init__(dictionary)
        dim, vocab = cfg.decoder_embed_dim, len(dictionary)
        self.embed_tokens = nn.Embedding(vocab, dim, padding_idx=dictionary.pad())
        nn.init.normal_(self.embed_tokens.weight, mean=0, std=dim**-0.5)
        nn.init.constant_(self.embed_tokens.weight[dictionary.pad()], 0)
        if cfg.decoder_context == "conv":
            self.conv_context = CausalConvContext(dim, cfg.decoder_conv_channels, cfg.decoder_conv_kernel,
                                                  cfg.decoder_conv_layers, dim, cfg.layernorm_eps)
            self.embed_positions = None
        else:
            self.conv_context = None
            self.embed_positions = nn.Embedding(cfg.max_target_positions, dim)
        self.dropout = cfg.dropout
        self.layers = nn.ModuleList(
            DecoderLayer(dim, cfg.decoder_attention_heads, cfg.decoder_ffn_embed_dim, activation=cfg.activation_fn,
                         dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
                         normalize_before=cfg.normalize_before, key_bias=cfg.attn_key_bias, eps=cfg.layernorm_eps)
            for _ in range(cfg.decoder_layers)
        )
        self.final_norm = nn.LayerNorm(dim, eps=cfg.layernorm_eps) if cfg.decoder_final_norm else None
        self.output_projection = nn.Linear(dim, vocab, bias=False)
        # a module, not F.log_softmax: beam search's normalization is swapped for a quantized one too
        self.output_log_softmax = nn.LogSoftmax(dim=-1)
        if cfg.share_decoder_input_output_embed:
            self.output_projection.weight = self.embed_tokens.weight
        else:
            nn.init.normal_(self.output_projection.weight, mean=0, std=dim**-0.5)
        prompt = _int_list(cfg.decoder_prompt_ids)
        for idx in prompt:
            if not 0 <= idx < vocab:
                raise ValueError(f"decoder_prompt_ids: index {idx} is outside the dictionary (size {vocab})")
        self.register_buffer("prompt", torch.tensor(prompt, dtype=torch.long), persistent=False)
        self.register_buffer("suppress_mask", _index_mask(getattr(cfg, "decoder_suppress_ids", None), vocab,
                                                          "decoder_suppress_ids"), persistent=False)
        self.register_buffer("suppress_begin_mask", _index_mask(getattr(cfg, "decoder_suppress_at_begin_ids", None),
                                                                vocab, "decoder_suppress_at_begin_ids"), persistent=False)
        self._suppress_any, self._suppress_begin_any = bool(self.suppress_mask.any()), bool(self.suppress_begin_mask.any())
        self.max_target_positions = cfg.max_target_positions

    def _with_prompt(self, tokens: Tensor) -> Tensor:
        """Replace the leading BOS/EOS with the prompt (e.g. Whisper's ``<|startoftranscript|><|notimestamps|>``)."""
        if self.prompt.numel() == 0:
            return tokens
        return torch.cat([self.prompt.expand(tokens.size(0), -1), tokens[:, 1:]], dim=1)

    def forward(self, prev_output_tokens: Tensor, encoder_out: Optional[Dict[str, List[Tensor]]] = None,
                incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
                features_only: bool = False, **unused):
        x, extra = self.extract_features(prev_output_tokens, encoder_out, incremental_state)
        if not features_only:
            x = self._suppress(self.output_layer(x), bool(extra.get("first_is_begin", False)))
        return x, extra

    def _suppress(self, logits: Tensor, first_is_begin: bool) -> Tensor:
        """decoder_suppress_ids / decoder_suppress_at_begin_ids (no-ops when unset)."""
        if self._suppress_any:
            logits = logits.masked_fill(self.suppress_mask, float("-inf"))
        if first_is_begin and self._suppress_begin_any:
            first = logits[:, :1].masked_fill(self.suppress_begin_mask, float("-inf"))
            logits = torch.cat([first, logits[:, 1:]], dim=1)
        return logits

    def extract_features(self, prev_output_tokens: Tensor, encoder_out: Optional[Dict[str, List[Tensor]]] = None,
                         incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None, **unused):
        cache: Optional[Dict[str, Optional[Tensor]]] = None
        past = 0
        if incremental_state is not None:
            cache = incremental_state.setdefault(CACHE, {})
            steps = cache.get("steps")
            if steps is not None:  # later steps: only the newest token is new
                past = int(steps.item())
                prev_output_tokens = prev_output_tokens[:, -1:]
        n_out = prev_output_tokens.size(1)
        tokens = self._with_prompt(prev_output_tokens) if past == 0 else prev_output_tokens
        x = self.embed_tokens(tokens)
        if self.conv_context is not None:
            x = self.conv_context(x, cache)
        else:
            positions = torch.arange(past, past + tokens.size(1), device=tokens.device)
            if positions[-1] >= self.max_target_positions:
                raise ValueError(f"decoder reached {positions[-1] + 1} positions; the model has {self.max_target_positions}")
            x = x + self.embed_positions(positions)
        if cache is not None:
            cache["steps"] = torch.tensor(past + tokens.size(1))
        x = F.dropout(x, self.dropout, self.training)
        memory = encoder_out["encoder_out"][0] if encoder_out is not None else None
        memory_mask = encoder_out["encoder_padding_mask"][0] if encoder_out is not None else None
        attn: Optional[Tensor] = None
        inner_states = [x]
        for i, layer in enumerate(self.layers):
            x, attn = layer(x, memory, memory_mask, cache, f"layers.{i}")
            inner_states.append(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if x.size(1) != n_out:  # drop the outputs at the extra prompt positions
            x, attn = x[:, -n_out:], attn[:, -n_out:] if attn is not None else None
        return x, {"attn": [attn], "inner_states": inner_states, "first_is_begin": past == 0}

    def get_normalized_probs(self, net_output, log_probs: bool, sample=None) -> Tensor:
        logits = net_output[0]
        if log_probs:
            lprobs = self.output_log_softmax(logits)
            if self._suppress_any or self._suppress_begin_any:
                lprobs = lprobs.masked_fill(torch.isneginf(logits), SUPPRESSED_LOGPROB)
            return lprobs
        if not isinstance(self.output_log_softmax, nn.LogSoftmax):
            raise NotImplementedError("a quantized decoder gives log-probabilities only (log_probs=True)")
        return F.softmax(logits, dim=-1)

    def output_layer(self, features: Tensor) -> Tensor:
        return self.output_projection(features)

    def reorder_incremental_state_scripting(self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]], new_order: Tensor) -> None:
        cache = incremental_state.get(CACHE)
        if cache is None:
            return
        for key, value in cache.items():
            if value is not None and value.dim() > 0:
                cache[key] = value.index_select(0, new_order)

    def max_positions(self) -> int:
        if self.embed_positions is None:
            return self.max_target_positions
        return self.max_target_positions - max(0, self.prompt.numel() - 1)


@register_model("qtransformer_conv", dataclass=QTransformerConvConfig)
class QTransformerConvModel(FairseqEncoderDecoderModel):
    """Conv-context speech transformer; one class for every layout (see module docstring)."""

    @classmethod
    def build_model(cls, cfg: Any, task) -> "QTransformerConvModel":
        init_state = _adopt_init_checkpoint(cfg)
        apply_preset(cfg, PRESETS["qtransformer_conv"])
        if task.target_dictionary is None:
            raise ValueError("qtransformer_conv needs a task with a target dictionary")
        model = cls(QTransformerConvEncoder(cfg), QTransformerConvDecoder(cfg, task.target_dictionary))
        model.encoder_input_dim = cfg.input_feat_per_channel
        model = quantize_fairseq_model(model, cfg)
        if init_state is not None:
            model.load_state_dict(init_state)
        model.effective_cfg = cfg  # fairseq may have passed a copy; the task writes this back into its config
        return model

    def load_state_dict(self, state_dict, strict: bool = True, model_cfg=None, args=None):
        """A float checkpoint may initialize a quantized model (quantizers then get their ranges from
        calibration or the recipe's observer schedule); anything else loads strictly."""
        if is_quantized(self) and split_float_state(self, state_dict):
            missing, unexpected = nn.Module.load_state_dict(self, state_dict, strict=False)
            missing = [k for k in missing if not _is_quant_key(self, k)]
            if strict and (missing or unexpected):
                raise RuntimeError(f"float checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
            logger.warning("loaded a float checkpoint into a quantized model: quantizer ranges come from calibration "
                           "(scripts/calibrate.py) or the recipe's observer schedule")
            return None
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    def max_positions(self):
        return (self.encoder.max_positions(), self.decoder.max_positions())


def _adopt_init_checkpoint(cfg: Any) -> Optional[Dict[str, Tensor]]:
    """``--init-from``: copy the checkpoint's model options into ``cfg`` (a given --quant-config wins over its
    recipe) and return its weights; the option is cleared so checkpoints saved later stand alone."""
    path = getattr(cfg, "init_from", None)
    if not path:
        return None
    from fairseq import checkpoint_utils

    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    source = state["cfg"]["model"]
    new_recipe = getattr(cfg, "quant_config", None)
    with open_dict(cfg) if OmegaConf.is_config(cfg) else contextlib.nullcontext():
        for f in dataclasses.fields(QTransformerConvConfig):
            if f.name.startswith("_") or f.name in ("init_from", "quant_config"):
                continue
            value = source.get(f.name) if hasattr(source, "get") else getattr(source, f.name, None)
            if f.name == "quant_recipe" and new_recipe:
                value = None
            setattr(cfg, f.name, value)
        cfg.init_from = None
    logger.info(f"--init-from {path}: architecture and weights taken from the checkpoint")
    return state["model"]


def apply_preset(cfg: Any, preset: Dict[str, Any]) -> None:
    """Fill every model option that ``cfg`` leaves unset (None) from ``preset``, then from ``BASE``."""
    with open_dict(cfg) if OmegaConf.is_config(cfg) else contextlib.nullcontext():
        for f in dataclasses.fields(QTransformerConvConfig):
            if not f.name.startswith("_") and getattr(cfg, f.name, None) is None:
                setattr(cfg, f.name, preset.get(f.name, BASE.get(f.name)))


def _register_preset(name: str) -> None:
    @register_model_architecture("qtransformer_conv", name)
    def _arch(cfg):
        apply_preset(cfg, PRESETS[name])

    _arch.__name__ = name


for _name in PRESETS:
    if _name != "qtransformer_conv":  # register_model already made the model name an architecture
        _register_preset(_name)
