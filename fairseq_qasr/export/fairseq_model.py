"""``qasr_integer``: a fairseq model around the all-integer engine, so ``fairseq-generate`` evaluates an
exported file. The engine computes everything from the input quantizer to the int64 logits; fairseq's own
search then reads the logits as ``logit_code * logits.scale`` (its beam scorer is float, as for any model).

The checkpoint written by :func:`write_fairseq_checkpoint` holds no tensors: its model config names the
exported file (``integer_file``), the task config is copied from the source checkpoint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from fairseq.dataclass import FairseqDataclass
from fairseq.models import (FairseqEncoder, FairseqEncoderDecoderModel, FairseqIncrementalDecoder, register_model)

from ..integer.engine import IntegerEngine, reorder_state
from .format import load_engine

STATE = "qasr_integer"


@dataclass
class IntegerModelConfig(FairseqDataclass):
    integer_file: str = field(default="", metadata={"help": "exported .safetensors file (scripts/export.py)"})


class _Encoder(FairseqEncoder):
    def __init__(self, engine: IntegerEngine):
        super().__init__(None)
        self.engine = engine

    def forward(self, src_tokens: Tensor, src_lengths: Tensor, **unused) -> Dict[str, List[Tensor]]:
        enc = self.engine.encode(self.engine.quantize_input(src_tokens.float()), src_lengths.cpu())
        return {"encoder_out": [self.engine.memory_tensor(enc["out"])], "encoder_padding_mask": [enc["mask"]],
                "src_lengths": [enc["lengths"]]}

    def reorder_encoder_out(self, encoder_out, new_order):
        return {k: [t.index_select(0, new_order) for t in v] for k, v in encoder_out.items()}

    def max_positions(self) -> int:
        return int(self.engine.cfg.get("max_source_positions") or 10 ** 6)


class _Decoder(FairseqIncrementalDecoder):
    def __init__(self, engine: IntegerEngine, dictionary):
        super().__init__(dictionary)
        self.engine = engine
        self.logit_scale = float(engine.meta["logits.scale"])

    def forward(self, prev_output_tokens: Tensor, encoder_out=None, incremental_state=None, **unused):
        enc = {"out": self.engine.memory_acc(encoder_out["encoder_out"][0]),
               "mask": encoder_out["encoder_padding_mask"][0]}
        state = None
        if incremental_state is not None:
            state = self.get_incremental_state(incremental_state, STATE)
            if state is None:
                state = {}
        logits = self.engine.decode_step(prev_output_tokens, enc, state)
        self.last_int_logits = logits
        if incremental_state is not None:
            self.set_incremental_state(incremental_state, STATE, state)
        # fairseq's search is float: hand it the integer logits on their grid
        return logits.double().mul(self.logit_scale).float(), {"attn": [None]}

    def reorder_incremental_state_scripting(self, incremental_state, new_order: Tensor) -> None:
        state = self.get_incremental_state(incremental_state, STATE)
        if state is not None:
            self.set_incremental_state(incremental_state, STATE, reorder_state(state, new_order))

    def max_positions(self) -> int:
        return int(self.engine.cfg.get("max_target_positions") or 1024)


@register_model("qasr_integer", dataclass=IntegerModelConfig)
class IntegerASRModel(FairseqEncoderDecoderModel):
    @classmethod
    def build_model(cls, cfg, task):
        path = cfg.integer_file
        if not path or not os.path.isfile(path):
            raise FileNotFoundError(f"qasr_integer: integer_file {path!r} not found")
        engine = load_engine(path)
        return cls(_Encoder(engine), _Decoder(engine, task.target_dictionary))

    def max_positions(self):
        return (self.encoder.max_positions(), self.decoder.max_positions())

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        """Log-probabilities of the engine's integer log-softmax (2^-16 nats, as the fake-quantized model's
        quantized ``output_log_softmax`` computes them) for the last step; float log-softmax otherwise."""
        dec, logits = self.decoder, net_output[0]
        last = getattr(dec, "last_int_logits", None)
        if log_probs and last is not None and "lsm:decoder.output_log_softmax" in dec.engine.meta \
                and logits.shape[1] <= last.shape[1]:
            lp = dec.engine.log_probs(last[:, -logits.shape[1]:])
            return lp.double().div(2 ** 16).float()
        return torch.log_softmax(logits, dim=-1) if log_probs else torch.softmax(logits, dim=-1)


def write_fairseq_checkpoint(source_ckpt: str, integer_file: str, out: str) -> None:
    """A fairseq checkpoint (no tensors) whose model is ``qasr_integer`` over ``integer_file``; task and
    generation settings come from ``source_ckpt``."""
    from fairseq_qasr.checkpoints import read_state, write_checkpoint
    from omegaconf import OmegaConf

    base = read_state(source_ckpt)
    cfg = base["cfg"]
    cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    cfg["model"] = {"_name": "qasr_integer", "integer_file": os.path.abspath(integer_file)}
    state = {"cfg": cfg, "model": {},
             "optimizer_history": [{"criterion_name": "none", "optimizer_name": "none",
                                    "lr_scheduler_state": {"best": None}, "num_updates": 0}],
             "extra_state": {"train_iterator": {"epoch": 1}, "val_loss": None}}
    write_checkpoint(state, out)
